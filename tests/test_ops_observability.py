"""Operations: Prometheus metrics (gateway /metrics and the worker's own port), one OpenTelemetry trace from
the gateway's RPC to the worker's render (context in the Celery task headers), JSON logs with the request id,
and timings that split queue wait from render time. Real PostgreSQL, Redis, gRPC and worker process."""

from __future__ import annotations

import json
import socket
import urllib.request

import grpc
import pytest
from conftest import REDIS_URL, make_settings, running_stack
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc

USER = "ops-user-7f3a9c"  # must never appear in a metric label


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        return resp.read().decode()


def sample(text: str, name: str, **labels) -> float:
    """The value of one sample of the exposition text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


@pytest.fixture
def memory_tracing():
    """Tracing on in this process with an in-memory exporter; instrumentation removed afterwards."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from pigment.services.common import tracing

    exporter = InMemorySpanExporter()
    yield exporter
    CeleryInstrumentor().uninstrument()
    SQLAlchemyInstrumentor().uninstrument()
    tracing.shutdown()


@pytest.mark.integration
def test_metrics_traces_logs_and_timings(tmp_path, tiny_preset, pg_database, memory_tracing):
    from pigment.services.common.tracing import setup_tracing

    worker_metrics = free_port()
    trace_file = tmp_path / "worker-spans.jsonl"
    settings = make_settings(tmp_path, tiny_preset, database_url=pg_database(), broker_url=REDIS_URL,
                             trace_exporter="jsonl", trace_file=trace_file, log_format="json",
                             worker_metrics_port=worker_metrics)
    assert setup_tracing(settings, "pigment-gateway", exporter=memory_tracing)
    with running_stack(settings) as (stack, channel, _):
        http = stack.http_server(0).start()
        try:
            before = scrape(http.port)  # this process's registry may hold other tests' calls
            history_pb2_grpc.HistoryServiceStub(channel).LogInteractions(
                history_pb2.LogInteractionsRequest(user_id=USER, create_user=True))
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            resp = stub.GeneratePersonalized(gpb.GenerateRequest(
                request_id="ops-trace-1", user_id=USER, prompt="a star", num_images=1, num_inference_steps=2,
                height=32, width=32), timeout=120)
            events = list(stub.GeneratePersonalizedStream(gpb.GeneratePersonalizedStreamRequest(request=gpb.GenerateRequest(
                request_id="ops-trace-2", user_id=USER, prompt="a star", num_images=1, num_inference_steps=2,
                height=32, width=32)), timeout=120))
            assert events[-1].HasField("result")
            with pytest.raises(grpc.RpcError) as bad:
                stub.GeneratePersonalized(gpb.GenerateRequest(request_id="ops bad id", user_id=USER), timeout=30)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            gateway_text = scrape(http.port)
        finally:
            http.stop()
        worker_text = scrape(worker_metrics)
        worker_log = (settings.data_dir / "worker.log").read_text()

    # timings: queue wait and render time apart, both inside the gateway's wait
    t = dict(resp.timings_ms)
    assert {"queue_wait", "worker_render", "render", "total"} <= set(t)
    assert 0 <= t["queue_wait"] < t["render"] and 0 < t["worker_render"] < t["render"]

    # gateway metrics: RPC latency by method and status; queue depth read from SQL; never a user id
    for code in ("OK", "INVALID_ARGUMENT"):
        calls = [sample(text, "pigment_rpc_seconds_count", method="GeneratePersonalized", code=code)
                 for text in (before, gateway_text)]
        assert calls[1] - calls[0] == 1, code
    assert "pigment_render_queue_depth" in gateway_text
    assert sample(gateway_text, "pigment_preference_cache_total", result="miss") >= 1
    assert USER not in gateway_text and USER not in worker_text and "ops-trace-1" not in gateway_text

    # worker metrics on its own port: render seconds by backend/device, batch size, queue wait
    assert sample(worker_text, "pigment_render_seconds_count", backend="torch", device="cpu") >= 1
    assert sample(worker_text, "pigment_render_batch_size_count", device="cpu") >= 1
    assert sample(worker_text, "pigment_render_queue_wait_seconds_count") >= 1

    # one trace: the gateway's RPC span is the root of the worker's task span and its SQL spans
    spans = memory_tracing.get_finished_spans()
    rpc = [s for s in spans if s.name.endswith("GenerationService/GeneratePersonalized")
           and s.attributes.get("rpc.grpc.status_code") == 0]
    assert len(rpc) == 1, [s.name for s in spans]
    trace_id = format(rpc[0].context.trace_id, "032x")
    stream = [s for s in spans if s.name.endswith("GenerationService/GeneratePersonalizedStream")]
    stream_trace = format(stream[0].context.trace_id, "032x")
    published = {format(s.context.trace_id, "032x") for s in spans if s.name == "apply_async/pigment.render"}
    assert published == {trace_id, stream_trace}, "each publish joins its call's trace (streams too)"
    worker_spans = [json.loads(line) for line in trace_file.read_text().splitlines()]
    run = [s for s in worker_spans if s["name"] == "run/pigment.render"]
    assert run and {s["trace_id"] for s in run} == {trace_id, stream_trace}
    sql = [s for s in worker_spans if s["trace_id"] == trace_id and s["attributes"].get("db.system")]
    assert sql, "the worker's SQL spans join the request's trace"

    # JSON logs: the worker's lines parse, and the render's line carries the request id and the trace id
    lines = [json.loads(line) for line in worker_log.splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    mine = [line for line in lines if line.get("request_id") == "ops-trace-1"]
    assert mine and any(line.get("trace_id") == trace_id for line in mine)


def test_json_formatter_carries_request_id_and_extras(capsys):
    import logging

    from pigment.services.common.logs import JsonFormatter, request_context

    record = logging.LogRecord("pigment.test", logging.INFO, __file__, 1, "rendered %d", (3,), None)
    record.batch = 2
    with request_context("req-42"):
        line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "rendered 3" and line["request_id"] == "req-42" and line["batch"] == 2
    assert line["level"] == "INFO" and line["ts"].endswith("Z")
