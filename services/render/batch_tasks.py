"""Celery tasks for batch poster jobs: one task per chunk of users, plus a resume sweep.

Why this cannot deadlock: a chunk task never waits on another task. It renders
its users *in its own process* through the gateway path (history -> preference
-> RenderRequest row -> render), with the gateway's dispatch bound to the local
render core instead of the queue. So a single solo worker can run chunks and
interactive renders alike. Chunks go to their own queue (``<render_queue>.batch``)
so a deployment can give them a separate pool; the embedded worker consumes
both queues, and with prefetch 1 interactive renders interleave between chunks.

Idempotent: each user renders under request id ``{job_id}-{user_id}``; a chunk
redelivered after a worker loss claims only users not done (see
``services/gateway/jobs.py``). When a worker starts it re-queues chunks whose
previous worker died (``worker_ready``), so a restart resumes every job.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import shared_task
from celery.signals import worker_ready

log = logging.getLogger("pigment.batch")
BATCH_CHUNK_TASK = "pigment.batch.chunk"
BATCH_SWEEP_TASK = "pigment.batch.sweep"


def batch_queue(settings) -> str:
    return f"{settings.render_queue}.batch"


def chunk_dispatcher(app, settings):
    """A function that queues one chunk task, failing fast if the broker is down."""

    def send(job_id: str, chunk: int, chunk_size: int) -> None:
        limit = chunk_size * settings.render_timeout_s + 60
        app.send_task(BATCH_CHUNK_TASK, args=[job_id, chunk], queue=batch_queue(settings), retry=False,
                      time_limit=limit + 30, soft_time_limit=limit)

    return send


def jobs_core(app):
    from pigment.services.common.settings import Settings
    from pigment.services.gateway.jobs import JobsCore
    from pigment.services.store.db import make_sessionmaker

    settings = Settings()
    return JobsCore(settings, make_sessionmaker(settings.database_url), chunk_dispatcher(app, settings))


@lru_cache(maxsize=1)
def chunk_runner():
    """Built once per worker process; the models behind it load lazily on the first user."""
    from pigment.services.common.settings import Settings
    from pigment.services.gateway.jobs import ChunkRunner
    from pigment.services.render.tasks import render_core
    from pigment.services.stack import Stack
    from pigment.services.store.db import transaction
    from pigment.services.store.tables import RenderRequest

    settings = Settings()
    stack = Stack(settings)
    core = render_core()

    def render_here(request_id: str) -> None:
        try:  # takeover: this chunk holds the user's lease, so a running row's renderer is gone
            core.run(request_id, takeover=True)
        except Exception:
            log.exception("render %s failed", request_id)

    gateway = stack.make_gateway(render_here)

    def generate(params):
        with transaction(stack.sessions) as s:
            row = s.get(RenderRequest, params.request_id)
        if row is not None and row.status in ("queued", "running"):
            render_here(params.request_id)  # left unfinished by a worker that died; we hold the user's lease now
        return gateway.generate(params)

    return ChunkRunner(stack.sessions, generate, lease_s=settings.render_timeout_s + 60)


@shared_task(name=BATCH_CHUNK_TASK, acks_late=True, reject_on_worker_lost=True)
def run_chunk(job_id: str, chunk: int) -> dict:
    return chunk_runner().run(job_id, chunk)


@shared_task(name=BATCH_SWEEP_TASK, bind=True)
def sweep(self) -> list:
    """Re-queue chunks whose worker died (schedule it on beat in multi-worker deployments)."""
    return jobs_core(self.app).resend_stalled()


@worker_ready.connect
def _resume_on_start(sender=None, **_kwargs) -> None:
    try:
        resent = jobs_core(sender.app).resend_stalled()
        if resent:
            log.warning("resumed %d batch chunks left by a lost worker: %s", len(resent), resent)
    except Exception:
        log.exception("batch resume sweep failed")
