"""Scheduled retraining: logged feedback -> preference pairs -> train -> evaluate -> register (or not).

``RetrainCore.run(kind)`` is plain code (tests and benches call it directly);
the Celery task ``pigment.retrain`` wraps it for the worker, and beat sends it
every ``retrain_every_s`` (``celery_app.retrain_schedule``). One run:

1. feedback since the active version of ``kind`` was created (all feedback when
   none is), skipped when nothing arrived since the last attempt;
2. pairs (training/pairs.py: picks, then explicit ratings; contradictions
   dropped; at most ``retrain_max_pairs_per_user`` per user, so one user
   flooding feedback cannot outweigh the others), kept only where the two
   images were written from different keyword lists, which are read from each
   generation's RenderRequest conditioning together with its history captions;
3. train: Pigeon DPO on the keyword LLM (training/train_pigeon.py), starting
   from the active adapter when there is one;
4. evaluate on held-out users (training/eval.py, ``retrain_eval_samples``
   windows of the test-users split, sample seed ``retrain_eval_seed``) against
   the serving model scored on the same windows;
5. register the adapter with its metrics and promote it only if joint accuracy
   does not drop and content fidelity stays within ``retrain_max_fidelity_drop``.

Every attempt that gets as far as training is recorded in the registry: the
promoted version is ``active``; a regression, a crash or a divergence (NaN loss
or weights) is a ``rejected`` version whose ``notes`` say why (its path is the
run directory, with ``report.json``), and the serving version stays untouched.
``pigment models list`` shows them all; ``report.json`` per run under
``data_dir/retrain/``. Workers pick a promoted version up without a restart
(the registry's per-version caches); requests in flight keep theirs.
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
from pigment.services.registry import Registry
from pigment.services.render.celery_app import RETRAIN_TASK
from pigment.services.store.db import transaction
from pigment.services.store.tables import Item, ModelVersion, RenderRequest
from sqlalchemy import select

log = logging.getLogger("pigment.retrain")
KINDS = ("pigeon_lora",)
KEYWORD_METHODS = ("pmg", "pmg_keywords")
# Trainer defaults for a retrain round (PigeonTrainConfig fields; `retrain_config` YAML overrides them):
# logged pairs only (the loop measures what feedback teaches), no history masking unless an adapter
# learned one (a fresh mask generator would drop tokens at random), a short run with a strong KL anchor
# (beta 1): on the toy keyword LLM, 120 steps at lr 5e-4 / beta 0.1 over-optimised a few hundred pairs
# (keyword joint 0.70 -> 0.32 on held-out users) while 80 steps at 3e-4 / beta 1 gained (0.70 -> 0.72).
PIGEON_DEFAULTS = {"stage": "dpo", "auto_pairs": 0, "keep_ratio": 1.0, "train_mask": False, "steps": 80,
                   "batch_size": 16, "lr": 3e-4, "warmup_steps": 10, "beta": 1.0, "checkpoint_every": 1000}


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
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    run_dir: str = ""


class RetrainCore:
    """``trainer(pairs_file, out_dir, init_adapter) -> (adapter_dir, train_metrics)``;
    ``evaluator(adapter_dir | None) -> {"joint", "content_fidelity", ...}`` (None: the preset alone)."""

    def __init__(self, settings, sessions, registry: Registry | None = None, preset_dir: Path | None = None,
                 trainer: Callable | None = None, evaluator: Callable | None = None):
        self.settings = settings
        self.sessions = sessions
        self.registry = registry or Registry(sessions)
        self.preset_dir = Path(preset_dir or settings.preset_dir)
        self.trainer = trainer or pigeon_trainer(settings, self.preset_dir)
        self.evaluator = evaluator or toy_evaluator(settings, self.preset_dir)
        self.root = Path(settings.data_dir) / "retrain"

    # -- one run ----------------------------------------------------------------------------------
    def run(self, kind: str | None = None, force: bool = False) -> RetrainResult:
        kind = kind or self.settings.retrain_kind
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} cannot be retrained from feedback: allowed {', '.join(KINDS)}")
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
        self._write_report(result)
        log.info("retrain %s %s: %s (%s)", kind, run_id, result.status, result.reason)
        return result

    def _run(self, result: RetrainResult, force: bool) -> None:
        active = self.registry.active(result.kind)
        result.baseline_version = active.version if active else None
        feedback, pairs = self.collect(result.kind, active)
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
            result.reason = (f"{len(pairs)} usable pairs from {len(feedback)} feedback signals; "
                             f"retrain_min_pairs is {self.settings.retrain_min_pairs}")
            return
        run_dir = Path(result.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        pairs_file = run_dir / "pairs.jsonl"
        pairs_file.write_text("".join(json.dumps(p.to_json()) + "\n" for p in pairs))
        adapter = self._train(result, pairs_file, active)
        if adapter is None:
            return
        self._judge(result, adapter, active)

    # -- feedback -> keyword pairs -------------------------------------------------------------------
    def collect(self, kind: str, active: ModelVersion | None) -> tuple[list, list[KeywordPair]]:
        """Feedback since ``active`` was created, and the capped keyword pairs it yields."""
        from pigment.training.pairs import build_pairs, cap_per_user, load_feedback

        since = _aware(active.created_at) if active is not None else None
        with transaction(self.sessions) as s:
            feedback, generations = load_feedback(s, since)
            requests = {r.request_id: r for r in s.scalars(select(RenderRequest).where(
                RenderRequest.request_id.in_({g.request_id for g in generations.values()})))}
            item_ids = {i for r in requests.values() for i in r.conditioning.get("history_item_ids", [])}
            captions = dict(s.execute(select(Item.item_id, Item.caption).where(Item.item_id.in_(item_ids))).all())
        raw = build_pairs(feedback, generations, max_per_user=1 << 30)
        usable = {}
        for p in raw:
            pair = _keyword_pair(p, requests[generations[p.chosen].request_id],
                                 requests[generations[p.rejected].request_id], captions)
            if pair is not None:
                usable[(p.user_id, p.chosen, p.rejected)] = (p, pair)
        capped = cap_per_user([p for p, _ in usable.values()], self.settings.retrain_max_pairs_per_user)
        return feedback, [usable[(p.user_id, p.chosen, p.rejected)][1] for p in capped]

    # -- training ------------------------------------------------------------------------------------
    def _train(self, result: RetrainResult, pairs_file: Path, active: ModelVersion | None) -> Path | None:
        try:
            init = self.registry.verify(active) if active is not None else None  # refuses a modified adapter
            adapter, train_metrics = self.trainer(pairs_file, Path(result.run_dir), init)
            result.metrics["train"] = _summary(train_metrics)
            bad = _non_finite(adapter)
            if bad:
                raise FloatingPointError(f"the trained adapter has non-finite weights ({bad})")
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
    def _judge(self, result: RetrainResult, adapter: Path, active: ModelVersion | None) -> None:
        try:
            candidate = self.evaluator(adapter)
            baseline = self._baseline(active)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - an evaluation failure rejects the candidate
            self._record_failure(result, "evaluation failed", exc)
            return
        result.metrics.update(candidate=candidate, baseline=baseline)
        reason = self.regression(candidate, baseline)
        summary = (f"joint {candidate['joint']:.3f} vs {baseline['joint']:.3f}, content fidelity "
                   f"{candidate['content_fidelity']:.3f} vs {baseline['content_fidelity']:.3f} "
                   f"(serving: {result.baseline_version or 'preset'}); {result.n_pairs} pairs from "
                   f"{result.n_feedback} feedback signals")
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

    def _baseline(self, active: ModelVersion | None) -> dict:
        """The serving model on the gate's windows: the active version's recorded score, else scored now."""
        recorded = (active.metrics or {}).get("candidate") if active is not None else None
        if recorded and (recorded.get("n_samples"), recorded.get("seed")) in (
                (None, None), (self.settings.retrain_eval_samples, self.settings.retrain_eval_seed)):
            return recorded
        if active is not None:
            return self.evaluator(self.registry.verify(active))
        from pigment.models.loader import preset_version

        key = f"{preset_version(self.preset_dir)}-n{self.settings.retrain_eval_samples}-s{self.settings.retrain_eval_seed}"
        cache = self.root / f"baseline-{key}.json"
        if cache.is_file():
            return json.loads(cache.read_text())
        score = self.evaluator(None)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(score))
        return score

    # -- records ---------------------------------------------------------------------------------------
    def _version_metrics(self, result: RetrainResult) -> dict:
        return {**{k: v for k, v in result.metrics.items() if k != "traceback"}, "run_id": result.run_id,
                "n_feedback": result.n_feedback, "n_pairs": result.n_pairs,
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


def _keyword_pair(p, chosen: RenderRequest, rejected: RenderRequest, captions: dict[str, str]) -> KeywordPair | None:
    """The DPO example behind a generation pair, or None when both images came from the same keywords."""
    if chosen.params.get("method") not in KEYWORD_METHODS or rejected.params.get("method") not in KEYWORD_METHODS:
        return None
    kw_w, kw_l = list(chosen.conditioning.get("keywords") or []), list(rejected.conditioning.get("keywords") or [])
    if not kw_w or not kw_l or kw_w == kw_l:
        return None
    history = [captions[i] for i in chosen.conditioning.get("history_item_ids", []) if i in captions]
    if not history:
        return None
    return KeywordPair(p.user_id, history, chosen.params.get("prompt", ""), kw_w, kw_l, p.source)


def _aware(stamp: datetime | None) -> datetime | None:
    """SQLite returns naive UTC datetimes; PostgreSQL aware ones."""
    return stamp.replace(tzinfo=UTC) if stamp is not None and stamp.tzinfo is None else stamp


def _summary(metrics: dict) -> dict:
    return {k: v for k, v in (metrics or {}).items() if k not in ("history", "config")}


def _non_finite(adapter: Path) -> str:
    """Names of tensors with NaN/inf in an adapter's safetensors files ("" when all finite)."""
    import torch
    from safetensors.torch import load_file

    adapter = Path(adapter)
    files = [adapter] if adapter.is_file() else sorted(adapter.rglob("*.safetensors"))
    bad = [f"{f.name}:{k}" for f in files for k, v in load_file(f).items()
           if v.is_floating_point() and not torch.isfinite(v).all()]
    return ", ".join(bad[:5])


# -- the default trainer and evaluator ------------------------------------------------------------------------
def pigeon_trainer(settings, preset_dir: Path) -> Callable:
    def train(pairs_file: Path, out: Path, init_adapter: Path | None) -> tuple[Path, dict]:
        import yaml
        from pigment.training.train_pigeon import PigeonTrainConfig, build_trainer

        overrides = dict(PIGEON_DEFAULTS)
        if settings.retrain_config:
            overrides.update(yaml.safe_load(Path(settings.retrain_config).read_text()) or {})
        if init_adapter is not None:  # continue from the serving adapter, with its own mask ratio
            meta = json.loads((Path(init_adapter) / "pigeon.json").read_text())
            overrides.update(init_adapter=str(init_adapter), keep_ratio=float(meta["keep_ratio"]))
        overrides.update(preset=str(preset_dir), out=str(out / "train"), pairs_file=str(pairs_file))
        cfg = PigeonTrainConfig.load(None, **overrides)
        metrics = build_trainer(cfg).train()
        return Path(metrics["adapter"]), metrics

    return train


def toy_evaluator(settings, preset_dir: Path) -> Callable:
    """Joint favourite-attribute accuracy and content fidelity of the keyword path (pigment eval)."""

    def evaluate_adapter(adapter_dir: Path | None) -> dict:
        from pigment.training.eval import evaluate

        method = "pigeon_dpo" if adapter_dir is not None else "pmg_keywords"
        report = evaluate(preset_dir, "test-users", [method], settings.retrain_eval_samples,
                          seed=settings.retrain_eval_seed, adapters={"pigeon_dpo": str(adapter_dir)} if adapter_dir else None)
        m = report["methods"][method]
        return {"joint": m["preference_accuracy"]["joint"], "content_fidelity": m["content_fidelity"],
                "preference_accuracy": m["preference_accuracy"], "split": report["split"],
                "n_samples": report["n_samples"], "seed": settings.retrain_eval_seed, "method": method}

    return evaluate_adapter


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
