"""OpenTelemetry traces across gRPC, Celery and SQLAlchemy: one trace per request, gateway to worker.

``PIGMENT_TRACE_EXPORTER`` picks the exporter: ``off`` (default: no provider,
no instrumentation, no cost), ``console`` (spans as JSON on stdout), ``jsonl``
(one span per line appended to ``PIGMENT_TRACE_FILE``; what the tests read from
the worker process), ``otlp`` (needs ``opentelemetry-exporter-otlp``, endpoint
from the standard ``OTEL_EXPORTER_OTLP_*`` variables). The gateway's gRPC server
span is the root; Celery's instrumentation carries its context in the task
headers, so the worker's ``run/pigment.render`` span and its SQL spans join
the same trace.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("pigment.tracing")
EXPORTERS = ("off", "console", "jsonl", "otlp")
_state: dict = {}
_lock = threading.Lock()


def enabled() -> bool:
    return bool(_state.get("provider"))


def setup_tracing(settings, service_name: str, exporter=None) -> bool:
    """Install a tracer provider and the Celery/SQLAlchemy instrumentation, once per process.

    ``exporter`` (a SpanExporter) overrides the setting (tests pass an in-memory one). Returns whether tracing is on.
    """
    kind = settings.trace_exporter
    if exporter is None and kind == "off":
        return False
    with _lock:
        if _state.get("provider"):
            return True
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            processor = SimpleSpanProcessor if kind in ("console", "jsonl") else BatchSpanProcessor
            provider.add_span_processor(processor(_exporter(kind, settings)))
        trace.set_tracer_provider(provider)
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

        CeleryInstrumentor().instrument(tracer_provider=provider)
        # engines created from now on; its version pin stops below SQLAlchemy 2.1, whose engine events it uses
        # unchanged (the test checks SQL spans appear)
        SQLAlchemyInstrumentor().instrument(tracer_provider=provider, skip_dep_check=True)
        _state["provider"] = provider
        log.info("tracing on (%s) as %s", "custom" if exporter is not None else kind, service_name)
        return True


def server_interceptors() -> list:
    """The gRPC server interceptor opening the request's root span (empty when tracing is off)."""
    if not enabled():
        return []
    from opentelemetry.instrumentation.grpc import server_interceptor

    return [server_interceptor(tracer_provider=_state["provider"])]


def current_trace_id() -> str:
    """Hex id of the active trace ("" outside a span or with tracing off): logs carry it."""
    if not enabled():
        return ""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def shutdown() -> None:
    provider = _state.pop("provider", None)
    if provider is not None:
        provider.shutdown()


def _exporter(kind: str, settings):
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind == "jsonl":
        return JsonlSpanExporter(settings.trace_file or Path(settings.data_dir) / "traces.jsonl")
    if kind == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ModuleNotFoundError as exc:
            raise RuntimeError("trace_exporter=otlp needs `pip install opentelemetry-exporter-otlp`") from exc
        return OTLPSpanExporter()
    raise ValueError(f"trace_exporter={kind!r} is unknown: allowed {', '.join(EXPORTERS)}")


class JsonlSpanExporter:
    """Appends one JSON object per span (name, ids, parent, attributes) to a file; safe across processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence) -> object:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = [json.dumps(span_record(s)) + "\n" for s in spans]
        with open(self.path, "a") as fh:  # one write per batch: O_APPEND keeps lines whole
            fh.write("".join(lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def span_record(span) -> dict:
    ctx, parent = span.get_span_context(), span.parent
    return {"name": span.name, "trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x"),
            "parent_id": format(parent.span_id, "016x") if parent else None,
            "service": span.resource.attributes.get("service.name", ""),
            "attributes": {k: v if isinstance(v, (str, int, float, bool)) else str(v)
                           for k, v in (span.attributes or {}).items()}}
