"""Render core: turn RenderRequest rows into images and Generation rows.

Requests dispatched together (the gateway's micro-batching window) and sharing
shapes, schedule and token count render in one pipeline call.

Idempotent by ``request_id``: generation ids are derived from it (uuid5), image
keys are deterministic, and rows are inserted only if absent, so a redelivered
task (late ack after a worker loss) rewrites the same files and adds no rows.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict, defaultdict
from datetime import timedelta

import numpy as np
from pigment.services.common import metrics
from pigment.services.common.errors import ModelNotReady, PigmentError, Unavailable
from pigment.services.registry import adapter_version_label
from pigment.services.store.db import db_now, transaction
from pigment.services.store.notify import publish
from pigment.services.store.tables import Generation, RenderRequest
from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("pigment.render")
GENERATION_NS = uuid.UUID("6f1c1c52-3d4e-4a7f-9a59-0d6c9f6b2a10")


class BackendNotReady(RuntimeError):
    pass


def generation_id(request_id: str, index: int) -> str:
    return str(uuid.uuid5(GENERATION_NS, f"{request_id}/{index}"))


def decode_soft_tokens(cond: dict) -> np.ndarray | None:
    soft = cond.get("soft_tokens")
    if not soft:
        return None
    return np.frombuffer(base64.b64decode(soft["float16_b64"]), dtype=np.float16).reshape(soft["shape"])


def load_failure(exc: Exception) -> str:
    """The "STATUS: reason" a request fails with when this worker cannot load its model."""
    what = f"render model failed to load on this worker: {type(exc).__name__}: {str(exc)[:500]}"
    if isinstance(exc, PigmentError):
        return f"{exc.status}: {what}"
    if type(exc).__name__ == "ModelIntegrityError":  # sha256 or manifest mismatch: an operator must fix the files
        return f"FAILED_PRECONDITION: {what}"
    return f"UNAVAILABLE: {what}"


class RenderCore:
    def __init__(self, sessions: sessionmaker[Session], storage, renderer_factory, registry=None,
                 max_adapter_renderers: int = 2, heartbeat_s: float = 2.0, stale_s: float = 30.0,
                 max_attempts: int = 3):
        self.sessions = sessions
        self.registry = registry  # model registry: render-side adapters are loaded by version, sha256-checked
        self.storage = storage
        self._renderer_factory = renderer_factory
        self._renderer = None
        self._by_version: OrderedDict[str, object] = OrderedDict()  # unet_lora version -> its renderer
        self.max_adapter_renderers = max_adapter_renderers

        self.not_ready: str | None = None  # why this worker cannot render (a GPU backend that did not load)
        self.progress_every_s = 0.2
        self._progress_at: dict[str, float] = {}
        # Liveness: while a request renders here, a thread refreshes its heartbeat_at; a request whose
        # heartbeat is older than stale_s is presumed orphaned (claimable again, re-sent by the reaper).
        self.heartbeat_s, self.stale_s, self.max_attempts = heartbeat_s, stale_s, max_attempts
        self._inflight: set[str] = set()
        self._inflight_lock = threading.Lock()
        self._beat: threading.Thread | None = None

    @property
    def worker_id(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"  # per process: prefork children differ

    @property
    def renderer(self):
        if self.not_ready:
            raise BackendNotReady(self.not_ready)
        if self._renderer is None:  # loaded lazily, once per worker process
            try:
                self._renderer = self._renderer_factory()
            except Exception as exc:
                if type(exc).__name__ != "BackendUnavailable":
                    raise
                self.not_ready = f"render backend not ready on this worker: {exc}"
                log.error(self.not_ready)
                raise BackendNotReady(self.not_ready) from exc
        return self._renderer

    def run(self, request_id: str, takeover: bool = False) -> str:
        return self.run_batch([request_id], takeover)[request_id]

    def run_batch(self, request_ids: list[str], takeover: bool = False) -> dict[str, str]:
        """Render every request nobody else is rendering; compatible ones share one pipeline call.

        ``takeover``: also take running rows with a fresh heartbeat (the caller holds a lease proving their
        renderer is gone: a batch chunk re-run after its worker died)."""
        status, claimed = self._claim(request_ids, takeover)
        if not claimed:
            return status
        self._start_heartbeat()
        with self._inflight_lock:
            self._inflight.update(claimed)
        try:
            return self._render_claimed(status, claimed)
        finally:
            with self._inflight_lock:
                self._inflight.difference_update(claimed)

    def _render_claimed(self, status: dict[str, str], claimed: dict) -> dict[str, str]:
        try:
            renderer = self.renderer
        except BackendNotReady as exc:  # never a quiet CPU fallback: the caller sees why
            for rid in claimed:
                status[rid] = self._fail(rid, f"UNAVAILABLE: {exc}")
            return status
        except Exception as exc:  # noqa: BLE001 - a model that fails to load fails its requests now, with why
            reason = load_failure(exc)
            for rid in claimed:
                status[rid] = self._fail(rid, reason)
            return status
        groups: dict[tuple, list[tuple[str, dict, object]]] = defaultdict(list)
        renderers = {None: renderer}
        for rid, (params, cond, adapters) in claimed.items():
            inputs = self._inputs(params, cond)
            try:
                version, adapted = self.renderer_for(adapters, renderer)
                inputs = self._with_references(adapted, inputs, cond)
                adapted.check_inputs(inputs)
            except ValueError as exc:  # bad shapes or conditioning: the caller's fault, never retried
                status[rid] = self._fail(rid, f"INVALID_ARGUMENT: {exc}")
                continue
            except PigmentError as exc:  # an adapter that fails its sha256, or a kind this worker cannot apply
                status[rid] = self._fail(rid, f"{exc.status}: {exc}")
                continue
            renderers[version] = adapted
            groups[(version, adapted.batch_key(inputs))].append((rid, params, inputs))
        for (version, _), group in groups.items():
            renderer = renderers[version]
            ids = [rid for rid, _, _ in group]
            try:
                t0 = time.perf_counter()
                outs = renderer.render_batch([inputs for _, _, inputs in group],
                                             on_step=lambda step, total: self._progress(ids, step, total))
                render_ms = (time.perf_counter() - t0) * 1000
            except Exception as exc:
                for rid in ids:
                    self._fail(rid, f"INTERNAL: {type(exc).__name__}: {exc}")
                raise
            labels = (getattr(renderer, "backend", "?"), getattr(renderer, "device", "?"))
            metrics.RENDER_SECONDS.labels(*labels).observe(render_ms / 1000)
            metrics.RENDER_BATCH_SIZE.labels(labels[1]).observe(len(group))
            for (rid, params, _), out in zip(group, outs):
                status[rid] = self._store(rid, params, out, render_ms, batch_size=len(group))
        return status

    def renderer_for(self, adapters: dict, base) -> tuple[str | None, object]:
        """The renderer for the render-side adapter versions a request was stamped with: (version, renderer).

        One renderer per unet_lora version (LoRA fused at load), built once per process after its sha256 is
        checked against the registry; a request keeps the version active when it was made, so a promotion
        never changes a request mid-flight and needs no worker restart."""
        from pigment.services.registry import RENDER_KINDS

        wanted = {k: v for k, v in (adapters or {}).items() if k in RENDER_KINDS}
        unsupported = sorted(set(wanted) - {"unet_lora"})
        if unsupported:
            raise ModelNotReady(f"this worker cannot apply {unsupported} adapters ({[wanted[k] for k in unsupported]})")
        version = wanted.get("unet_lora")
        if version is None:
            return None, base
        if version not in self._by_version:
            if self.registry is None:
                raise ModelNotReady(f"this worker has no model registry to load adapter {version!r}")
            path = self.registry.verify(version)  # AdapterMismatch (FAILED_PRECONDITION) when modified
            try:
                self._by_version[version] = self._renderer_factory(unet_adapter=path)
            except Exception as exc:
                raise ModelNotReady(f"could not load adapter {version!r} from {path}: "
                                    f"{type(exc).__name__}: {exc}") from exc
            while len(self._by_version) > self.max_adapter_renderers:
                self._by_version.popitem(last=False)
        self._by_version.move_to_end(version)
        return version, self._by_version[version]

    def _claim(self, request_ids: list[str],
               takeover: bool = False) -> tuple[dict[str, str], dict[str, tuple[dict, dict, dict]]]:
        """Take each request with a compare-and-set: only if queued, or running under a silent worker.

        So a duplicate task (a redelivery, a re-send by the reaper or a replay) renders nothing while
        another worker is alive on the same request, and two workers never both claim it."""
        status, claimed = {}, {}
        with transaction(self.sessions) as s:
            now = db_now(s)  # heartbeats are written and judged by the database's clock
            orphaned = RenderRequest.status == "running" if takeover else and_(
                RenderRequest.status == "running", or_(RenderRequest.heartbeat_at.is_(None),
                                                       RenderRequest.heartbeat_at < now - timedelta(seconds=self.stale_s)))
            for rid in request_ids:
                took = s.execute(
                    update(RenderRequest)
                    .where(RenderRequest.request_id == rid, or_(RenderRequest.status == "queued", orphaned),
                           RenderRequest.attempts < self.max_attempts)
                    .values(status="running", step=0, heartbeat_at=now, attempts=RenderRequest.attempts + 1,
                            worker=self.worker_id)
                    .execution_options(synchronize_session=False)).rowcount
                row = s.get(RenderRequest, rid)
                if row is None:
                    log.warning("render %s: no such request (deleted?); dropping it", rid)
                    status[rid] = "missing"
                elif not took:
                    status[rid] = row.status  # done, failed, or running on a live worker
                else:
                    row.conditioning = {**row.conditioning, "claimed_at": time.time()}  # queue wait ends here
                    claimed[rid] = (dict(row.params), dict(row.conditioning), dict(row.adapters or {}))
        return status, claimed

    def _start_heartbeat(self) -> None:
        if self._beat is not None and self._beat.is_alive():
            return
        self._beat = threading.Thread(target=self._heartbeat_loop, name="render-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat_loop(self) -> None:
        while True:
            time.sleep(self.heartbeat_s)
            with self._inflight_lock:
                ids = sorted(self._inflight)
            if not ids:
                continue
            try:
                with transaction(self.sessions) as s:
                    s.execute(update(RenderRequest).where(RenderRequest.request_id.in_(ids),
                                                          RenderRequest.status == "running")
                              .values(heartbeat_at=db_now(s)).execution_options(synchronize_session=False))
            except Exception:  # a database blip: the next beat retries
                log.warning("request heartbeat failed for %s", ids, exc_info=True)

    def _with_references(self, renderer, inputs, cond: dict):
        """The request's reference images (storage URIs the gateway checked) -> the renderer's reference tokens."""
        uris = cond.get("references") or []
        if not uris:
            return inputs
        from dataclasses import replace

        return replace(inputs, reference_tokens=renderer.reference_tokens([self.storage.get(u) for u in uris]))

    def _inputs(self, params: dict, cond: dict):
        from pigment.models.pipeline import RenderInputs

        edit = cond.get("edit")  # an EditImage request: the source and its mask are in storage
        return RenderInputs(
            init_image=None if edit is None else self._image(edit["source_uri"], "RGB"),
            mask=None if edit is None else self._image(edit["mask_uri"], "L") > 127,
            strength=1.0 if edit is None else float(edit["strength"]),
            repaint_whole=bool(edit and edit.get("repaint_whole")),
            segments=cond["segments"], segment_weights=cond.get("segment_weights"),
            soft_tokens=decode_soft_tokens(cond), soft_weight=cond.get("soft_weight", 1.0),
            num_images=params["num_images"], seed=params["seed"],
            num_inference_steps=params["num_inference_steps"], guidance_scale=params["guidance_scale"],
            height=params["height"], width=params["width"],
        )

    def _image(self, uri: str, mode: str) -> np.ndarray:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.storage.get(uri))).convert(mode))

    def _store(self, request_id: str, params: dict, out, render_ms: float, batch_size: int) -> str:
        uris = []
        for i, img in enumerate(out.images):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            uris.append(self.storage.put(f"generations/{request_id}/{i}.png", buf.getvalue()))
        with transaction(self.sessions) as s:
            row = s.get(RenderRequest, request_id)
            if row is None:  # deleted mid-render (GDPR DeleteUser): keep none of its images
                for uri in uris:
                    self.storage.delete(uri)
                return "deleted"
            have = set(s.scalars(select(Generation.image_index).where(Generation.request_id == request_id)))
            for i, (seed, uri) in enumerate(zip(out.seeds, uris)):
                if i not in have:
                    s.add(Generation(generation_id=generation_id(request_id, i), request_id=request_id, image_index=i,
                                     user_id=row.user_id, seed=seed, storage_uri=uri, model_version=row.model_version,
                                     method=params["method"], adapter_version=adapter_version_label(row.adapters)))
            row.status, row.step = "done", params["num_inference_steps"]
            timings = {**row.conditioning.get("timings_ms", {}), "worker_render_ms": render_ms}
            queued_at, claimed_at = row.conditioning.get("queued_at"), row.conditioning.get("claimed_at")
            if queued_at and claimed_at:  # wall clocks of gateway and worker hosts (NTP-synced)
                timings["queue_wait_ms"] = max(0.0, claimed_at - queued_at) * 1000
                metrics.QUEUE_WAIT_SECONDS.observe(timings["queue_wait_ms"] / 1000)
            metrics.RENDERS.labels("done").inc()
            row.conditioning = {**row.conditioning, "timings_ms": timings, "render_batch_size": batch_size}
        return "done"

    def _progress(self, request_ids: list[str], step: int, total: int | None = None) -> None:
        # at most one write (and NOTIFY) per progress_every_s per batch, and always the last step: a GPU step
        # takes tens of ms, and each write wakes every waiting gateway call (docs/SCALE.md, SQL writes)
        now, key = time.monotonic(), request_ids[0]
        if total is not None and step < total and now - self._progress_at.get(key, -1e9) < self.progress_every_s:
            return
        self._progress_at[key] = now
        if total is not None and step >= total:
            self._progress_at.pop(key, None)
        try:
            with transaction(self.sessions) as s:
                s.execute(update(RenderRequest).where(RenderRequest.request_id.in_(request_ids))
                          .values(step=step, heartbeat_at=db_now(s)))
                publish(s, request_ids)  # a bulk UPDATE skips the ORM flush hook
        except Unavailable as exc:
            # progress is advisory: a database restart mid-render (tests/test_chaos.py) used to raise out of
            # the pipeline's step callback and fail the request as INTERNAL once the database was back; the
            # render goes on, the heartbeat thread retries, and _store's commit is what counts
            log.warning("render progress of %s not recorded: %s", request_ids, exc)

    def _fail(self, request_id: str, error: str) -> str:
        log.error("render %s failed: %s", request_id, error)
        metrics.RENDERS.labels("failed").inc()
        with transaction(self.sessions) as s:
            row = s.get(RenderRequest, request_id)
            if row is not None:
                row.status, row.error = "failed", error[:2000]
        return "failed"
