"""pigment's Python client: the generated stubs (``pigment_client.v1``) and ``PigmentClient``, a thin typed
wrapper that sends the API key, sets deadlines, and retries what is safe to retry. No torch, no server code."""

from pigment_client.client import FEEDBACK_KINDS, PigmentClient, RetryPolicy, retry_delay_of

__all__ = ["FEEDBACK_KINDS", "PigmentClient", "RetryPolicy", "retry_delay_of"]
