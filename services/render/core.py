"""Render core: turn one RenderRequest row into images and Generation rows.

Idempotent by ``request_id``: generation ids are derived from it (uuid5), image
keys are deterministic, and rows are inserted only if absent, so a redelivered
task (late ack after a worker loss) rewrites the same files and adds no rows.
"""

from __future__ import annotations

import base64
import io
import logging
import time
import uuid

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pigment.services.store.db import transaction
from pigment.services.store.tables import Generation, RenderRequest

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


class RenderCore:
    def __init__(self, sessions: sessionmaker[Session], storage, renderer_factory):
        self.sessions = sessions
        self.storage = storage
        self._renderer_factory = renderer_factory
        self._renderer = None

        self.not_ready: str | None = None  # why this worker cannot render (a GPU backend that did not load)

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

    def run(self, request_id: str) -> str:
        with transaction(self.sessions) as s:
            row = s.get(RenderRequest, request_id)
            if row is None:
                log.warning("render %s: no such request (deleted?); dropping task", request_id)
                return "missing"
            if row.status == "done":
                return "done"
            row.status, row.step = "running", 0
            params, cond = dict(row.params), dict(row.conditioning)
        try:
            return self._render(request_id, params, cond)
        except BackendNotReady as exc:  # never a quiet CPU fallback: the caller sees why
            self._fail(request_id, f"UNAVAILABLE: {exc}")
            return "failed"
        except ValueError as exc:  # bad shapes or conditioning: the caller's fault, never retried
            self._fail(request_id, f"INVALID_ARGUMENT: {exc}")
            return "failed"
        except Exception as exc:
            self._fail(request_id, f"INTERNAL: {type(exc).__name__}: {exc}")
            raise

    def _render(self, request_id: str, params: dict, cond: dict) -> str:
        from pigment.models.pipeline import RenderInputs

        inputs = RenderInputs(
            segments=cond["segments"], segment_weights=cond.get("segment_weights"),
            soft_tokens=decode_soft_tokens(cond), soft_weight=cond.get("soft_weight", 1.0),
            num_images=params["num_images"], seed=params["seed"],
            num_inference_steps=params["num_inference_steps"], guidance_scale=params["guidance_scale"],
            height=params["height"], width=params["width"],
        )
        t0 = time.perf_counter()
        out = self.renderer.render(inputs, on_step=lambda step, total: self._progress(request_id, step))
        render_ms = (time.perf_counter() - t0) * 1000
        uris = []
        for i, img in enumerate(out.images):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            uris.append(self.storage.put(f"generations/{request_id}/{i}.png", buf.getvalue()))
        with transaction(self.sessions) as s:
            row = s.get(RenderRequest, request_id)
            have = set(s.scalars(select(Generation.image_index).where(Generation.request_id == request_id)))
            for i, (seed, uri) in enumerate(zip(out.seeds, uris)):
                if i not in have:
                    s.add(Generation(generation_id=generation_id(request_id, i), request_id=request_id, image_index=i,
                                     user_id=row.user_id, seed=seed, storage_uri=uri, model_version=row.model_version,
                                     method=params["method"]))
            row.status, row.step = "done", params["num_inference_steps"]
            row.conditioning = {**row.conditioning, "timings_ms": {**row.conditioning.get("timings_ms", {}),
                                                                    "worker_render_ms": render_ms}}
        return "done"

    def _progress(self, request_id: str, step: int) -> None:
        with transaction(self.sessions) as s:
            row = s.get(RenderRequest, request_id)
            if row is not None:
                row.step = step

    def _fail(self, request_id: str, error: str) -> None:
        log.error("render %s failed: %s", request_id, error)
        with transaction(self.sessions) as s:
            row = s.get(RenderRequest, request_id)
            if row is not None:
                row.status, row.error = "failed", error[:2000]
