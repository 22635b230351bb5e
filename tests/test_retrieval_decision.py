"""GILL-style retrieve-or-generate through the real gRPC stack (tiny CLIP, a real Celery worker),
the learned decision head, and resumable catalog ingestion."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import grpc
import pytest
from conftest import make_settings, running_stack
from pigment.services.common.errors import InvalidInput, ModelNotReady
from pigment.services.gateway.decision import DecisionConfig, DecisionHead
from pigment.services.history.ingest import GrpcSink, LocalSink, ingest, progress_path
from pigment.services.store.tables import Generation, Item
from pigment.training.toy_world import png_bytes, render_item
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc
from sqlalchemy import select

RETRIEVED, GENERATED = gpb.RESULT_SOURCE_RETRIEVED, gpb.RESULT_SOURCE_GENERATED
PUBLIC = ["p0", "p1", "p2", "p3"]
ACME, GLOBEX = ["a0", "a1"], ["g0", "g1", "g2"]
SHAPES = ["circle", "square", "triangle", "star", "heart", "cross"]
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple"]


def toy_item(n: int) -> tuple[str, bytes]:
    attrs = {
        "shape": SHAPES[n % 6],
        "colour": COLOURS[(n * 5 + 1) % 6],
        "background": ["dark", "grey", "light"][n % 3],
        "size": ["small", "large"][n % 2],
    }
    cap = f"a {attrs['size']} {attrs['colour']} {attrs['shape']} on a {attrs['background']} background"
    return cap, png_bytes(render_item(attrs))


def pb_item(item_id: str, n: int, tenant: str = "") -> history_pb2.Item:
    cap, png = toy_item(n)
    return history_pb2.Item(item_id=item_id, caption=cap, image_png=png, tenant=tenant)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_preset):
    settings = make_settings(tmp_path_factory.mktemp("gill"), tiny_preset, retrieval_mode="auto")
    with running_stack(settings) as (stack, channel, _):
        hist = history_pb2_grpc.HistoryServiceStub(channel)
        hist.UpsertItems(
            history_pb2.UpsertItemsRequest(
                items=[pb_item(i, n) for n, i in enumerate(PUBLIC)]
                + [pb_item(i, 4 + n, "acme") for n, i in enumerate(ACME)]
                + [pb_item(i, 6 + n, "globex") for n, i in enumerate(GLOBEX)]
            )
        )
        for user, tenant, seen in (
            ("ann", "acme", ["p0", "a0"]),
            ("gus", "globex", ["g0"]),
            ("lonely", "solo", PUBLIC),
        ):
            hist.LogInteractions(
                history_pb2.LogInteractionsRequest(
                    user_id=user,
                    tenant=tenant,
                    create_user=True,
                    interactions=[history_pb2.Interaction(item_id=i, kind="like") for i in seen],
                )
            )
        yield stack, channel


def generate(
    channel, request_id, user="ann", mode=gpb.RETRIEVAL_MODE_AUTO, n=1, **kw
) -> gpb.GenerateResponse:
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    return stub.GeneratePersonalized(
        gpb.GenerateRequest(
            request_id=request_id,
            user_id=user,
            prompt="a star",
            num_images=n,
            num_inference_steps=2,
            retrieval=mode,
            **kw,
        ),
        timeout=120,
    )


@pytest.fixture
def decider_config(stack):
    """Lets a test change the decider's config; restores it afterwards."""
    gateway = stack[0].gateway
    original = gateway.decider

    def set_config(**changes):
        gateway.decider = original.with_config(**changes)

    yield set_config
    gateway.decider = original


def test_retrieve_only_returns_unseen_items_of_the_users_tenant(stack):
    st, channel = stack
    res = generate(channel, "gill-ro-1", mode=gpb.RETRIEVAL_MODE_RETRIEVE_ONLY, n=8)
    ids = [i.item_id for i in res.images]
    assert set(ids) == {"p1", "p2", "p3", "a1"}  # p0 and a0 were seen; globex is another tenant
    assert all(i.source == RETRIEVED and i.png and -1.0 <= i.score <= 1.0 for i in res.images)
    assert [i.score for i in res.images] == sorted((i.score for i in res.images), reverse=True)
    assert res.decision.retrieved and res.decision.policy == gpb.DECISION_POLICY_FORCED
    assert "retrieve_only" in res.decision.reason and "threshold" in res.decision.reason
    assert math.isclose(res.decision.score, res.images[0].score, abs_tol=1e-5)
    with st.sessions() as s:
        rows = s.scalars(select(Generation).where(Generation.request_id == "gill-ro-1")).all()
    assert sorted(r.retrieved_item_id for r in rows) == sorted(ids)

    seen_too = generate(
        channel, "gill-ro-seen", mode=gpb.RETRIEVAL_MODE_RETRIEVE_ONLY, n=8, include_seen=True
    )
    assert {i.item_id for i in seen_too.images} == set(PUBLIC + ACME)

    gus = generate(channel, "gill-ro-gus", user="gus", mode=gpb.RETRIEVAL_MODE_RETRIEVE_ONLY, n=8)
    assert {i.item_id for i in gus.images} == set(PUBLIC + ["g1", "g2"])


def test_search_items_is_tenant_scoped(stack):
    hist = history_pb2_grpc.HistoryServiceStub(stack[1])
    for user, hidden in (("ann", GLOBEX), ("gus", ACME)):
        res = hist.SearchItems(
            history_pb2.SearchItemsRequest(text="a star", k=50, user_id=user, include_seen=True)
        )
        assert res.results and not {r.item.item_id for r in res.results} & set(hidden)


def test_threshold_policy_flips_with_the_threshold(stack, decider_config):
    _, channel = stack
    decider_config(threshold=-1.0)
    low = generate(channel, "gill-thr-low")
    assert [i.source for i in low.images] == [RETRIEVED] and low.images[0].item_id in {
        "p1",
        "p2",
        "p3",
        "a1",
    }
    assert low.decision.policy == gpb.DECISION_POLICY_THRESHOLD and low.decision.retrieved
    assert f">= threshold {-1.0:.2f}" in low.decision.reason

    decider_config(threshold=1.0)
    high = generate(channel, "gill-thr-high")
    assert [i.source for i in high.images] == [GENERATED] and high.images[0].item_id == ""
    assert not high.decision.retrieved and "< threshold 1.00" in high.decision.reason
    assert math.isclose(
        high.decision.score, low.decision.score, abs_tol=1e-4
    )  # same query, same best match


def test_both_returns_items_first_then_renders(stack):
    res = generate(stack[1], "gill-both", mode=gpb.RETRIEVAL_MODE_BOTH, n=1)
    assert [i.source for i in res.images] == [RETRIEVED, GENERATED]
    assert res.images[0].item_id and res.images[0].score != 0 and "both" in res.decision.reason


def test_nothing_to_retrieve(stack):
    with pytest.raises(grpc.RpcError) as err:
        generate(stack[1], "gill-lonely-ro", user="lonely", mode=gpb.RETRIEVAL_MODE_RETRIEVE_ONLY)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "include_seen" in err.value.details() and "lonely" in err.value.details()
    auto = generate(stack[1], "gill-lonely-auto", user="lonely")
    assert [i.source for i in auto.images] == [
        GENERATED
    ] and "no catalog candidates" in auto.decision.reason


def test_learned_head_trains_loads_and_decides(stack, tiny_preset, tmp_path, decider_config):
    from pigment.training.train_decision import DecisionTrainConfig, train_decision

    out = tmp_path / "head"
    metrics = train_decision(
        DecisionTrainConfig(
            out=str(out), preset=str(tiny_preset), n_users=12, n_items=216, steps=5, progress=False
        )
    )
    assert 0.0 <= metrics["macro_f1_heldout"] <= 1.0 and metrics["train_samples"] > 0
    assert json.loads((out / "metrics.json").read_text())["method"] == "gill_decision"
    head = DecisionHead.load(out)
    assert head.config["embedding_model"] == stack[0].history.embedder.model_id

    decider_config(policy="learned", head_dir=out)
    res = generate(stack[1], "gill-learned")
    assert res.decision.policy == gpb.DECISION_POLICY_LEARNED and 0.0 <= res.decision.score <= 1.0
    assert "P(retrieve)" in res.decision.reason
    assert {i.source for i in res.images} == {RETRIEVED if res.decision.retrieved else GENERATED}

    weights = out / "decision_head" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ModelNotReady, match="sha256"):
        DecisionHead.load(out)
    with pytest.raises(InvalidInput, match="decision_head"):
        DecisionConfig(policy="learned")


def write_catalog(tmp_path: Path, n: int) -> Path:
    (tmp_path / "img").mkdir()
    lines = []
    for k in range(n):
        cap, png = toy_item(k)
        if k % 2:
            lines.append(
                {"item_id": f"ing-{k}", "caption": cap, "image_b64": base64.b64encode(png).decode()}
            )
        else:
            (tmp_path / "img" / f"{k}.png").write_bytes(png)
            lines.append(
                {
                    "item_id": f"ing-{k}",
                    "caption": cap,
                    "image_path": f"img/{k}.png",
                    "attributes": {"n": k},
                }
            )
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


class Interrupting:
    """A sink that dies (like Ctrl-C) when asked for its ``fail_at``-th upsert."""

    def __init__(self, sink, fail_at: int):
        self.sink, self.fail_at, self.calls, self.upserted = sink, fail_at, 0, []

    def embedded(self, ids):
        return self.sink.embedded(ids)

    def current_model(self):
        return self.sink.current_model()

    def upsert(self, records):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        self.upserted += [r.item_id for r in records]
        return self.sink.upsert(records)


def test_ingestion_resumes_after_an_interruption(stack, tmp_path):
    st, channel = stack
    items = write_catalog(tmp_path, 10)
    first = Interrupting(GrpcSink(channel), fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        ingest(items, first, batch=4, show_progress=False)
    assert first.upserted == [f"ing-{k}" for k in range(4)]
    assert json.loads(progress_path(items).read_text())["lines_done"] == 4

    def rows():
        with st.sessions() as s:
            return {i.item_id: i for i in s.scalars(select(Item).where(Item.item_id.like("ing-%")))}

    seq_before = {k: r.change_seq for k, r in rows().items()}
    second = Interrupting(GrpcSink(channel), fail_at=0)
    report = ingest(items, second, batch=4, show_progress=False)
    assert second.upserted == [f"ing-{k}" for k in range(4, 10)]  # each item embedded once
    assert report.resumed_from == 4 and report.upserted == 6 and report.total_upserted == 10
    after = rows()
    model = st.history.embedder.model_id
    assert len(after) == 10 and all(
        r.embedding_model == model and r.embedding for r in after.values()
    )
    assert all(after[k].change_seq == seq for k, seq in seq_before.items())
    assert after["ing-0"].attributes == {"n": "0"}

    # In-process, a rerun without the progress file skips items the current model already embedded.
    local = Interrupting(LocalSink(st.history), fail_at=0)
    again = ingest(items, local, batch=4, restart=True, show_progress=False)
    assert local.upserted == [] and again.skipped == 10


def test_bad_ingest_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"item_id": "ok", "caption": "a star"}\n{"item_id": "", "caption": "x"}\n')
    with pytest.raises(InvalidInput, match=r"bad.jsonl:2: item_id"):
        ingest(path, Interrupting(None, fail_at=0), show_progress=False)


@pytest.mark.parametrize("values, needle", [([0.1] * 5, "expects"), ([float("nan")] * 32, "NaN")])
def test_bad_search_vectors_are_invalid_argument(stack, values, needle):
    hist = history_pb2_grpc.HistoryServiceStub(stack[1])
    with pytest.raises(grpc.RpcError) as err:
        hist.SearchItems(
            history_pb2.SearchItemsRequest(vector=history_pb2.EmbeddingVector(values=values), k=3)
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()


def test_unknown_item_ids_are_not_found(stack):
    hist = history_pb2_grpc.HistoryServiceStub(stack[1])
    with pytest.raises(grpc.RpcError) as err:
        hist.LogInteractions(
            history_pb2.LogInteractionsRequest(
                user_id="ann", interactions=[history_pb2.Interaction(item_id="no-such-item")]
            )
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-item" in err.value.details()
