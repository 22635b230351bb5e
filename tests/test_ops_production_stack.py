"""`pigment stack`: the production topology as separate processes (migrate once, gateway, a worker per queue,
one beat) on PostgreSQL + Redis, the same commands the manifests start; a request, a batch job and a scheduled
retrain each pass through their own process."""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from conftest import REDIS_URL, make_settings
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc
from test_ops_observability import free_port, sample, scrape


@pytest.mark.integration
@pytest.mark.slow
def test_production_stack_end_to_end(tmp_path, tiny_preset, pg_database):
    from pigment.services.topology import ProductionStack

    metrics = free_port()
    while any(not _free(metrics + i) for i in range(3)):
        metrics = free_port()
    settings = make_settings(tmp_path, tiny_preset, database_url=pg_database(), broker_url=REDIS_URL,
                             retrain_every_s=3, retrain_queue=f"retrain.{uuid.uuid4().hex[:6]}",
                             worker_metrics_port=metrics)
    port = free_port()
    prod = ProductionStack(settings, port, tmp_path / "logs", http_port=free_port())
    assert set(prod.commands()) == {"gateway", "worker-render", "worker-batch", "worker-retrain", "beat"}
    prod.start(ready_s=300)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        history = history_pb2_grpc.HistoryServiceStub(channel)
        for user in ("p1", "p2"):
            history.LogInteractions(history_pb2.LogInteractionsRequest(user_id=user, create_user=True))
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        resp = stub.GeneratePersonalized(gpb.GenerateRequest(request_id="prod-1", user_id="p1", prompt="a star",
                                                             num_images=1, num_inference_steps=2), timeout=240)
        assert len(resp.images) == 1 and resp.timings_ms["queue_wait"] >= 0

        stub.SubmitBatch(gpb.SubmitBatchRequest(job_id="prod-job", user_ids=["p1", "p2"], prompt="a star",
                                                num_inference_steps=2), timeout=60)
        deadline = time.monotonic() + 240
        while (job := stub.GetJob(gpb.GetJobRequest(job_id="prod-job"), timeout=30).job).status not in (gpb.JOB_STATUS_DONE, gpb.JOB_STATUS_FAILED):
            assert time.monotonic() < deadline, f"batch job stuck: {job}\n{prod.tail('worker-batch')}"
            time.sleep(1)
        assert job.status == gpb.JOB_STATUS_DONE and job.done == 2, job
        channel.close()

        # beat -> retrain queue -> retrain worker: a run with no feedback is recorded as skipped by the gate
        retrain_port = prod.metrics_port("worker-retrain")
        deadline = time.monotonic() + 120
        while sample(scrape(retrain_port), "pigment_retrain_runs_total", outcome="skipped") < 1:
            assert time.monotonic() < deadline, prod.tail("beat") + prod.tail("worker-retrain")
            time.sleep(1)
        assert sample(scrape(prod.metrics_port("worker-render")), "pigment_render_seconds_count") >= 1
    finally:
        codes = prod.stop(timeout=60)
    assert codes == dict.fromkeys(codes, 0), {n: (c, prod.tail(n, 1500)) for n, c in codes.items() if c}


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
