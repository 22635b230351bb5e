"""Generated protobuf and gRPC modules for pigment.v1 (run `make protos`)."""
