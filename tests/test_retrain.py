"""Scheduled retraining on the tiny preset: the promotion gate, failures that leave serving untouched,
the per-user cap, live pickup by the gateway (and refusal of a modified adapter), and the beat entry;
unet_lora (Diffusion-DPO from stored images): image pairs, missing files, the toy preset's real trainer
and gate, and live pickup by the render worker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import make_settings, running_stack
from pigment.services.common.settings import REPO_PRESETS
from pigment.services.common.storage import ImageStorage
from pigment.services.gateway.feedback import FeedbackCore
from pigment.services.registry import Registry
from pigment.services.store.db import make_sessionmaker, transaction
from pigment.services.store.migrate import upgrade
from pigment.services.store.tables import Generation, Item, ModelVersion, RenderRequest, User
from pigment.training import toy_world as tw
from pigment.training.retrain import RetrainCore
from PIL import Image
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


def _user(s, user: str) -> None:
    if s.get(User, user) is None:
        s.add(User(user_id=user))
        s.flush()


def add_request(sessions, rid: str, user: str, keywords: list[str], method: str = "pmg_keywords") -> str:
    with transaction(sessions) as s:
        _user(s, user)
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


# unet_lora: requests rendered like the gateway conditions them and the render worker stores them
GOOD = {"shape": "star", "colour": "red", "background": "dark", "size": "large"}
BAD = {"shape": "star", "colour": "blue", "background": "light", "size": "small"}


def add_rendered(settings, sessions, rid: str, user: str, images: list[dict], keywords=KW_GOOD,
                 size: int = 32) -> list[str]:
    """One pmg_keywords request whose images (toy-world drawings of ``images``) are stored as
    ``RenderCore._store`` stores them; its generation ids."""
    storage = ImageStorage(settings.storage_dir)
    with transaction(sessions) as s:
        _user(s, user)
        s.add(RenderRequest(request_id=rid, user_id=user, params_hash="h", conditioning={
            "segments": ["a star", ", ".join(keywords)], "segment_weights": [1.0, 1.0], "keywords": keywords,
            "soft_tokens": None, "soft_weight": 0.5, "history_item_ids": [f"item-{n}" for n in range(5)]},
            params={"prompt": "a star", "method": "pmg_keywords", "num_images": len(images), "height": size,
                    "width": size}, model_version="tiny", status="done", total_steps=1))
        s.flush()
        for i, attrs in enumerate(images):
            uri = storage.put(f"generations/{rid}/{i}.png", tw.png_bytes(tw.render_item(attrs, size=size)))
            s.add(Generation(generation_id=f"g-{rid}-{i}", request_id=rid, image_index=i, user_id=user, seed=i,
                             storage_uri=uri, model_version="tiny", method="pmg_keywords"))
    return [f"g-{rid}-{i}" for i in range(len(images))]


def image_picks(settings, sessions, user: str, n: int, tag: str = "") -> list[list[str]]:
    """``user`` picks the GOOD image of a request over its BAD one, ``n`` times; the generation ids."""
    fb, out = FeedbackCore(sessions), []
    for k in range(n):
        good, bad = add_rendered(settings, sessions, f"{user}-{tag}{k}", user, [GOOD, BAD])
        fb.log(feedback_id=f"{user}-{tag}{k}-pick", user_id=user, generation_id=good, kind="pick",
               other_generation_ids=[bad])
        out.append([good, bad])
    return out


def stored_path(sessions, generation_id: str) -> Path:
    with transaction(sessions) as s:
        return Path(s.get(Generation, generation_id).storage_uri.removeprefix("file://"))


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
    (fake_trainer(value=float("nan")), "non-finite or exploded weights"),
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
    """The real trainer with an absurd learning rate (the loss or the weights go non-finite): the divergence
    check alone stops it, since the evaluator here would promote any candidate."""
    settings, sessions = db
    (tmp_path / "huge.yaml").write_text("steps: 3\nbatch_size: 2\nlr: 1.0e+30\nwarmup_steps: 1\n")
    settings.retrain_config = tmp_path / "huge.yaml"
    picks(sessions, "u1", 3)
    core = RetrainCore(settings, sessions, evaluator=lambda a: {"joint": 1.0 if a is not None else 0.5,
                                                               "content_fidelity": 0.9})
    result = core.run("pigeon_lora")
    assert result.status == "failed" and result.reason.startswith("training diverged"), result
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
def _generate(channel, rid: str, user: str = "alice", n: int = 1, seed: int = 0):
    from pigment.v1 import generation_pb2 as pb
    from pigment.v1 import generation_pb2_grpc

    return generation_pb2_grpc.GenerationServiceStub(channel).GeneratePersonalized(pb.GenerateRequest(
        request_id=rid, user_id=user, prompt="a star", num_images=n, num_inference_steps=2,
        method=pb.METHOD_PMG_KEYWORDS, seed=seed), timeout=120)


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
        stack.history.log_interactions("alice", [InteractionRecord(f"item-{n}", "like", 1.0) for n in range(5)],
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


# -- unet_lora: Diffusion-DPO from the stored images -----------------------------------------------------------------
def test_unet_lora_pairs_with_missing_images_are_skipped_and_counted(db, tmp_path):
    from pigment.training.train_diffusion_dpo import read_image_pairs

    settings, sessions = db
    shown = image_picks(settings, sessions, "u1", 3)
    stored_path(sessions, shown[1][1]).unlink()  # e.g. expired by a storage lifecycle rule
    with transaction(sessions) as s:  # a retrieved catalog image picked over a rendered one
        s.get(Generation, shown[2][1]).retrieved_item_id = "item-0"
    seen = []
    core = RetrainCore(settings, sessions, trainer=fake_trainer(seen=seen),
                       evaluator=scores({"joint": 0.5, "content_fidelity": 0.9}, {"joint": 0.4, "content_fidelity": 0.9}))
    result = core.run("unet_lora")
    assert result.status == "skipped" and result.n_pairs == 1 and not seen
    assert result.n_skipped == {"missing image": 1, "retrieved image": 1}
    assert "(pairs left out: 1 missing image, 1 retrieved image)" in result.reason
    report = json.loads((tmp_path / "data" / "retrain" / result.run_id / "report.json").read_text())
    assert report["n_skipped"] == {"missing image": 1, "retrieved image": 1}

    image_picks(settings, sessions, "u2", 2)
    stored_path(sessions, "g-u2-0-0").unlink()
    result = core.run("unet_lora")
    assert result.status == "promoted", result.reason
    assert result.n_pairs == 2 and result.pairs_per_user == {"u1": 1, "u2": 1}
    assert result.n_skipped == {"missing image": 2, "retrieved image": 1}
    assert Registry(sessions).active("unet_lora").version == result.version
    rows = seen[0]
    assert [r["segments"] for r in rows] == [["a star", ", ".join(KW_GOOD)]] * 2
    pairs = read_image_pairs(tmp_path / "data" / "retrain" / result.run_id / "pairs.jsonl")
    good, bad = (np.asarray(Image.open(stored_path(sessions, g)).convert("RGB")) for g in shown[0])
    assert all((p.chosen == good).all() and (p.rejected == bad).all() for p in pairs)  # copied, not re-rendered


def test_unet_lora_needs_both_images_from_the_same_conditioning(db):
    settings, sessions = db
    fb = FeedbackCore(sessions)
    for k in range(3):  # two requests with different keyword lists: a Pigeon pair, not a Diffusion-DPO one
        (good,) = add_rendered(settings, sessions, f"kw-{k}-a", "u1", [GOOD], keywords=KW_GOOD)
        (bad,) = add_rendered(settings, sessions, f"kw-{k}-b", "u1", [BAD], keywords=KW_BAD)
        fb.log(feedback_id=f"kw-{k}", user_id="u1", generation_id=good, kind="pick", other_generation_ids=[bad])
    (big,) = add_rendered(settings, sessions, "big-a", "u1", [GOOD], size=64)  # same prompt, another size
    (small,) = add_rendered(settings, sessions, "big-b", "u1", [BAD], size=32)
    fb.log(feedback_id="big", user_id="u1", generation_id=big, kind="pick", other_generation_ids=[small])
    result = RetrainCore(settings, sessions, trainer=fake_trainer(), evaluator=lambda a: {}).run("unet_lora")
    assert result.status == "skipped" and result.n_pairs == 0
    assert result.n_skipped == {"different conditioning": 3, "not the preset's size": 1}


def test_unet_lora_retrain_on_the_toy_preset_registers_a_version(tmp_path):
    """Logged picks -> image pairs -> the real Diffusion-DPO trainer (2 steps) -> the real gate (4 windows)."""
    toy = REPO_PRESETS / "toy"
    (tmp_path / "quick.yaml").write_text("steps: 2\nbatch_size: 2\nwarmup_steps: 1\n")
    settings = make_settings(tmp_path, toy, retrain_min_pairs=2, retrain_eval_samples=4,
                             retrain_config=tmp_path / "quick.yaml")
    upgrade(settings.database_url)
    sessions = make_sessionmaker(settings.database_url)
    image_picks(settings, sessions, "u1", 2)
    image_picks(settings, sessions, "u2", 1)
    core = RetrainCore(settings, sessions)
    result = core.run("unet_lora")
    assert result.status in ("promoted", "rejected"), result.reason
    assert result.n_pairs == 3 and result.n_skipped == {}
    run_dir = tmp_path / "data" / "retrain" / result.run_id
    rows = [json.loads(line) for line in (run_dir / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and len(list((run_dir / "images").glob("*.png"))) == 6
    assert rows[0]["content"] == "a star" and rows[0]["keywords"] == KW_GOOD
    with transaction(sessions) as s:
        entry = s.get(ModelVersion, result.version)
    assert entry.kind == "unet_lora" and entry.path == str(run_dir / "train" / "unet_lora")
    assert (run_dir / "train" / "unet_lora" / "pytorch_lora_weights.safetensors").is_file()
    m = entry.metrics
    assert m["train"]["steps"] == 2 and m["train"]["pairs"] == 3 and m["n_pairs"] == 3
    assert m["candidate"]["method"] == "diffusion_dpo" and m["baseline"]["method"] == "pmg_keywords"
    assert m["candidate"]["n_samples"] == m["baseline"]["n_samples"] == 4
    assert m["candidate"]["seed"] == m["baseline"]["seed"] == settings.retrain_eval_seed
    # whichever way the 2-step candidate scores, the gate's decision must be the one its rule gives
    why = core.regression(m["candidate"], m["baseline"])
    assert (result.status, entry.status) == (("rejected", "rejected") if why else ("promoted", "active"))
    if why:
        assert entry.notes.startswith(f"regressed: {why}")


def test_promoted_unet_lora_reaches_the_render_worker_without_restart(tmp_path, tiny_preset):
    """Picks between one request's images -> unet_lora promoted -> the running worker renders with it; the next
    round continues from it."""
    from pigment.services.history.core import InteractionRecord, ItemRecord

    (tmp_path / "quick.yaml").write_text("steps: 2\nbatch_size: 2\nwarmup_steps: 1\nlr: 0.01\n")
    settings = make_settings(tmp_path, tiny_preset, retrain_min_pairs=2, retrain_config=tmp_path / "quick.yaml")
    evaluator = lambda a: {"joint": 0.5 if a is not None else 0.4, "content_fidelity": 0.9}
    with running_stack(settings) as (stack, channel, _):
        stack.history.upsert_items([ItemRecord(item_id=f"item-{n}", caption=c) for n, c in enumerate(CAPTIONS)],
                                   embed=False)
        stack.history.log_interactions("alice", [InteractionRecord(f"item-{n}", "like", 1.0) for n in range(5)],
                                       create_user=True)
        fb = FeedbackCore(stack.sessions)

        def pick(rid: str) -> None:
            first, second = (i.generation_id for i in _generate(channel, rid, n=2).images)
            fb.log(feedback_id=f"{rid}-pick", user_id="alice", generation_id=first, kind="pick",
                   other_generation_ids=[second])

        before = _generate(channel, "before", seed=7).images[0].png
        pick("r1")
        pick("r2")
        core = RetrainCore(settings, stack.sessions, preset_dir=stack.preset_dir, evaluator=evaluator)
        first = core.run("unet_lora")
        assert first.status == "promoted" and first.n_pairs == 2, first.reason
        after = _generate(channel, "after", seed=7).images[0].png  # same server and worker: no restart
        adapters, label = _stamped(stack.sessions, "after")
        assert adapters["unet_lora"] == first.version and f"unet_lora={first.version}" in label
        assert after != before  # rendered with the LoRA

        pick("r3")
        pick("r4")
        second = core.run("unet_lora")
        assert second.status == "promoted" and second.baseline_version == first.version, second.reason
        meta = json.loads((Registry(stack.sessions).verify(second.version) / "adapter.json").read_text())
        assert meta["init_adapter"] == Registry(stack.sessions).get(first.version).path
        _generate(channel, "later")
        assert _stamped(stack.sessions, "later")[0]["unet_lora"] == second.version


# -- Celery: the task is registered and beat sends it -------------------------------------------------------------
def test_beat_schedule_entry_only_when_enabled(tmp_path, tiny_preset):
    from pigment.services.render.celery_app import RETRAIN_TASK, make_celery
    from pigment.training import retrain

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
