"""``create_server``: interceptors, health, reflection and graceful stop in one place."""

from __future__ import annotations

import logging
from concurrent import futures
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pigment.services.common.errors import PigmentError
from pigment.services.common.metrics import metrics_interceptor
from pigment.services.common.tracing import server_interceptors

log = logging.getLogger("pigment.grpc")


def _abort(context: grpc.ServicerContext, exc: Exception, method: str):
    if isinstance(exc, PigmentError):
        context.abort(getattr(grpc.StatusCode, exc.status), str(exc))
    log.exception("unhandled error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__} (logged)")


def _wrap_unary(fn: Callable, method: str) -> Callable:
    def handler(request, context):
        try:
            return fn(request, context)
        except Exception as exc:  # noqa: BLE001 - mapped to a status, never a bare traceback
            _abort(context, exc, method)

    return handler


def _wrap_stream(fn: Callable, method: str) -> Callable:
    def handler(request, context):
        try:
            yield from fn(request, context)
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc, method)

    return handler


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps domain errors (``services/common/errors.py``) to gRPC status codes."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream, method))
        return handler


def create_server(
    registrations: Iterable[tuple[Callable, object, str]],
    address: str = "127.0.0.1:0",
    max_workers: int = 16,
    max_concurrent_rpcs: int | None = 64,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Register ``(add_fn, servicer, full_service_name)`` triples; returns (server, bound port, health)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        # outermost first: the trace span, then metrics (see the mapped status), then domain-error mapping
        interceptors=[*server_interceptors(), metrics_interceptor(), ErrorInterceptor()],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    )
    health_servicer = health.HealthServicer()
    names = [reflection.SERVICE_NAME, health.SERVICE_NAME]
    for add_fn, servicer, name in registrations:
        add_fn(servicer, server)
        names.append(name)
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    return server, port, health_servicer
