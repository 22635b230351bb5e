"""Generated from protos/pigment/v1 by clients/python/generate.py."""
