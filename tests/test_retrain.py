"""Scheduled retraining on the tiny preset: the promotion gate, failures that leave serving untouched,
the per-user cap, live pickup by the gateway (and refusal of a modified adapter), and the beat entry."""

from __future__ import annotations

import json
import time

import grpc
import pytest
import torch
from conftest import make_settings, running_stack
from pigment.services.gateway.feedback import FeedbackCore
from pigment.services.registry import Registry
from pigment.services.render.retrain import RetrainCore
from pigment.services.store.db import make_sessionmaker, transaction
from pigment.services.store.migrate import upgrade
from pigment.services.store.tables import Generation, Item, RenderRequest, User
from safetensors.torch import save_file

KW_GOOD = ["red", "dark background", "large"]
KW_BAD = ["blue", "light background", "small"]
CAPTIONS = ["a large red star on a dark background", "a large red circle on a dark background",
            "a small blue heart on a light background", "a large red cross on a grey background",
            "a large orange star on a dark background"]


# -- fixtures: feedback rows as the gateway and the feedback endpoint write them -----------------------------
@pytest.fixture()
def db(tmp_path, tiny_preset):
    settings = make_settings(tmp_path, tiny_preset, retrain_min_pairs=2, retrain_max_pairs_per_user=4)
    upgrade(settings.database_url)
    sessions = make_sessionmaker(settings.database_url)
    with transaction(sessions) as s:
        for n, caption in enumerate(CAPTIONS):
            s.add(Item(item_id=f"item-{n}", caption=caption))
    return settings, sessions


def add_request(sessions, rid: str, user: str, keywords: list[str], method: str = "pmg_keywords") -> str:
    with transaction(sessions) as s:
        if s.get(User, user) is None:
            s.add(User(user_id=user))
            s.flush()
        s.add(RenderRequest(request_id=rid, user_id=user, params_hash="h", params={"prompt": "a star", "method": method},
                            conditioning={"keywords": keywords, "history_item_ids": [f"item-{n}" for n in range(5)]},
                            model_version="tiny", status="done", total_steps=1))
        s.flush()
        s.add(Generation(generation_id=f"g-{rid}", request_id=rid, image_index=0, user_id=user, seed=1,
                         storage_uri="x.png", model_version="tiny", method=method))
    return f"g-{rid}"


def picks(sessions, user: str, n: int, tag: str = "", same_keywords: bool = False) -> None:
    """``user`` picks the image written from KW_GOOD over one from KW_BAD, ``n`` times."""
    fb = FeedbackCore(sessions)
    for k in range(n):
        good = add_request(sessions, f"{user}-{tag}{k}-a", user, KW_GOOD)
        bad = add_request(sessions, f"{user}-{tag}{k}-b", user, KW_GOOD if same_keywords else KW_BAD)
        fb.log(feedback_id=f"{user}-{tag}{k}-pick", user_id=user, generation_id=good, kind="pick",
               other_generation_ids=[bad])


def adapter_dir(path, value: float = 0.01):
    path.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((2, 2), value)}, str(path / "adapter_model.safetensors"))
    return path


def fake_trainer(value: float = 0.01, error: Exception | None = None, seen: list | None = None):
    def train(pairs_file, out, init):
        if seen is not None:
            seen.append([json.loads(line) for line in pairs_file.read_text().splitlines()])
        if error is not None:
            raise error
        return adapter_dir(out / "adapter", value), {"loss_last": 0.5}

    return train


def scores(candidate: dict, baseline: dict):
    return lambda adapter: dict(candidate if adapter is not None and "/retrain/" in str(adapter) else baseline)


def serving(sessions, tmp_path) -> Registry:
    """A registry whose active pigeon_lora is ``v0``."""
    registry = Registry(sessions)
    registry.register("pigeon_lora", adapter_dir(tmp_path / "v0"), version="v0")
    registry.promote("v0")
    return registry


# -- the gate ------------------------------------------------------------------------------------------------
def test_improvement_is_promoted_with_its_metrics(db, tmp_path):
    settings, sessions = db
    registry = serving(sessions, tmp_path)
    picks(sessions, "u1", 3)
    core = RetrainCore(settings, sessions, trainer=fake_trainer(),
                       evaluator=scores({"joint": 0.5, "content_fidelity": 0.9}, {"joint": 0.4, "content_fidelity": 0.92}))
    result = core.run("pigeon_lora")
    assert result.status == "promoted", result.reason
    active = registry.active("pigeon_lora")
    assert active.version == result.version != "v0" and active.parent == "v0"
    assert active.metrics["candidate"]["joint"] == 0.5 and active.metrics["n_pairs"] == 3
    assert registry.get("v0").status == "retired"


@pytest.mark.parametrize("candidate, why", [
    ({"joint": 0.35, "content_fidelity": 0.95}, "joint accuracy dropped"),
    ({"joint": 0.6, "content_fidelity": 0.80}, "content fidelity dropped by 0.120"),
    ({"joint": float("nan"), "content_fidelity": 0.9}, "non-finite metrics"),
])
def test_regression_leaves_serving_untouched_and_says_why(db, tmp_path, candidate, why):
    settings, sessions = db
    registry = serving(sessions, tmp_path)
    picks(sessions, "u1", 3)
    core = RetrainCore(settings, sessions, trainer=fake_trainer(),
                       evaluator=scores(candidate, {"joint": 0.4, "content_fidelity": 0.92}))
    result = core.run("pigeon_lora")
    assert result.status == "rejected" and why in result.reason
    assert registry.active("pigeon_lora").version == "v0"
    entry = registry.get(result.version)
    assert entry.status == "rejected" and why in entry.notes and why in entry.metrics["reason"]  # `models list`
    report = json.loads((tmp_path / "data" / "retrain" / result.run_id / "report.json").read_text())
    assert report["status"] == "rejected" and why in report["reason"]


@pytest.mark.parametrize("trainer, why", [
    (fake_trainer(error=FloatingPointError("loss diverged at step 3: nan")), "training diverged"),
    (fake_trainer(value=float("nan")), "non-finite weights"),
    (fake_trainer(error=RuntimeError("CUDA out of memory")), "training crashed: RuntimeError: CUDA out of memory"),
    (fake_trainer(error=SystemExit("no preference pairs")), "training crashed: SystemExit"),
])
def test_crash_or_divergence_leaves_serving_untouched_and_says_why(db, tmp_path, trainer, why):
    settings, sessions = db
    registry = serving(sessions, tmp_path)
    picks(sessions, "u1", 3)
    evaluated = []
    core = RetrainCore(settings, sessions, trainer=trainer, evaluator=lambda a: evaluated.append(a) or {})
    result = core.run("pigeon_lora")
    assert result.status == "failed" and why in result.reason and not evaluated
    assert registry.active("pigeon_lora").version == "v0"
    entry = registry.get(result.version)
    assert entry.status == "rejected" and why in entry.notes
    with pytest.raises(Exception, match="rejected"):
        registry.promote(result.version)


def test_real_pigeon_dpo_that_diverges_is_rejected(db, tmp_path):
    """The real trainer with an absurd learning rate: NaN loss or weights, or a worse score; never promoted."""
    settings, sessions = db
    (tmp_path / "huge.yaml").write_text("steps: 3\nbatch_size: 2\nlr: 1.0e+30\nwarmup_steps: 1\n")
    settings.retrain_config = tmp_path / "huge.yaml"
    picks(sessions, "u1", 3)
    core = RetrainCore(settings, sessions, evaluator=lambda a: {"joint": 0.0 if a is not None else 0.5,
                                                               "content_fidelity": 0.9})
    result = core.run("pigeon_lora")
    assert result.status in ("failed", "rejected"), result
    assert "diverged" in result.reason or "non-finite" in result.reason or "joint accuracy dropped" in result.reason, result.reason
    assert Registry(sessions).active("pigeon_lora") is None


# -- pairs: the per-user cap, and what is skipped ---------------------------------------------------------------
def test_a_flooding_user_is_capped_per_round(db):
    settings, sessions = db  # retrain_max_pairs_per_user=4
    picks(sessions, "flooder", 40)
    picks(sessions, "u1", 3)
    picks(sessions, "u2", 2)
    picks(sessions, "u2", 5, tag="same", same_keywords=True)  # same keywords on both sides: nothing to learn
    seen = []
    core = RetrainCore(settings, sessions, trainer=fake_trainer(seen=seen),
                       evaluator=scores({"joint": 0.5, "content_fidelity": 0.9}, {"joint": 0.4, "content_fidelity": 0.9}))
    result = core.run("pigeon_lora")
    assert result.pairs_per_user == {"flooder": 4, "u1": 3, "u2": 2}
    assert result.n_feedback == 50 and result.n_pairs == 9
    rows = seen[0]
    assert len(rows) == 9 and all(r["chosen_keywords"] == KW_GOOD and r["rejected_keywords"] == KW_BAD for r in rows)
    assert rows[0]["history_captions"] == CAPTIONS and rows[0]["content"] == "a star"


def test_too_few_pairs_or_no_new_feedback_is_skipped(db, tmp_path):
    settings, sessions = db  # retrain_min_pairs=2
    picks(sessions, "u1", 1)
    core = RetrainCore(settings, sessions, trainer=fake_trainer(error=RuntimeError("boom")), evaluator=lambda a: {})
    first = core.run("pigeon_lora")
    assert first.status == "skipped" and "1 usable pairs" in first.reason
    picks(sessions, "u1", 2, tag="more")
    assert core.run("pigeon_lora").status == "failed"  # an attempt: recorded
    again = core.run("pigeon_lora")
    assert again.status == "skipped" and "no feedback since the last attempt" in again.reason
    assert Registry(sessions).active("pigeon_lora") is None


def test_only_one_run_at_a_time(db):
    settings, sessions = db
    core = RetrainCore(settings, sessions, trainer=fake_trainer(), evaluator=lambda a: {})
    with core._lock("pigeon_lora") as mine:
        assert mine
        result = core.run("pigeon_lora")
    assert result.status == "skipped" and "another pigeon_lora retrain is running" in result.reason


# -- serving picks the promoted version up live ------------------------------------------------------------------
def _generate(channel, rid: str, user: str = "alice"):
    from pigment.v1 import generation_pb2 as pb
    from pigment.v1 import generation_pb2_grpc

    return generation_pb2_grpc.GenerationServiceStub(channel).GeneratePersonalized(pb.GenerateRequest(
        request_id=rid, user_id=user, prompt="a star", num_images=1, num_inference_steps=2,
        method=pb.METHOD_PMG_KEYWORDS), timeout=120)


def _stamped(sessions, rid: str) -> tuple[dict, str | None]:
    with transaction(sessions) as s:
        row = s.get(RenderRequest, rid)
        gen = s.query(Generation).filter_by(request_id=rid).first()
        return dict(row.adapters or {}), gen.adapter_version


def test_promoted_pigeon_adapter_reaches_the_gateway_without_restart_and_a_modified_one_is_refused(
        tmp_path, tiny_preset):
    from pigment.services.history.core import InteractionRecord, ItemRecord

    (tmp_path / "quick.yaml").write_text("steps: 2\nbatch_size: 2\nwarmup_steps: 1\n")
    settings = make_settings(tmp_path, tiny_preset, retrain_min_pairs=2, retrain_config=tmp_path / "quick.yaml")
    with running_stack(settings) as (stack, channel, _):
        stack.history.upsert_items([ItemRecord(item_id=f"item-{n}", caption=c) for n, c in enumerate(CAPTIONS)],
                                   embed=False)
        stack.history.log_interactions("alice", [InteractionRecord(f"item-{n}", "like", 1.0, 0) for n in range(5)],
                                       create_user=True)
        _generate(channel, "before")
        assert "pigeon_lora" not in _stamped(stack.sessions, "before")[0]

        picks(stack.sessions, "u1", 3)
        result = RetrainCore(settings, stack.sessions, preset_dir=stack.preset_dir, evaluator=lambda a: {
            "joint": 0.5 if a is not None else 0.4, "content_fidelity": 0.9}).run("pigeon_lora")
        assert result.status == "promoted", result.reason
        _generate(channel, "after")  # same server process: no restart
        adapters, label = _stamped(stack.sessions, "after")
        assert adapters["pigeon_lora"] == result.version and f"pigeon_lora={result.version}" in label

        registry = Registry(stack.sessions)
        copy = tmp_path / "v2"
        copy.mkdir()
        for f in registry.verify(result.version).iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        registry.register("pigeon_lora", copy, version="v2")
        registry.promote("v2")
        weights = copy / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
        with pytest.raises(grpc.RpcError) as err:
            _generate(channel, "tampered")
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "refusing to load a modified or corrupt adapter" in err.value.details()


# -- Celery: the task is registered and beat sends it -------------------------------------------------------------
def test_beat_schedule_entry_only_when_enabled(tmp_path, tiny_preset):
    from pigment.services.render import retrain
    from pigment.services.render.celery_app import RETRAIN_TASK, make_celery

    assert retrain.retrain.name == RETRAIN_TASK
    off = make_celery(make_settings(tmp_path, tiny_preset))
    assert off.conf.beat_schedule == {}
    on = make_celery(make_settings(tmp_path, tiny_preset, retrain_every_s=600, retrain_queue="retrain.gpu"))
    entry = on.conf.beat_schedule["pigment-retrain"]
    assert entry["task"] == RETRAIN_TASK and entry["schedule"] == 600 and entry["args"] == ["pigeon_lora"]
    assert entry["options"]["queue"] == "retrain.gpu" and on.conf.task_routes[RETRAIN_TASK] == {"queue": "retrain.gpu"}


def test_worker_runs_beat_and_the_retrain_task(tmp_path, tiny_preset):
    """An embedded worker with retrain_every_s > 0 runs beat; the job runs in the worker and writes its report."""
    from pigment.services.stack import Worker

    settings = make_settings(tmp_path, tiny_preset, retrain_every_s=2)
    upgrade(settings.database_url)
    worker = Worker(settings).start()
    try:
        deadline = time.monotonic() + 60
        reports = []
        while not reports and time.monotonic() < deadline:
            time.sleep(0.5)
            reports = list((settings.data_dir / "retrain").glob("*/report.json"))
        assert reports, (settings.data_dir / "worker.log").read_text()[-2000:]
        report = json.loads(reports[0].read_text())
        assert report["status"] == "skipped" and "0 usable pairs" in report["reason"]
    finally:
        worker.stop()
