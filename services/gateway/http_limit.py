"""The HTTP face's concurrency limit, answered like every other HTTP error.

uvicorn's own ``limit_concurrency`` answers a plain-text "Service Unavailable"; this ASGI middleware counts
HTTP requests in flight itself and past ``limit`` answers at once with the face's error body: a
google.rpc.Status JSON (RESOURCE_EXHAUSTED, reason SERVER_BUSY, as gRPC's SlotInterceptor says it, with
RetryInfo) under HTTP 503 and a ``Retry-After`` header. ``/healthz`` and ``/metrics`` are never counted, so a
busy face still answers its probes. Torch-free.
"""

from __future__ import annotations

from pigment.services.common.errors import Overloaded
from pigment.services.gateway.http_io import error_response

UNCOUNTED = ("/healthz", "/metrics")


class ServerBusy(Overloaded):
    http_status = 503  # the server is overloaded (429 would blame the caller's own rate)


class ConcurrencyLimit:
    """At most ``limit`` HTTP requests in flight; the next is refused without waiting. One event loop runs
    the app, so a plain counter is enough (no lock)."""

    def __init__(self, app, limit: int, retry_after_s: float = 1.0):
        self.app, self.limit, self.retry_after_s = app, limit, retry_after_s
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "") in UNCOUNTED:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            busy = ServerBusy(f"server busy: {self.limit} HTTP requests in flight; retry later",
                              reason="SERVER_BUSY", retry_after_s=self.retry_after_s)
            return await error_response(busy)(scope, receive, send)
        self.in_flight += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
