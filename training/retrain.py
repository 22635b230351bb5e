"""Scheduled retraining: logged feedback -> preference pairs -> train -> evaluate -> register (or not).

``RetrainCore.run(kind)`` is plain code (tests and benches call it directly);
the Celery task ``pigment.retrain`` wraps it for the worker, and beat sends it
every ``retrain_every_s`` (``celery_app.retrain_schedule``) for ``retrain_kind``.
Two kinds (``KIND_SPECS``: kind -> its pairs, trainer and evaluator):

- ``pigeon_lora``: Pigeon DPO on the keyword LLM (training/train_pigeon.py),
  from pairs of images written from different keyword lists;
- ``unet_lora``: Diffusion-DPO on a UNet LoRA (training/train_diffusion_dpo.py),
  from pairs of images rendered from the same conditioning (typically the
  images of one request).

One run:

1. feedback since the active version of ``kind`` was created (all feedback when
   none is), skipped when nothing arrived since the last attempt;
2. pairs (training/pairs.py: picks, then explicit ratings; contradictions
   dropped; at most ``retrain_max_pairs_per_user`` per user, so one user
   flooding feedback cannot outweigh the others), kept only where ``kind`` can
   learn from them, read from each generation's RenderRequest conditioning:
   pigeon_lora, the two keyword lists differ (with the history captions the LLM
   saw); unet_lora, both images were rendered (not retrieved) from the same
   segments, segment weights and soft tokens at the preset's size, and both
   image files still exist (they are copied next to ``pairs.jsonl``, paths
   relative to it). Pairs left out are counted by reason (``n_skipped``);
3. train, starting from the active adapter of ``kind`` when there is one;
4. evaluate with the promotion gate chosen by name (``retrain_gate``, else the
   preset's manifest ``retrain.gate``, else ``preference``): ``preference``
   (training/gate.py, any preset) holds out a quarter of the round's pairs from
   training and scores held-out preference accuracy (DPO's implicit reward) plus
   a CLIP content guard; ``toy`` scores the toy world's held-out users
   (training/eval.py, ``retrain_eval_samples`` windows of the test-users split,
   seed ``retrain_eval_seed``; the candidate as eval's ``pigeon_dpo`` or
   ``diffusion_dpo`` row). Either way against the serving model on the same data;
5. register the adapter with its metrics and promote it only if ``joint``
   does not drop and content fidelity stays within ``retrain_max_fidelity_drop``.

Every attempt that gets as far as training is recorded in the registry: the
promoted version is ``active``; a regression, a crash or a divergence (NaN loss
or weights) is a ``rejected`` version whose ``notes`` say why (its path is the
run directory, with ``report.json``), and the serving version stays untouched.
``pigment models list`` shows them all; ``report.json`` per run under
``data_dir/retrain/``. A promoted version is picked up without a restart (the
gateway's encoder applies pigeon_lora, render workers unet_lora; both through
the registry's per-version caches); requests in flight keep theirs.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import secrets
import time
import traceback
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

from celery import shared_task
from pigment.services.common import metrics
from pigment.services.common.storage import ImageStorage
from pigment.services.registry import Registry
from pigment.services.render.celery_app import RETRAIN_TASK
from pigment.services.store.db import transaction
from pigment.services.store.tables import Item, ModelVersion, RenderRequest
from sqlalchemy import select

log = logging.getLogger("pigment.retrain")
KEYWORD_METHODS = ("pmg", "pmg_keywords")
# Trainer defaults for a retrain round (PigeonTrainConfig fields; `retrain_config` YAML overrides them):
# logged pairs only (the loop measures what feedback teaches), no history masking unless an adapter
# learned one (a fresh mask generator would drop tokens at random), a short run with a strong KL anchor
# (beta 1): on the toy keyword LLM, 120 steps at lr 5e-4 / beta 0.1 over-optimised a few hundred pairs
# (keyword joint 0.70 -> 0.32 on held-out users) while 80 steps at 3e-4 / beta 1 gained (0.70 -> 0.72).
PIGEON_DEFAULTS = {"stage": "dpo", "auto_pairs": 0, "keep_ratio": 1.0, "train_mask": False, "steps": 80,
                   "batch_size": 16, "lr": 3e-4, "warmup_steps": 10, "beta": 1.0, "checkpoint_every": 1000}
# DiffusionDPOConfig fields for a retrain round (`retrain_config` YAML overrides them): a short run with the
# strong end of the paper's beta range (2000-5000), so a few hundred logged pairs nudge the serving UNet
# rather than replace what it renders. On the toy preset (35 pairs from 400 simulated picks among four images
# of one conditioning) these left the gate's 48 windows unchanged (joint 0.625, content 0.875), while 200 steps
# at lr 1e-3 cost content fidelity (0.875 -> 0.854).
DIFFUSION_DPO_DEFAULTS = {"steps": 40, "batch_size": 8, "lr": 1e-4, "warmup_steps": 5, "beta": 5000.0,
                          "checkpoint_every": 1000}
# What a generation was rendered from (the gateway's RenderRequest.conditioning). Diffusion-DPO compares two
# images for one prompt, so a unet_lora pair needs these equal on both sides; sampler settings, seeds and
# model versions may differ (off-policy images are fine: the paper's Pick-a-Pic pairs came from several
# models). The trainer conditions on the text segments; soft tokens, equal on both sides, are not its input.
RENDERED_FROM = ("segments", "segment_weights", "soft_tokens", "soft_weight")


@dataclass
class KeywordPair:
    """One DPO example: the history the LLM saw, the request's content, the two keyword lists."""

    user_id: str
    history: list[str]
    content: str
    chosen: list[str]
    rejected: list[str]
    source: str

    def to_json(self) -> dict:
        return {"history_captions": self.history, "content": self.content, "chosen_keywords": self.chosen,
                "rejected_keywords": self.rejected, "source": self.source, "user_id": self.user_id}


@dataclass
class ImagePair:
    """One Diffusion-DPO example: the conditioning both images were rendered from, and where they are stored."""

    user_id: str
    content: str
    keywords: list[str]
    segments: list[str]
    chosen_uri: str
    rejected_uri: str
    source: str

    def to_json(self, chosen_image: str, rejected_image: str) -> dict:
        # segments (what was rendered) win over content + keywords in read_image_pairs
        return {"content": self.content, "keywords": self.keywords, "segments": self.segments,
                "chosen_image": chosen_image, "rejected_image": rejected_image, "source": self.source,
                "user_id": self.user_id}


@dataclass
class RetrainResult:
    run_id: str
    kind: str
    status: str  # promoted | rejected | failed | skipped
    reason: str
    version: str | None = None
    baseline_version: str | None = None
    n_feedback: int = 0
    n_pairs: int = 0
    pairs_per_user: dict[str, int] = field(default_factory=dict)
    n_skipped: dict[str, int] = field(default_factory=dict)  # pairs left out, by reason (e.g. "missing image")
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    run_dir: str = ""


class RetrainCore:
    """``trainer(pairs_file, out_dir, init_adapter) -> (adapter_dir, train_metrics)``;
    ``evaluator(adapter_dir | None) -> {"joint", "content_fidelity", ...}`` (None: the preset alone).
    Either left out: the run's kind's own (``KIND_SPECS``)."""

    def __init__(self, settings, sessions, registry: Registry | None = None, preset_dir: Path | None = None,
                 trainer: Callable | None = None, evaluator: Callable | None = None):
        self.settings = settings
        self.sessions = sessions
        self.registry = registry or Registry(sessions)
        self.preset_dir = Path(preset_dir or settings.preset_dir)
        self.trainer, self.evaluator = trainer, evaluator
        self.storage = ImageStorage(settings.storage_dir)  # where the gateway's workers wrote the images
        self.root = Path(settings.data_dir) / "retrain"

    # -- one run ----------------------------------------------------------------------------------
    def run(self, kind: str | None = None, force: bool = False) -> RetrainResult:
        kind = kind or self.settings.retrain_kind
        if kind not in KIND_SPECS:
            raise ValueError(f"kind={kind!r} cannot be retrained from feedback: allowed {', '.join(KIND_SPECS)}")
        run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
        result = RetrainResult(run_id, kind, "running", "", run_dir=str(self.root / run_id))
        t0 = time.perf_counter()
        with self._lock(kind) as locked:
            if not locked:
                result.status, result.reason = "skipped", f"another {kind} retrain is running"
            else:
                try:
                    self._run(result, force)
                except Exception as exc:  # e.g. the database: recorded, serving untouched
                    result.status, result.reason = "failed", f"retrain job failed: {type(exc).__name__}: {exc}"
                    log.exception("retrain %s %s failed", kind, run_id)
        result.seconds = round(time.perf_counter() - t0, 1)
        metrics.RETRAIN_RUNS.labels(kind, result.status).inc()  # the promotion gate's outcome
        metrics.RETRAIN_SECONDS.labels(kind).observe(result.seconds)
        self._write_report(result)
        log.info("retrain %s %s: %s (%s)", kind, run_id, result.status, result.reason)
        return result

    def _run(self, result: RetrainResult, force: bool) -> None:
        active = self.registry.active(result.kind)
        result.baseline_version = active.version if active else None
        feedback, pairs, result.n_skipped = self.collect(result.kind, active)
        result.n_feedback = len(feedback)
        result.n_pairs = len(pairs)
        result.pairs_per_user = dict(Counter(p.user_id for p in pairs))
        last = self._last_attempt(result.kind)
        if not force and last is not None and not any(_aware(fb.created_at) > _aware(last.created_at)
                                                      for fb in feedback):
            result.status, result.reason = "skipped", f"no feedback since the last attempt ({last.version})"
            return
        if len(pairs) < self.settings.retrain_min_pairs:
            result.status = "skipped"
            result.reason = (f"{len(pairs)} usable pairs from {len(feedback)} feedback signals{_left_out(result)}; "
                             f"retrain_min_pairs is {self.settings.retrain_min_pairs}")
            return
        run_dir = Path(result.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        pairs_file = run_dir / "pairs.jsonl"
        spec = KIND_SPECS[result.kind]
        evaluator = self.evaluator
        gate = self.gate_name()
        if evaluator is None and gate == "preference":  # held-out pairs: never trained on, scored by the gate
            pairs, heldout = split_heldout(pairs)
            if not heldout:
                result.status, result.reason = "skipped", f"{len(pairs)} pairs leave none to hold out for the gate"
                return
            held_file = run_dir / "heldout" / "pairs.jsonl"  # its own dir: image copies never share names
            held_file.parent.mkdir()
            spec.write(self, heldout, held_file)
            from pigment.training.gate import make_gate

            evaluator = make_gate(self.settings, self.preset_dir, result.kind, held_file)
        elif evaluator is None:
            evaluator = GATES[gate](self.settings, self.preset_dir, result.kind)
        result.metrics["gate"] = gate if self.evaluator is None else "custom"
        spec.write(self, pairs, pairs_file)
        adapter = self._train(result, pairs_file, active, self.trainer or spec.trainer(self.settings, self.preset_dir))
        if adapter is None:
            return
        self._judge(result, adapter, active, evaluator)

    def gate_name(self) -> str:
        """``retrain_gate``, else the preset's manifest ``retrain.gate``, else ``preference`` (any preset)."""
        from pigment.models.loader import read_manifest

        name = (self.settings.retrain_gate or read_manifest(self.preset_dir).get("retrain", {}).get("gate")
                or "preference")
        if name not in (*GATES, "preference"):
            raise ValueError(f"retrain_gate={name!r} is unknown: allowed preference, {', '.join(GATES)}")
        return name

    # -- feedback -> pairs ---------------------------------------------------------------------------
    def collect(self, kind: str, active: ModelVersion | None) -> tuple[list, list, dict[str, int]]:
        """Feedback since ``active`` was created, the capped pairs ``kind`` learns from (usable ones are
        capped, so a user's unusable pairs do not use up their share), and the pairs left out, by reason."""
        from pigment.training.pairs import build_pairs, cap_per_user, load_feedback

        since = _aware(active.created_at) if active is not None else None
        with transaction(self.sessions) as s:
            feedback, generations = load_feedback(s, since)
            requests = {r.request_id: r for r in s.scalars(select(RenderRequest).where(
                RenderRequest.request_id.in_({g.request_id for g in generations.values()})))}
            make = KIND_SPECS[kind].pairs(self, s, requests)
        usable, skipped = {}, Counter()
        for p in build_pairs(feedback, generations, max_per_user=1 << 30):
            pair = make(p, generations[p.chosen], generations[p.rejected])
            if isinstance(pair, str):
                skipped[pair] += 1
            else:
                usable[(p.user_id, p.chosen, p.rejected)] = (p, pair)
        capped = cap_per_user([p for p, _ in usable.values()], self.settings.retrain_max_pairs_per_user)
        return feedback, [usable[(p.user_id, p.chosen, p.rejected)][1] for p in capped], dict(skipped)

    # -- training ------------------------------------------------------------------------------------
    def _train(self, result: RetrainResult, pairs_file: Path, active: ModelVersion | None,
               trainer: Callable) -> Path | None:
        try:
            init = self.registry.verify(active) if active is not None else None  # refuses a modified adapter
            adapter, train_metrics = trainer(pairs_file, Path(result.run_dir), init)
            result.metrics["train"] = _summary(train_metrics)
            bad = _non_finite(adapter)
            if bad:
                raise FloatingPointError(f"the trained adapter has non-finite or exploded weights ({bad})")
            return Path(adapter)
        except FloatingPointError as exc:
            self._record_failure(result, "training diverged", exc)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - any trainer failure is recorded, serving untouched
            self._record_failure(result, "training crashed", exc)
        return None

    def _record_failure(self, result: RetrainResult, what: str, exc: BaseException) -> None:
        result.status = "failed"
        result.reason = f"{what}: {type(exc).__name__}: {exc}"
        result.metrics["traceback"] = traceback.format_exc(limit=8)
        record = Path(result.run_dir) / "failure.json"  # what the registry entry points at (never rewritten)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(asdict(result), indent=2, default=str))
        result.version = self._register_rejected(result, record, result.reason)

    # -- evaluation and the promotion gate --------------------------------------------------------------
    def _judge(self, result: RetrainResult, adapter: Path, active: ModelVersion | None,
               evaluator: Callable) -> None:
        try:
            candidate = evaluator(adapter)
            baseline = self._baseline(result.kind, active, evaluator)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - an evaluation failure rejects the candidate
            self._record_failure(result, "evaluation failed", exc)
            return
        result.metrics.update(candidate=candidate, baseline=baseline)
        reason = self.regression(candidate, baseline)
        summary = (f"joint {candidate['joint']:.3f} vs {baseline['joint']:.3f}, content fidelity "
                   f"{candidate['content_fidelity']:.3f} vs {baseline['content_fidelity']:.3f} "
                   f"(serving: {result.baseline_version or 'preset'}); {result.n_pairs} pairs from "
                   f"{result.n_feedback} feedback signals{_left_out(result)}")
        if reason:
            result.status, result.reason = "rejected", f"regressed: {reason}; {summary}"
            result.version = self._register_rejected(result, adapter, result.reason)
            return
        row = self.registry.register(result.kind, adapter, version=f"{result.kind}-{result.run_id}",
                                     parent=result.baseline_version, metrics=self._version_metrics(result),
                                     notes=f"retrain {result.run_id}")
        self.registry.promote(row.version, notes=f"promoted: {summary}")
        result.status, result.reason, result.version = "promoted", summary, row.version

    def regression(self, candidate: dict, baseline: dict) -> str:
        """Why ``candidate`` may not replace ``baseline`` ("" if it may)."""
        if not all(math.isfinite(float(candidate.get(k, math.nan))) for k in ("joint", "content_fidelity")):
            return f"evaluation returned non-finite metrics {candidate}"
        if candidate["joint"] < baseline["joint"]:
            return f"joint accuracy dropped ({candidate['joint']:.3f} < {baseline['joint']:.3f})"
        drop = baseline["content_fidelity"] - candidate["content_fidelity"]
        if drop > self.settings.retrain_max_fidelity_drop:
            return (f"content fidelity dropped by {drop:.3f} (more than {self.settings.retrain_max_fidelity_drop}: "
                    f"{candidate['content_fidelity']:.3f} vs {baseline['content_fidelity']:.3f})")
        return ""

    def _baseline(self, kind: str, active: ModelVersion | None, evaluator: Callable) -> dict:
        """The serving model on the gate's windows: the active version's recorded score, else scored now."""
        if getattr(evaluator, "fresh_baseline", False):  # scored on this round's held-out data only
            return evaluator(self.registry.verify(active) if active is not None else None)
        recorded = (active.metrics or {}).get("candidate") if active is not None else None
        if recorded and (recorded.get("n_samples"), recorded.get("seed")) in (
                (None, None), (self.settings.retrain_eval_samples, self.settings.retrain_eval_seed)):
            return recorded
        if active is not None:
            return evaluator(self.registry.verify(active))
        from pigment.models.loader import preset_version

        key = (f"{kind}-{preset_version(self.preset_dir)}-n{self.settings.retrain_eval_samples}"
               f"-s{self.settings.retrain_eval_seed}")
        cache = self.root / f"baseline-{key}.json"
        if cache.is_file():
            return json.loads(cache.read_text())
        score = evaluator(None)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(score))
        return score

    # -- records ---------------------------------------------------------------------------------------
    def _version_metrics(self, result: RetrainResult) -> dict:
        return {**{k: v for k, v in result.metrics.items() if k != "traceback"}, "run_id": result.run_id,
                "n_feedback": result.n_feedback, "n_pairs": result.n_pairs, "n_skipped": result.n_skipped,
                "max_pairs_per_user": max(result.pairs_per_user.values(), default=0)}

    def _register_rejected(self, result: RetrainResult, path: Path, reason: str) -> str:
        row = self.registry.register(result.kind, path, version=f"{result.kind}-{result.run_id}",
                                     parent=result.baseline_version,
                                     metrics={**self._version_metrics(result), "reason": reason},
                                     notes=f"retrain {result.run_id}")
        with transaction(self.sessions) as s:
            entry = s.get(ModelVersion, row.version)
            entry.status, entry.notes = "rejected", f"{entry.notes}\n{reason}".strip()
        return row.version

    def _last_attempt(self, kind: str) -> ModelVersion | None:
        with transaction(self.sessions) as s:
            return s.scalars(select(ModelVersion).where(ModelVersion.kind == kind)
                             .order_by(ModelVersion.created_at.desc())).first()

    def _write_report(self, result: RetrainResult) -> None:
        """``run_dir/report.json``, written once at the end of a run (atomically: readers poll for it)."""
        path = Path(result.run_dir) / "report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(result), indent=2, default=str))
        tmp.replace(path)

    @contextmanager
    def _lock(self, kind: str):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{kind}.lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


# -- feedback -> pairs, per kind: ``pairs(core, session, requests)`` returns ``make(pair, chosen, rejected)``
# -> the kind's example or why there is none; ``write(core, pairs, path)`` writes the trainer's JSONL ---------
def keyword_pairs(core: RetrainCore, session, requests: dict[str, RenderRequest]) -> Callable:
    """pigeon_lora: two keyword lists for one history (``_keyword_pair``)."""
    item_ids = {i for r in requests.values() for i in r.conditioning.get("history_item_ids", [])}
    captions = dict(session.execute(select(Item.item_id, Item.caption).where(Item.item_id.in_(item_ids))).all())
    return lambda p, chosen, rejected: _keyword_pair(p, requests[chosen.request_id], requests[rejected.request_id],
                                                     captions)


def _keyword_pair(p, chosen: RenderRequest, rejected: RenderRequest, captions: dict[str, str]) -> KeywordPair | str:
    """The DPO example behind a generation pair, or why there is none (e.g. both images had the same keywords)."""
    if chosen.params.get("method") not in KEYWORD_METHODS or rejected.params.get("method") not in KEYWORD_METHODS:
        return "not a keyword method"
    kw_w, kw_l = list(chosen.conditioning.get("keywords") or []), list(rejected.conditioning.get("keywords") or [])
    if not kw_w or not kw_l or kw_w == kw_l:
        return "same keywords"
    history = [captions[i] for i in chosen.conditioning.get("history_item_ids", []) if i in captions]
    if not history:
        return "no history captions"
    return KeywordPair(p.user_id, history, chosen.params.get("prompt", ""), kw_w, kw_l, p.source)


def write_keyword_pairs(core: RetrainCore, pairs: list[KeywordPair], path: Path) -> None:
    _write_jsonl(path, [p.to_json() for p in pairs])


def image_pairs(core: RetrainCore, session, requests: dict[str, RenderRequest]) -> Callable:
    """unet_lora: two rendered images of one conditioning (``RENDERED_FROM``) whose files still exist."""
    from pigment.models.loader import sampler_defaults

    defaults = sampler_defaults(core.preset_dir)
    size = (int(defaults["height"]), int(defaults["width"]))
    exists = lru_cache(maxsize=None)(core.storage.exists)  # a picked image recurs in each of its pairs

    def make(p, chosen, rejected) -> ImagePair | str:
        if chosen.retrieved_item_id or rejected.retrieved_item_id:
            return "retrieved image"  # a catalog image, not rendered from the request's conditioning
        req_w, req_l = requests[chosen.request_id], requests[rejected.request_id]
        cond = {k: req_w.conditioning.get(k) for k in RENDERED_FROM}
        if not cond["segments"] or cond != {k: req_l.conditioning.get(k) for k in RENDERED_FROM}:
            return "different conditioning"
        if {(r.params.get("height"), r.params.get("width")) for r in (req_w, req_l)} != {size}:
            return "not the preset's size"  # the trainer batches one latent shape; the gate renders this size
        if not all(g.storage_uri and exists(g.storage_uri) for g in (chosen, rejected)):
            return "missing image"
        return ImagePair(p.user_id, req_w.params.get("prompt", ""), list(req_w.conditioning.get("keywords") or []),
                         list(cond["segments"]), chosen.storage_uri, rejected.storage_uri, p.source)

    return make


def write_image_pairs(core: RetrainCore, pairs: list[ImagePair], path: Path) -> None:
    """Copies each image once under ``images/`` next to the JSONL: the run directory keeps what was trained on,
    and the storage may be remote. A file deleted since ``collect`` checked it fails the run (recorded)."""
    names: dict[str, str] = {}
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    for uri in (u for p in pairs for u in (p.chosen_uri, p.rejected_uri) if u not in names):
        names[uri] = f"images/{len(names):05d}.png"
        (path.parent / names[uri]).write_bytes(core.storage.get(uri))
    _write_jsonl(path, [p.to_json(names[p.chosen_uri], names[p.rejected_uri]) for p in pairs])


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _left_out(result: RetrainResult) -> str:
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(result.n_skipped.items()))
    return f" (pairs left out: {skipped})" if skipped else ""


def _aware(stamp: datetime | None) -> datetime | None:
    """SQLite returns naive UTC datetimes; PostgreSQL aware ones."""
    return stamp.replace(tzinfo=UTC) if stamp is not None and stamp.tzinfo is None else stamp


def _summary(metrics: dict) -> dict:
    return {k: v for k, v in (metrics or {}).items() if k not in ("history", "config")}


EXPLODED_WEIGHT = 1e4  # an adapter weight this large came from a diverged run (Adam keeps huge-lr weights finite)


def _non_finite(adapter: Path) -> str:
    """Names of tensors with NaN/inf or exploded values in an adapter's safetensors files ("" when sane)."""
    import torch
    from safetensors.torch import load_file

    adapter = Path(adapter)
    files = [adapter] if adapter.is_file() else sorted(adapter.rglob("*.safetensors"))
    bad = [f"{f.name}:{k}" for f in files for k, v in load_file(f).items()
           if v.is_floating_point() and v.numel()
           and not (torch.isfinite(v).all() and v.abs().max().item() < EXPLODED_WEIGHT)]
    return ", ".join(bad[:5])


# -- the default trainers and evaluator ------------------------------------------------------------------------
def _trainer_overrides(settings, defaults: dict) -> dict:
    """A round's trainer config: the kind's defaults, then the `retrain_config` YAML."""
    import yaml

    overrides = dict(defaults)
    if settings.retrain_config:
        overrides.update(yaml.safe_load(Path(settings.retrain_config).read_text()) or {})
    return overrides


def pigeon_trainer(settings, preset_dir: Path) -> Callable:
    def train(pairs_file: Path, out: Path, init_adapter: Path | None) -> tuple[Path, dict]:
        from pigment.training.train_pigeon import PigeonTrainConfig, build_trainer

        overrides = _trainer_overrides(settings, PIGEON_DEFAULTS)
        if init_adapter is not None:  # continue from the serving adapter, with its own mask ratio
            meta = json.loads((Path(init_adapter) / "pigeon.json").read_text())
            overrides.update(init_adapter=str(init_adapter), keep_ratio=float(meta["keep_ratio"]))
        overrides.update(preset=str(preset_dir), out=str(out / "train"), pairs_file=str(pairs_file))
        cfg = PigeonTrainConfig.load(None, **overrides)
        metrics = build_trainer(cfg).train()
        return Path(metrics["adapter"]), metrics

    return train


def diffusion_dpo_trainer(settings, preset_dir: Path) -> Callable:
    def train(pairs_file: Path, out: Path, init_adapter: Path | None) -> tuple[Path, dict]:
        from pigment.training.train_diffusion_dpo import (
            DiffusionDPOConfig,
            DiffusionDPOTrainer,
            read_image_pairs,
        )

        overrides = _trainer_overrides(settings, DIFFUSION_DPO_DEFAULTS)
        if init_adapter is not None:  # continue from the serving LoRA
            overrides.update(init_adapter=str(init_adapter))
        overrides.update(preset=str(preset_dir), out=str(out / "train"), pairs=str(pairs_file))
        trainer = DiffusionDPOTrainer(DiffusionDPOConfig.load(None, **overrides))
        trainer.prepare(read_image_pairs(pairs_file))
        metrics = trainer.train()
        return Path(metrics["adapter"]), metrics

    return train


def toy_evaluator(settings, preset_dir: Path, row: str = "pigeon_dpo") -> Callable:
    """Joint favourite-attribute accuracy and content fidelity of the keyword path (pigment eval): the adapter
    as eval's ``row`` (pigeon_dpo: keywords; diffusion_dpo: the UNet), None as the preset's ``pmg_keywords``."""

    def evaluate_adapter(adapter_dir: Path | None) -> dict:
        from pigment.training.eval import evaluate

        method = row if adapter_dir is not None else "pmg_keywords"
        report = evaluate(preset_dir, "test-users", [method], settings.retrain_eval_samples,
                          seed=settings.retrain_eval_seed, adapters={row: str(adapter_dir)} if adapter_dir else None)
        m = report["methods"][method]
        return {"joint": m["preference_accuracy"]["joint"], "content_fidelity": m["content_fidelity"],
                "preference_accuracy": m["preference_accuracy"], "split": report["split"],
                "n_samples": report["n_samples"], "seed": settings.retrain_eval_seed, "method": method}

    return evaluate_adapter


def toy_gate(settings, preset_dir: Path, kind: str) -> Callable:
    """The toy world's evaluator as a promotion gate (the toy preset names it in its manifest)."""
    return toy_evaluator(settings, preset_dir, row="diffusion_dpo" if kind == "unet_lora" else "pigeon_dpo")


# Gates by name, besides ``preference`` (training/gate.py, built from the round's held-out pairs).
GATES: dict[str, Callable] = {"toy": toy_gate}
HELDOUT_EVERY = 4  # the preference gate holds out every 4th pair (a quarter), never trained on


def split_heldout(pairs: list) -> tuple[list, list]:
    """(train, held-out): every ``HELDOUT_EVERY``-th pair of the round (pairs are in feedback order)."""
    held = [p for i, p in enumerate(pairs) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return [p for i, p in enumerate(pairs) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1], held


@dataclass(frozen=True)
class KindSpec:
    pairs: Callable      # (core, session, requests) -> make(pair, chosen, rejected) -> example | why not
    write: Callable      # (core, examples, pairs_file): the JSONL the trainer reads
    trainer: Callable    # (settings, preset_dir) -> trainer


KIND_SPECS = {
    "pigeon_lora": KindSpec(keyword_pairs, write_keyword_pairs, pigeon_trainer),
    "unet_lora": KindSpec(image_pairs, write_image_pairs, diffusion_dpo_trainer),
}


# -- Celery --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def retrain_core() -> RetrainCore:
    from pigment.services.common.settings import Settings
    from pigment.services.store.db import make_sessionmaker

    settings = Settings()
    return RetrainCore(settings, make_sessionmaker(settings.database_url))


# Acked on receipt: a worker lost mid-run is not redelivered (the next beat tick retries with fresh feedback).
@shared_task(name=RETRAIN_TASK, acks_late=False)
def retrain(kind: str | None = None) -> dict:
    return asdict(retrain_core().run(kind))
