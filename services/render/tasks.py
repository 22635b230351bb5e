"""Celery tasks: small, take ids, delegate to the render core (loaded lazily per process)."""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import shared_task
from celery.signals import worker_init
from pigment.services.render.celery_app import RENDER_TASK

log = logging.getLogger("pigment.render")


@lru_cache(maxsize=1)
def render_core():
    from pigment.services.common.settings import Settings
    from pigment.services.common.storage import ImageStorage
    from pigment.services.render.core import RenderCore
    from pigment.services.store.db import make_sessionmaker

    settings = Settings()

    def renderer(**adapter):  # unet_adapter=PATH for a registered UNet LoRA version
        from pigment.models.pipeline import Renderer

        return Renderer(settings.preset_dir, backend=settings.render_backend, device=settings.render_device,
                        cache_dir=settings.data_dir / "engines", dtype=settings.render_dtype or None, **adapter)

    from pigment.services.registry import Registry

    sessions = make_sessionmaker(settings.database_url)
    return RenderCore(sessions, ImageStorage(settings.storage_dir), renderer, registry=Registry(sessions),
                      heartbeat_s=settings.heartbeat_interval_s, stale_s=settings.heartbeat_stale_s,
                      max_attempts=settings.max_render_attempts)


@shared_task(name=RENDER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def render(self, request_ids: list[str] | str) -> dict[str, str]:
    from pigment.services.common.logs import request_context

    ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
    with request_context(",".join(ids)):  # the worker's log lines carry the request ids they serve
        status = render_core().run_batch(ids)
        log.info("render batch of %d: %s", len(ids), status)
        return status


@worker_init.connect
def _verify_models(**_kwargs) -> None:
    """Check every model file against the manifest before consuming (cached by size, mtime and inode, so a
    restart does not re-hash unchanged weights). A bad file fails each request with the reason."""
    from pigment.models.loader import verify_preset
    from pigment.services.common.settings import Settings

    settings = Settings()
    try:
        report = verify_preset(settings.preset_dir, settings.verified_files)
        log.info("models verified: %s", report)
    except Exception as exc:  # noqa: BLE001 - a corrupt or missing file, an unreadable manifest
        render_core().not_ready = f"model files of {settings.preset_dir} failed verification: {exc}"
        log.error(render_core().not_ready)
