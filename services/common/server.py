"""``create_server``: interceptors, health, reflection and graceful stop in one place.

Capacity: at most ``max_concurrent_rpcs`` application RPCs run at once (more are
answered RESOURCE_EXHAUSTED at once by ``SlotInterceptor``), on a thread pool
``reserve`` threads larger, so health checks and fast rejections always find a
thread even while every slot waits on a render.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from pigment.services.common.errors import Overloaded, PigmentError, to_rpc_status
from pigment.services.common.metrics import metrics_interceptor
from pigment.services.common.tracing import server_interceptors

log = logging.getLogger("pigment.grpc")


def _abort(context: grpc.ServicerContext, exc: Exception, method: str):
    if not isinstance(exc, PigmentError):
        log.exception("unhandled error in %s", method)
        exc = PigmentError(f"internal error in {method}: {type(exc).__name__} (logged)")
    abort_with(context, exc)


def abort_with(context: grpc.ServicerContext, exc: PigmentError):
    """End the call with ``exc`` as a google.rpc.Status with details (clients read them with rpc_status.from_call)."""
    # set_code first: the OpenTelemetry context wrapper records the code from set_code/abort, not abort_with_status
    context.set_code(getattr(grpc.StatusCode, exc.status))
    context.abort_with_status(rpc_status.to_status(to_rpc_status(exc)))


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


UNLIMITED = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # never counted against the RPC slots
LIVENESS = "liveness"  # a health service name that stays SERVING while the process answers (liveness probes)


class SlotInterceptor(grpc.ServerInterceptor):
    """At most ``limit`` application RPCs at once; the next is RESOURCE_EXHAUSTED without waiting."""

    def __init__(self, limit: int):
        self.limit = limit
        self.slots = threading.BoundedSemaphore(limit)

    def _exhausted(self, context):
        busy = Overloaded(f"server busy: {self.limit} calls in flight (max_concurrent_rpcs); retry later",
                          reason="SERVER_BUSY")
        abort_with(context, busy)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNLIMITED):
            return handler
        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request, context):
                if not self.slots.acquire(blocking=False):
                    self._exhausted(context)
                try:
                    return inner(request, context)
                finally:
                    self.slots.release()

            return handler._replace(unary_unary=unary)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def stream(request, context):
                if not self.slots.acquire(blocking=False):
                    self._exhausted(context)
                try:
                    yield from inner_stream(request, context)
                finally:
                    self.slots.release()

            return handler._replace(unary_stream=stream)
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
    reserve: int = 8,
    interceptors: Iterable[grpc.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Register ``(add_fn, servicer, full_service_name)`` triples; returns (server, bound port, health).

    ``interceptors`` run inside the error mapping (the auth interceptor); ``credentials``: TLS, else plaintext.
    """
    # the trace span and metrics outermost (metrics see the mapped status), then errors, then auth
    chain: list[grpc.ServerInterceptor] = [ErrorInterceptor(), *interceptors]
    if max_concurrent_rpcs is not None:
        chain.insert(0, SlotInterceptor(max_concurrent_rpcs))
        max_workers = max_concurrent_rpcs
    chain = [*server_interceptors(), metrics_interceptor(), *chain]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers + reserve, thread_name_prefix="grpc"),
        interceptors=chain,
        maximum_concurrent_rpcs=max_workers + reserve,
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    )
    health_servicer = health.HealthServicer()
    names = [reflection.SERVICE_NAME, health.SERVICE_NAME]
    for add_fn, servicer, name in registrations:
        add_fn(servicer, server)
        names.append(name)
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(names, server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    return server, port, health_servicer


def set_readiness(health_servicer: health.HealthServicer, names: Iterable[str], problems: list[str]) -> None:
    """SERVING for the server ("") and each service when ``problems`` is empty, else NOT_SERVING (logged)."""
    status = health_pb2.HealthCheckResponse.NOT_SERVING if problems else health_pb2.HealthCheckResponse.SERVING
    # log changes only: of the status, or of why it is NOT_SERVING ("starting" -> "schema not migrated")
    changed = getattr(health_servicer, "pigment_problems", None) != problems
    health_servicer.pigment_problems = list(problems)
    for name in ["", *names]:
        changed |= health_servicer._server_status.get(name) != status
        health_servicer.set(name, status)
    if changed:
        log.warning("readiness: %s", "; ".join(problems) if problems else "SERVING")
