"""Gateway core: one GeneratePersonalized request, end to end. No grpc, no torch at import.

history -> preference (keywords + soft tokens) -> a RenderRequest row -> the
render queue -> wait for the worker's Generation rows. The RenderRequest row is
written before the task is queued and the task carries only its id, so a
redelivered task, a retried call or a lost broker never loses or duplicates a
generation: replaying a ``request_id`` returns the same generations.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from pigment.models.loader import default_soft_weight
from pigment.services.common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    Overloaded,
    PigmentError,
    Unavailable,
    check_range,
)
from pigment.services.common.ids import KEY_RE, check_id, check_key
from pigment.services.common.limits import check_text
from pigment.services.gateway.reaper import Reaper
from pigment.services.registry import adapter_version_label
from pigment.services.store.db import db_now, transaction
from pigment.services.store.notify import PollingNotifier, publish
from pigment.services.store.tables import Counter, Generation, RenderRequest
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

REQUEST_ID_RE = KEY_RE  # \A...\Z: a trailing newline is not part of an id
METHODS = ("pmg", "pmg_keywords", "pmg_soft", "non_personalized", "llmga")
RETRIEVAL_MODES = ("auto", "generate_only", "retrieve_only", "both")
NON_PERSONALIZED_EMPTY_HISTORY = "NON_PERSONALIZED_EMPTY_HISTORY"
REPLAYED = "REPLAYED"
MAX_PROMPT_CHARS = 500
MAX_CANDIDATE = 64
ADMISSION_LOCK = "render_admission"  # the counter row every admission writes first (a lock on any database)


@dataclass
class GenerateParams:
    """None (and "" for method/retrieval): the default, filled by ``GatewayCore.resolve``."""

    request_id: str
    user_id: str
    prompt: str = ""
    num_images: int | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    method: str = ""
    keyword_weight: float | None = None
    soft_weight: float | None = None
    retrieval: str = ""
    include_seen: bool = False
    references: list = field(default_factory=list)  # ReferenceInput (references.py), then "item:.."/"image:.."
    candidate: int = 0  # 0: the best guess; k > 0: the k-th exploration variant of this round (issue 20)
    verbatim_prompt: bool = False  # opt out of a method's written prompt (llmga): render ``prompt`` as given


@dataclass
class ImageResult:
    generation_id: str
    seed: int
    storage_uri: str
    png: bytes
    source: str = "generated"  # generated | retrieved
    item_id: str = ""
    score: float = 0.0
    url: str = ""  # set instead of png past the response's inline budget (services/gateway/generations.py)


@dataclass
class RetrievedItem:
    item_id: str
    score: float
    image_uri: str


@dataclass
class Decision:
    """GILL-style outcome: which results to return and why."""

    policy: str
    retrieve: bool
    generate: bool
    score: float = 0.0
    reason: str = ""
    items: list[RetrievedItem] = field(default_factory=list)


NO_RETRIEVAL = Decision(policy="none", retrieve=False, generate=True, reason="retrieval not configured")


@dataclass
class GenerateResult:
    request_id: str
    images: list[ImageResult]
    keywords: list[str]
    model_version: str
    method: str
    flags: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    decision: dict = field(default_factory=dict)
    conditioning: dict = field(default_factory=dict)
    feedback_used: list[str] = field(default_factory=list)
    explored_attribute: str = ""


@dataclass
class ProgressEvent:
    step: int
    total_steps: int
    status: str


RETRIEVED_INDEX_BASE = 1000  # Generation.image_index of retrieved results: 1000, 1001, ...


def unknown_method(method: str) -> InvalidInput:
    allowed = "allowed " + ", ".join(f"METHOD_{m.upper()}" for m in METHODS)
    return InvalidInput(f"method={method} is unknown: {allowed}", reason="UNKNOWN_ENUM_VALUE", field="method",
                        allowed=allowed)


def retrieved_generation_id(request_id: str, index: int) -> str:
    from pigment.services.render.core import generation_id

    return generation_id(request_id, RETRIEVED_INDEX_BASE + index)


def or_default(value, default):
    """An unset (None) field takes the default; a set one, 0 included, is kept and range-checked."""
    return default if value is None else value


def derive_seed(request_id: str) -> int:
    return int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16) % (2**31)


class GatewayCore:
    def __init__(self, settings, sessions: sessionmaker[Session], history, preference, dispatch: Callable[[str], None],
                 storage, defaults: dict, model_version: Callable[[], str], decider=None,
                 adapters: Callable[[], dict] | None = None, charge_images: Callable | None = None,
                 limits: tuple[int, int, int] | None = None, notifier=None, references=None):
        self.settings = settings
        self.sessions = sessions
        self.history = history
        self.preference = preference
        self.dispatch = dispatch
        self.storage = storage
        missing = [k for k in ("num_inference_steps", "guidance_scale", "height", "width") if k not in defaults]
        if missing:  # no numbers of our own: the preset's manifest says what it was made for
            raise FailedPrecondition(f"the preset's manifest has no sampler defaults {missing} "
                                     "(`pigment models manifest --dir DIR --steps --guidance --size` records them)")
        self.defaults = defaults
        self.limits = limits  # -> (multiple, min, max) image pixels the render backend accepts, or None
        self.model_version = model_version
        self.decider = decider  # has decide(user_id, params, history, preference) -> Decision
        self.adapters = adapters  # -> {kind: version} active in the model registry, stamped on each request
        self.reaper = Reaper(settings, sessions, dispatch)  # replays revive stalled rows through it
        self.charge_images = charge_images  # (principal, n) -> None or RateLimited: the tenant's image quota
        self.notifier = notifier or PollingNotifier()  # services/store/notify.py: wait(request_id, timeout)
        self.references = references  # references.py: a subject's images -> storage URIs for the worker

    # -- validation -----------------------------------------------------------
    def resolve(self, p: GenerateParams, blobs: dict | None = None) -> GenerateParams:
        """Fill defaults and check every field, naming it and its allowed range. ``blobs`` collects the
        checked bytes of raw-byte references ({sha256: png}), stored by ``_prepare`` once admitted."""
        s, d = self.settings, self.defaults
        check_key("request_id", p.request_id)
        check_id("user_id", p.user_id)
        check_text("prompt", p.prompt, MAX_PROMPT_CHARS)
        method = p.method or s.default_method
        if method not in METHODS:
            raise unknown_method(method)
        retrieval = p.retrieval or s.retrieval_mode
        if retrieval not in RETRIEVAL_MODES:
            allowed = "allowed " + ", ".join(f"RETRIEVAL_MODE_{m.upper()}" for m in RETRIEVAL_MODES)
            raise InvalidInput(f"retrieval={retrieval} is unknown: {allowed}", reason="UNKNOWN_ENUM_VALUE",
                               field="retrieval", allowed=allowed)
        r = GenerateParams(
            request_id=p.request_id, user_id=p.user_id, prompt=p.prompt.strip(), method=method,
            num_images=or_default(p.num_images, int(d.get("num_images", 1))),
            seed=or_default(p.seed, derive_seed(p.request_id)),
            num_inference_steps=or_default(p.num_inference_steps, int(d["num_inference_steps"])),
            guidance_scale=or_default(p.guidance_scale, float(d["guidance_scale"])),
            height=or_default(p.height, int(d["height"])), width=or_default(p.width, int(d["width"])),
            keyword_weight=or_default(p.keyword_weight, float(d.get("keyword_weight", 1.0))),
            soft_weight=or_default(p.soft_weight, default_soft_weight(d, method)),
            retrieval=retrieval, include_seen=p.include_seen, references=self._references().canonical(p.references, blobs),
            candidate=p.candidate, verbatim_prompt=p.verbatim_prompt,
        )
        check_range("keyword_weight", r.keyword_weight, 0.0, 5.0)
        check_range("soft_weight", r.soft_weight, 0.0, 5.0)
        check_range("num_images", r.num_images, 1, s.max_images)
        check_range("num_inference_steps", r.num_inference_steps, 1, s.max_steps)
        check_range("guidance_scale", r.guidance_scale, 1.0, 30.0)
        check_range("seed", r.seed, 0, 2**63 - 1)
        check_range("candidate", r.candidate, 0, MAX_CANDIDATE)
        for name in ("height", "width"):
            value = getattr(r, name)
            check_range(name, value, s.min_size, s.max_size)
            if value % 8:
                allowed = f"a multiple of 8 in {s.min_size}..{s.max_size}"
                raise InvalidInput(f"{name}={value} must be {allowed}", reason="NOT_A_MULTIPLE", field=name,
                                   allowed=allowed)
            if self.limits is not None:
                multiple, low, high = self.limits
                if value % multiple or not low <= value <= high:
                    allowed = f"a multiple of {multiple} in {low}..{high}"
                    raise InvalidInput(f"{name}={value} is not allowed by the {s.render_backend} render backend: "
                                       f"{allowed}", reason="NOT_A_MULTIPLE", field=name, allowed=allowed)
        return r

    def _references(self):
        if self.references is None:
            from pigment.services.gateway.references import References

            self.references = References(self.history, self.storage, unavailable="no reference support configured")
        return self.references

    # -- the request ------------------------------------------------------------
    def generate(self, params: GenerateParams, deadline: float | None = None,
                 on_progress: Callable[[ProgressEvent], None] | None = None, principal=None) -> GenerateResult:
        """``principal`` (None: a trusted internal caller, e.g. a batch chunk): the user must be of its tenant
        (else NotFound, replays included), and a new request counts against its image quota."""
        started = time.perf_counter()
        blobs: dict[str, bytes] = {}
        p = self.resolve(params, blobs)
        phash = hashlib.sha256(json.dumps(asdict(p), sort_keys=True).encode()).hexdigest()
        row, flags, timings = self.run_request(
            p.request_id, p.user_id, phash, p.num_images,
            lambda: self._prepare(p, phash, asked=bool(params.retrieval), blobs=blobs),
            deadline, on_progress, principal)
        result = self._result(row, flags)
        timings["total_ms"] = (time.perf_counter() - started) * 1000
        result.timings_ms = {**row.conditioning.get("timings_ms", {}), **timings}
        return result

    def run_request(self, request_id: str, user_id: str, phash: str, num_images: int,
                    prepare: Callable[[], tuple[RenderRequest, dict]], deadline: float | None,
                    on_progress: Callable[[ProgressEvent], None] | None, principal) -> tuple[RenderRequest, list, dict]:
        """The path every kind of render request shares (generation, edit): a replay of ``request_id`` (same
        ``phash``) resumes or returns the stored row; a new request is admitted (queue depth, the principal's
        image quota), its row built by ``prepare()`` and written before the task is queued; then the wait.
        Returns (the finished row, flags, timings)."""
        existing, depth = self._existing_and_depth(request_id)
        if existing is None and depth >= self.settings.max_queue_depth:  # full: one read, before any other work
            raise self._overloaded(depth)  # (says nothing of the user); _insert enforces the depth exactly
        if principal is not None:
            self.history.check_user(user_id, principal)
        if existing is not None and existing.params_hash != phash:
            raise AlreadyExists(f"request_id {request_id} was already used with different parameters",
                                reason="IDEMPOTENCY_KEY_REUSED", field="request_id")
        timings: dict[str, float] = {}
        if existing is None:
            if principal is not None and self.charge_images is not None:
                self.charge_images(principal, num_images)
            row, timings = prepare()
            existing = self._insert(row)
            flags = [] if existing is None else [REPLAYED]
            if existing is None and row.status == "queued":
                self._send(request_id)
        else:
            flags = [REPLAYED]
            if existing.status == "failed" and existing.error and existing.error.startswith("UNAVAILABLE"):
                self._requeue(request_id)
            elif existing.status in ("queued", "running"):  # its task may be lost: re-send (running: if stale)
                self.reaper.revive(existing.request_id, existing.status, existing.dispatches, existing.attempts,
                                   force_queued=True)
        t0 = time.perf_counter()
        row = self._wait(request_id, deadline, on_progress)
        timings["render_ms"] = (time.perf_counter() - t0) * 1000
        return row, flags, timings

    def _existing(self, request_id: str, phash: str) -> RenderRequest | None:
        with transaction(self.sessions) as s:
            row = s.get(RenderRequest, request_id)
        if row is not None and row.params_hash != phash:
            raise AlreadyExists(f"request_id {request_id} was already used with different parameters",
                                reason="IDEMPOTENCY_KEY_REUSED", field="request_id")
        return row

    def _existing_and_depth(self, request_id: str) -> tuple[RenderRequest | None, int]:
        """The request's row (a replay), else the queue depth: one transaction, so a rejection once the queue is
        full costs one pooled connection and two indexed reads (bench/load.py times it)."""
        with transaction(self.sessions) as s:
            row = s.get(RenderRequest, request_id)
            return row, self._depth(s) if row is None else 0

    def _prepare(self, p: GenerateParams, phash: str, asked: bool = True,
                 blobs: dict | None = None) -> tuple[RenderRequest, dict]:
        t0 = time.perf_counter()
        history = self.history.get_history(p.user_id, self.settings.history_limit)  # NotFound for unknown users
        t1 = time.perf_counter()
        flags: list[str] = []
        keywords: list[str] = []
        soft = pref = None
        if p.method != "non_personalized":
            pref = self._personalize(p, history)
            flags += pref.flags
            keywords, soft = pref.keywords, pref.soft_tokens
            if not history or "EMPTY_HISTORY" in pref.flags:
                flags.append(NON_PERSONALIZED_EMPTY_HISTORY)
        t2 = time.perf_counter()
        decision = self._decide(p, history, pref, asked)
        t3 = time.perf_counter()
        # a method that writes the whole prompt (LLMGA) puts the taste into it: one segment
        written = getattr(pref, "prompt", None) if not p.verbatim_prompt else None
        segments, weights = [p.prompt if written is None else written], [1.0]
        if keywords and written is None:
            segments.append(", ".join(keywords))
            weights.append(p.keyword_weight)
        conditioning = {
            "segments": segments, "segment_weights": weights, "keywords": keywords, "flags": flags,
            "soft_tokens": None if soft is None else {
                "shape": list(soft.shape), "float16_b64": base64.b64encode(soft.astype("float16").tobytes()).decode()},
            "soft_weight": p.soft_weight, "written_prompt": written or "",
            "references": self._references().uris(p.references, p.user_id, blobs),
            "history_item_ids": [h.item.item_id for h in history],
            "feedback_used": pref.feedback_used if pref is not None else [],
            "explored_attribute": pref.explored_attribute if pref is not None else "",
            "decision": asdict(decision),
            "timings_ms": {"history_ms": (t1 - t0) * 1000, "preference_ms": (t2 - t1) * 1000,
                           "decision_ms": (t3 - t2) * 1000},
            "queued_at": time.time(),  # the worker's claim time minus this is the queue wait
        }
        row = RenderRequest(
            request_id=p.request_id, user_id=p.user_id, params_hash=phash, params=asdict(p),
            conditioning=conditioning, model_version=self.model_version(),
            adapters=self.adapters() if self.adapters else None,
            status="queued" if decision.generate else "done", total_steps=p.num_inference_steps,
        )
        return row, conditioning["timings_ms"]

    def _personalize(self, p: GenerateParams, history):
        """The preference from the weighed history plus the user's feedback on earlier images (issue 20)."""
        from pigment.services.gateway.feedback import read_feedback

        feedback = read_feedback(self.sessions, p.user_id, self.settings.feedback_max_rows)
        return self.preference.personalize(history, feedback, target=p.prompt, method=p.method,
                                           candidate=p.candidate, half_life_s=self.settings.signal_half_life_s,
                                           now_ms=int(time.time() * 1000))

    def _decide(self, p: GenerateParams, history, preference, asked: bool = True) -> Decision:
        """``asked``: the request set ``retrieval`` (else the server's retrieval_mode chose, and reasons say so)."""
        who = "request asked for" if asked else "retrieval unset, the server's retrieval_mode is"
        if p.retrieval == "generate_only":
            return Decision(policy="forced", retrieve=False, generate=True, reason=f"{who} generate_only: generating")
        if self.decider is None:
            if p.retrieval == "auto":
                return NO_RETRIEVAL
            raise InvalidInput(f"retrieval={p.retrieval} needs an item index, which this deployment lacks",
                               reason="NO_ITEM_INDEX", field="retrieval",
                               allowed="RETRIEVAL_MODE_AUTO or RETRIEVAL_MODE_GENERATE_ONLY")
        decision = self.decider.decide(p.user_id, p, history, preference)
        if decision.policy == "forced" and not asked:
            decision.reason = decision.reason.replace("request asked for", who, 1)
        return decision

    def _depth(self, s: Session) -> int:
        return s.scalar(select(func.count()).select_from(RenderRequest)
                        .where(RenderRequest.status.in_(("queued", "running"))))

    def _overloaded(self, depth: int) -> Overloaded:
        return Overloaded(f"render queue is full ({depth} requests waiting, limit "
                          f"{self.settings.max_queue_depth}): retry later", reason="QUEUE_FULL")

    @staticmethod
    def _lock_admission(s: Session) -> None:
        """Serialise admissions: write one counter row first, so count-then-insert cannot over-admit.

        A row lock on PostgreSQL (held to commit); on SQLite the first write takes the database's write lock."""
        bump = update(Counter).where(Counter.name == ADMISSION_LOCK).values(value=Counter.value + 1)
        if s.execute(bump).rowcount:
            return
        try:
            with s.begin_nested():
                s.add(Counter(name=ADMISSION_LOCK, value=1))
        except IntegrityError:  # created by a concurrent first admission: lock it now
            s.execute(bump)

    def _insert(self, row: RenderRequest) -> RenderRequest | None:
        """Insert the request under the admission lock; if a concurrent call with the same id won, return its row."""
        try:
            with transaction(self.sessions) as s:
                self._lock_admission(s)
                if s.get(RenderRequest, row.request_id) is not None:
                    raise IntegrityError("render request exists", None, Exception(row.request_id))
                depth = self._depth(s)
                if depth >= self.settings.max_queue_depth:
                    raise self._overloaded(depth)
                row.heartbeat_at, row.dispatches = db_now(s), 1
                s.add(row)
                s.flush()
                for i, item in enumerate(row.conditioning["decision"]["items"]):
                    s.add(Generation(generation_id=retrieved_generation_id(row.request_id, i), request_id=row.request_id,
                                     image_index=RETRIEVED_INDEX_BASE + i, user_id=row.user_id, seed=0,
                                     storage_uri=item["image_uri"], retrieved_item_id=item["item_id"],
                                     model_version=row.model_version, method="retrieved",
                                     adapter_version=adapter_version_label(row.adapters)))
            return None
        except IntegrityError:
            return self._existing(row.request_id, row.params_hash)

    def _send(self, request_id: str) -> None:
        try:
            self.dispatch(request_id)
        except PigmentError as exc:
            self._mark_failed(request_id, f"{exc.status}: {exc}")
            raise
        except Exception as exc:  # broker errors from kombu/redis/amqp
            msg = f"render queue unavailable ({type(exc).__name__}: {str(exc)[:200]}); retry with the same request_id"
            self._mark_failed(request_id, f"UNAVAILABLE: {msg}")
            raise Unavailable(msg, reason="QUEUE_UNAVAILABLE") from exc

    def _requeue(self, request_id: str) -> None:
        """A replay of a request that failed UNAVAILABLE: queue it again, with a fresh budget of claims.

        A compare-and-set on the failed row: a worker that stored the result since the caller read the row
        (or a concurrent replay that re-queued it first) wins, and nothing is sent. ``attempts`` restarts at
        0, or a request the reaper gave up on (``max_render_attempts`` claims) would sit queued where no
        worker may claim it, re-sent forever (the request the 15-fault chaos soak lost)."""
        with transaction(self.sessions) as s:
            won = s.execute(update(RenderRequest).where(
                RenderRequest.request_id == request_id, RenderRequest.status == "failed",
                RenderRequest.error.startswith("UNAVAILABLE"),
            ).values(status="queued", error=None, step=0, attempts=0, heartbeat_at=db_now(s),
                     dispatches=RenderRequest.dispatches + 1).execution_options(synchronize_session=False)).rowcount
        if won:
            self._send(request_id)

    def _mark_failed(self, request_id: str, error: str) -> None:
        """The send failed: fail the queued row (never one a worker took meanwhile from an earlier send)."""
        with transaction(self.sessions) as s:
            s.execute(update(RenderRequest).where(RenderRequest.request_id == request_id,
                                                  RenderRequest.status == "queued")
                      .values(status="failed", error=error).execution_options(synchronize_session=False))
            publish(s, [request_id])

    def _wait(self, request_id: str, deadline: float | None,
              on_progress: Callable[[ProgressEvent], None] | None) -> RenderRequest:
        limit = time.monotonic() + self.settings.render_timeout_s
        if deadline is not None:
            limit = min(limit, deadline)
        last = None
        while True:
            with transaction(self.sessions) as s:
                row = s.get(RenderRequest, request_id)
            event = (row.step, row.total_steps, row.status)
            if on_progress is not None and event != last:
                on_progress(ProgressEvent(*event))
                last = event
            if row.status == "done":
                return row
            if row.status == "failed":
                status, _, msg = (row.error or "INTERNAL: render failed").partition(": ")
                error = next((c for c in PigmentError.__subclasses__() if c.status == status), PigmentError)
                raise error(f"render of {request_id} failed: {msg}", reason="RENDER_FAILED")
            if time.monotonic() > limit:
                raise DeadlineExceeded(f"render of {request_id} not finished in time (status {row.status}, "
                                       f"step {row.step}/{row.total_steps}); it continues: replay the same request_id")
            self.notifier.wait(request_id, max(0.0, limit - time.monotonic()))  # woken by NOTIFY, or polls

    def _result(self, row: RenderRequest, flags: list[str]) -> GenerateResult:
        with transaction(self.sessions) as s:
            gens = list(s.scalars(select(Generation).where(Generation.request_id == row.request_id)
                                  .order_by(Generation.image_index)))
        scores = {i["item_id"]: i["score"] for i in row.conditioning.get("decision", {}).get("items", [])}
        images = [ImageResult(g.generation_id, g.seed, g.storage_uri or "", self.storage.get(g.storage_uri),
                              "retrieved" if g.retrieved_item_id else "generated", g.retrieved_item_id or "",
                              scores.get(g.retrieved_item_id, 0.0)) for g in gens]
        images.sort(key=lambda i: i.source != "retrieved")  # retrieved first: instant and free
        cond = row.conditioning
        report = {"segments": cond.get("segments", []), "segment_weights": cond.get("segment_weights", []),
                  "soft_tokens": (cond.get("soft_tokens") or {}).get("shape", [0])[0],
                  "soft_weight": cond.get("soft_weight", 0.0), "reference_images": len(cond.get("references") or []),
                  "written_prompt": cond.get("written_prompt", "")}
        decision = {k: v for k, v in cond.get("decision", asdict(NO_RETRIEVAL)).items() if k != "items"}
        return GenerateResult(
            request_id=row.request_id, images=images, keywords=cond.get("keywords", []),
            model_version=row.model_version, method=row.params["method"],
            flags=cond.get("flags", []) + flags, decision=decision, conditioning=report,
            feedback_used=cond.get("feedback_used", []), explored_attribute=cond.get("explored_attribute", ""),
        )

    def progress_stream(self, params: GenerateParams, deadline: float | None = None,
                        principal=None) -> Iterator[ProgressEvent | GenerateResult]:
        """Runs ``generate`` in a thread and yields progress events, then the result."""
        import contextvars
        import queue
        import threading

        events: queue.Queue = queue.Queue()

        def run():
            try:
                events.put(self.generate(params, deadline, on_progress=events.put, principal=principal))
            except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                events.put(exc)

        # the caller's context (trace span, request id for logs) follows the work into the thread
        threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True).start()
        while True:
            item = events.get()
            if isinstance(item, Exception):
                raise item
            yield item
            if isinstance(item, GenerateResult):
                return

