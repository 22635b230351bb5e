"""The gRPC side of ``services/common/auth.py``: credentials -> ``Principal`` for each call, per-tenant call
limits, TLS server credentials. Health checking and reflection stay open (probes carry no key)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import grpc
from pigment.services.common.auth import (
    LOCAL_ADMIN,
    KeyStore,
    RateLimiter,
    reset_principal,
    set_principal,
)
from pigment.services.common.errors import Unauthenticated

log = logging.getLogger("pigment.auth")
OPEN_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


class AuthInterceptor(grpc.ServerInterceptor):
    """``keys`` None: every call is ``LOCAL_ADMIN`` (the embedded default, loopback only).

    Installed inside ``ErrorInterceptor``, so Unauthenticated and RateLimited map like any domain error.
    """

    def __init__(self, keys: KeyStore | None = None, limiter: RateLimiter | None = None):
        self.keys = keys
        self.limiter = limiter

    def _principal(self, metadata):
        if self.keys is None:
            return LOCAL_ADMIN
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        return self.keys.authenticate(header if isinstance(header, str) else None)

    def _enter(self, metadata, context, method: str):
        try:
            principal = self._principal(metadata)
        except Unauthenticated as exc:  # an audit trail of refused calls (never the key itself)
            log.warning("refused %s from %s: %s", method, context.peer(), exc)
            raise
        if self.limiter is not None:
            self.limiter.charge(principal, "calls")
        return set_principal(principal)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        metadata, method = handler_call_details.invocation_metadata, handler_call_details.method
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, metadata, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, metadata, method))
        return _refuse(handler)  # no streaming-request RPC of ours exists; never serve one unauthenticated

    def _wrap_unary(self, fn: Callable, metadata, method: str) -> Callable:
        def handler(request, context):
            token = self._enter(metadata, context, method)
            try:
                return fn(request, context)
            finally:
                reset_principal(token)

        return handler

    def _wrap_stream(self, fn: Callable, metadata, method: str) -> Callable:
        def handler(request, context):
            token = self._enter(metadata, context, method)
            try:
                yield from fn(request, context)
            finally:
                reset_principal(token)

        return handler


def _refuse(handler):
    def deny(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "streaming-request calls are not served")

    kind = "stream_stream" if handler.stream_stream else "stream_unary"
    return handler._replace(**{kind: deny})


def server_credentials(cert_file: Path, key_file: Path, client_ca_file: Path | None = None):
    """TLS; with ``client_ca_file`` also mTLS (a client certificate signed by that CA is required)."""
    ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials([(Path(key_file).read_bytes(), Path(cert_file).read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, key: str):
        self.header = ("authorization", f"Bearer {key}")

    def _with_key(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self.header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)


def bearer_channel(channel: grpc.Channel, key: str | None) -> grpc.Channel:
    """``channel`` sending ``authorization: Bearer <key>`` on every call (plaintext or TLS); None: unchanged.
    Over TLS, ``grpc.access_token_call_credentials(key)`` in the channel credentials does the same."""
    return grpc.intercept_channel(channel, _Bearer(key)) if key else channel
