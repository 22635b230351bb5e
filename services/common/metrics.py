"""Prometheus metrics: one registry per process, a gRPC interceptor, and a /metrics server for workers.

Labels are bounded sets (RPC method, status code, backend, device, kind,
outcome); a user id, request id or prompt is never a label. Gateways serve
``/metrics`` on their HTTP port (``pigment serve --http-port N``); a render
worker serves it on ``PIGMENT_WORKER_METRICS_PORT`` (its own port, since one
pod runs one worker). Workers run ``--pool solo`` (one process per device), so
the default in-process registry is the whole truth; no multiprocess mode.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pigment.services.common.logs import request_context
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("pigment.metrics")

# gRPC latency up to the render timeout; renders of a real preset take seconds to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

RPC_SECONDS = Histogram("pigment_rpc_seconds", "gRPC handling time by method and status code",
                        ["method", "code"], buckets=LATENCY_BUCKETS)
QUEUE_DEPTH = Gauge("pigment_render_queue_depth", "Render requests not finished, by status (SQL, read at scrape)",
                    ["status"])
QUEUE_WAIT_SECONDS = Histogram("pigment_render_queue_wait_seconds", "From the request row queued to a worker "
                               "claiming it", buckets=LATENCY_BUCKETS)
RENDER_SECONDS = Histogram("pigment_render_seconds", "One pipeline call (a batch) by backend and device",
                           ["backend", "device"], buckets=LATENCY_BUCKETS)
RENDER_BATCH_SIZE = Histogram("pigment_render_batch_size", "Requests rendered in one pipeline call, by device",
                              ["device"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
RENDERS = Counter("pigment_renders_total", "Rendered requests by outcome", ["outcome"])
PREFERENCE_CACHE = Counter("pigment_preference_cache_total", "Preference encoder cache lookups (per adapter "
                           "version) by result", ["result"])
RETRAIN_RUNS = Counter("pigment_retrain_runs_total", "Retrain runs by adapter kind and promotion-gate outcome "
                       "(promoted | rejected | failed | skipped)", ["kind", "outcome"])
RETRAIN_SECONDS = Histogram("pigment_retrain_seconds", "Duration of one retrain run", ["kind"],
                            buckets=(1, 10, 60, 300, 900, 1800, 3600, 7200))


def exposition() -> tuple[bytes, str]:
    """The text exposition format and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST


def watch_queue_depth(sessions) -> None:
    """Read the render queue's depth from SQL at each scrape (the gateway's view, shared by all replicas)."""
    from pigment.services.store.db import transaction
    from pigment.services.store.tables import RenderRequest
    from sqlalchemy import func, select

    def depth(status: str) -> Callable[[], float]:
        def read() -> float:
            try:
                with transaction(sessions) as s:
                    return float(s.scalar(select(func.count()).select_from(RenderRequest)
                                          .where(RenderRequest.status == status)) or 0)
            except Exception:  # noqa: BLE001 - a scrape must not fail because the database blinked
                return float("nan")
        return read

    for status in ("queued", "running"):
        QUEUE_DEPTH.labels(status).set_function(depth(status))


def serve_metrics(port: int, host: str = "0.0.0.0") -> int:
    """Start prometheus_client's own HTTP server (workers); returns the bound port."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host)
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


def metrics_interceptor():
    """A server interceptor observing latency and final status of every RPC (unary and server-streaming).

    Installed outermost, so the status is the one the caller sees after the error interceptor mapped it.
    (grpc imported here: the cores import this module and never import grpc.)
    """
    import grpc

    class MetricsInterceptor(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            handler = continuation(details)
            if handler is None:
                return None
            method = details.method.rsplit("/", 1)[-1]  # e.g. GeneratePersonalized: a set bounded by the protos
            if handler.unary_unary:
                return handler._replace(unary_unary=_timed_unary(handler.unary_unary, method))
            if handler.unary_stream:
                return handler._replace(unary_stream=_timed_stream(handler.unary_stream, method))
            return handler

    return MetricsInterceptor()


def _code(context, failed: bool) -> str:
    code = context.code() if hasattr(context, "code") else None
    if code is None:
        return "UNKNOWN" if failed else "OK"
    return getattr(code, "name", str(code))


def _timed_unary(fn, method: str):
    def handler(request, context):
        t0, failed = time.perf_counter(), True
        try:
            with request_context(getattr(request, "request_id", "")):  # log lines of this call carry it
                out = fn(request, context)
            failed = False
            return out
        finally:
            RPC_SECONDS.labels(method, _code(context, failed)).observe(time.perf_counter() - t0)

    return handler


def _timed_stream(fn, method: str):
    def handler(request, context):
        t0, failed = time.perf_counter(), True
        try:
            with request_context(getattr(request, "request_id", "")):
                yield from fn(request, context)
            failed = False
        finally:
            RPC_SECONDS.labels(method, _code(context, failed)).observe(time.perf_counter() - t0)

    return handler
