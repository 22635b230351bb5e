"""GeneratePersonalized end to end through real gRPC stubs and a real Celery worker process,
on the embedded default (SQLite + filesystem broker) and on PostgreSQL + Redis."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from conftest import REDIS_URL, make_settings, running_stack
from pigment.services.store.tables import Generation, RenderRequest
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc
from PIL import Image
from sqlalchemy import func, select

CATALOG = [
    ("red-circle", "a large red circle on a dark background"),
    ("red-square", "a large red square on a dark background"),
    ("blue-star", "a small blue star on a light background"),
    ("green-heart", "a small green heart on a grey background"),
]


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def seed(channel) -> None:
    history = history_pb2_grpc.HistoryServiceStub(channel)
    history.UpsertItems(history_pb2.UpsertItemsRequest(items=[
        history_pb2.Item(item_id=i, caption=c, image_png=_png((40 * n, 90, 200 - 40 * n)))
        for n, (i, c) in enumerate(CATALOG)]))
    history.LogInteractions(history_pb2.LogInteractionsRequest(user_id="alice", create_user=True, interactions=[
        history_pb2.Interaction(item_id="red-circle", kind="like", timestamp_ms=1_700_000_000_000),
        history_pb2.Interaction(item_id="red-square", kind="like", timestamp_ms=1_700_000_001_000)]))
    history.LogInteractions(history_pb2.LogInteractionsRequest(user_id="newbie", create_user=True))


def generation_rows(stack, request_id: str) -> list[Generation]:
    with stack.sessions() as s:
        return list(s.scalars(select(Generation).where(Generation.request_id == request_id)
                              .order_by(Generation.image_index)))


def check_generate_and_replay(stack, channel, request_id: str) -> None:
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    request = gpb.GenerateRequest(request_id=request_id, user_id="alice", prompt="a star", num_images=2,
                                  num_inference_steps=3, height=32, width=32, seed=7)
    first = stub.GeneratePersonalized(request, timeout=120)
    assert len(first.images) == 2
    for n, img in enumerate(first.images):
        decoded = Image.open(io.BytesIO(img.png))
        assert decoded.size == (32, 32) and decoded.format == "PNG"
        assert np.asarray(decoded).std() > 0  # a real rendering, not a blank placeholder
        assert img.seed == 7 + n
    assert first.model_version.startswith("tiny-1@")
    assert "REPLAYED" not in first.flags
    rows = generation_rows(stack, request_id)
    assert [r.generation_id for r in rows] == [i.generation_id for i in first.images]
    assert all(r.user_id == "alice" and r.model_version == first.model_version for r in rows)

    replay = stub.GeneratePersonalized(request, timeout=120)
    assert "REPLAYED" in replay.flags
    assert [i.generation_id for i in replay.images] == [i.generation_id for i in first.images]
    assert [i.png for i in replay.images] == [i.png for i in first.images]
    assert len(generation_rows(stack, request_id)) == 2


def test_embedded_generate_replay_and_stream(embedded):
    stack, channel, _ = embedded
    seed(channel)
    check_generate_and_replay(stack, channel, "e2e-embedded-1")

    # The streaming variant reports each denoising step, then the result.
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    events = list(stub.GeneratePersonalizedStream(gpb.GeneratePersonalizedStreamRequest(request=gpb.GenerateRequest(
        request_id="e2e-stream-1", user_id="alice", prompt="a star", num_images=1, num_inference_steps=4)), timeout=120))
    steps = [e.progress.step for e in events if e.WhichOneof("event") == "progress"]
    assert steps == sorted(steps) and max(steps) == 4
    assert events[-1].WhichOneof("event") == "result" and len(events[-1].result.images) == 1


def test_each_method_reports_the_conditioning_it_rendered_with(embedded):
    """pmg renders prompt + keywords + soft tokens, pmg_soft prompt + soft tokens, each at the
    soft weight the preset chose for it; pmg_keywords has no soft tokens; a request's weight wins."""
    import json

    stack, channel, _ = embedded
    seed(channel)
    pref = json.loads((stack.preset_dir / "preference.json").read_text())
    assert pref["soft_weight"] != pref["soft_weight_alone"]
    stub = generation_pb2_grpc.GenerationServiceStub(channel)

    def generate(method, **extra):
        return stub.GeneratePersonalized(gpb.GenerateRequest(
            request_id=f"e2e-cond-{method}-{len(extra)}", user_id="alice", prompt="a star", num_images=1,
            num_inference_steps=2, method=method, retrieval=gpb.RETRIEVAL_MODE_GENERATE_ONLY, **extra), timeout=120)

    pmg = generate(gpb.METHOD_PMG)  # the tiny LLM is untrained: it may or may not write valid keywords
    assert list(pmg.conditioning.segments) == ["a star", *([", ".join(pmg.keywords)] if pmg.keywords else [])]
    assert pmg.conditioning.soft_tokens == 2 and pmg.conditioning.soft_weight == pytest.approx(pref["soft_weight"])
    alone = generate(gpb.METHOD_PMG_SOFT).conditioning
    assert list(alone.segments) == ["a star"] and alone.soft_tokens == 2
    assert alone.soft_weight == pytest.approx(pref["soft_weight_alone"])
    assert generate(gpb.METHOD_PMG_KEYWORDS).conditioning.soft_tokens == 0
    assert generate(gpb.METHOD_PMG_SOFT, soft_weight=0.3).conditioning.soft_weight == pytest.approx(0.3)


def test_redelivered_render_adds_no_rows(embedded):
    """A task redelivered after a worker loss re-renders into the same ids and files, adding no rows."""
    from pigment.services.render.core import RenderCore

    stack, channel, _ = embedded
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    seed(channel)
    first = stub.GeneratePersonalized(gpb.GenerateRequest(
        request_id="e2e-redeliver", user_id="alice", num_images=2, num_inference_steps=2), timeout=120)
    with stack.sessions.begin() as s:  # as if a worker were rendering it right now
        row = s.get(RenderRequest, "e2e-redeliver")
        row.status, row.heartbeat_at = "running", datetime.now(UTC)
    core = RenderCore(stack.sessions, stack.storage, lambda: __import__(
        "pigment.models.pipeline", fromlist=["Renderer"]).Renderer(stack.preset_dir))
    assert core.run("e2e-redeliver") == "running"  # a live worker holds it: the duplicate renders nothing
    with stack.sessions.begin() as s:  # as if that worker died before acking: its heartbeat went stale
        s.get(RenderRequest, "e2e-redeliver").heartbeat_at = datetime.now(UTC) - timedelta(minutes=5)
    assert core.run("e2e-redeliver") == "done"
    rows = generation_rows(stack, "e2e-redeliver")
    assert [r.generation_id for r in rows] == [i.generation_id for i in first.images]
    with stack.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Generation)
                        .where(Generation.request_id == "e2e-redeliver")) == 2


@pytest.mark.integration
def test_production_mode_postgres_redis(tmp_path, tiny_preset, pg_database):
    settings = make_settings(tmp_path, tiny_preset, database_url=pg_database(), broker_url=REDIS_URL)
    assert not settings.embedded
    with running_stack(settings) as (stack, channel, _):
        seed(channel)
        check_generate_and_replay(stack, channel, "e2e-production-1")


def test_empty_history_is_flagged_not_an_error(embedded):
    stack, channel, _ = embedded
    seed(channel)
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    resp = stub.GeneratePersonalized(gpb.GenerateRequest(
        request_id="e2e-newbie", user_id="newbie", prompt="a star", num_images=1, num_inference_steps=2), timeout=120)
    assert len(resp.images) == 1
    assert "NON_PERSONALIZED_EMPTY_HISTORY" in resp.flags and not resp.keywords
