"""The reaper: re-sends render requests that nobody will finish, exactly once per stall.

A request row carries ``heartbeat_at``: the time of its last send while queued,
the rendering worker's last heartbeat while running (services/render/core.py).
A running row whose heartbeat went stale lost its worker (kill -9, OOM, a lost
node); a queued row not picked up long after its send may have lost its task
(a broker restart without persistence). Either is re-sent. Each re-send is a
compare-and-set on (status, dispatches, staleness), so two reapers (two
gateways, or a replay racing the background sweep) never both re-send the same
stall, and a duplicate task is harmless anyway: the worker claims a row with a
compare-and-set too, and stores generations under ids derived from the request.
A request whose workers went silent ``max_render_attempts`` times fails
UNAVAILABLE instead of killing another worker; its caller's replay queues it
again with a fresh budget (services/gateway/core.py). Plain Python: no grpc, no celery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from pigment.services.store.db import db_now, transaction
from pigment.services.store.notify import publish
from pigment.services.store.tables import RenderRequest, WorkerBeat
from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("pigment.reaper")
SWEEP_LIMIT = 500  # rows per sweep; the next sweep takes the rest
FORGET_WORKERS_AFTER = 10  # a worker's heartbeat row silent this many staleness periods is deleted


class Reaper:
    def __init__(self, settings, sessions: sessionmaker[Session], dispatch: Callable[[str], None]):
        self.sessions = sessions
        self.dispatch = dispatch
        self.stale_s = settings.heartbeat_stale_s
        self.requeue_s = settings.requeue_queued_after_s
        self.max_attempts = settings.max_render_attempts
        self.queue = settings.render_queue

    def _stalled(self, now, queued_too: bool = True):
        """Rows to re-send: running with a silent worker; queued long after their last send."""
        silent = or_(RenderRequest.heartbeat_at.is_(None),
                     RenderRequest.heartbeat_at < now - timedelta(seconds=self.stale_s))
        running = and_(RenderRequest.status == "running", silent)
        if not queued_too:
            return running
        unsent = or_(RenderRequest.heartbeat_at.is_(None),
                     RenderRequest.heartbeat_at < now - timedelta(seconds=self.requeue_s))
        return or_(running, and_(RenderRequest.status == "queued", unsent))

    def sweep(self) -> list[str]:
        """One pass over the stalled rows; returns the request ids re-sent.

        Queued rows are re-sent only while a live worker consumes the render queue: with none, a re-send only
        adds another copy of the task to a queue nobody reads (readiness says NOT_SERVING meanwhile), and the
        first sweep after a worker appears re-sends them once. Heartbeat rows of workers silent for
        ``FORGET_WORKERS_AFTER`` staleness periods are deleted (a killed worker never deletes its own)."""
        with transaction(self.sessions) as s:
            now = db_now(s)  # heartbeats are written by the database's clock too
            live = s.scalars(select(WorkerBeat.queues)
                             .where(WorkerBeat.last_seen >= now - timedelta(seconds=self.stale_s))).all()
            consumed = any(self.queue in (queues or []) for queues in live)
            rows = s.execute(select(RenderRequest.request_id, RenderRequest.status, RenderRequest.dispatches,
                                    RenderRequest.attempts).where(self._stalled(now, queued_too=consumed))
                             .order_by(RenderRequest.created_at).limit(SWEEP_LIMIT)).all()
            s.execute(delete(WorkerBeat).where(
                WorkerBeat.last_seen < now - timedelta(seconds=self.stale_s * FORGET_WORKERS_AFTER)))
        return [rid for rid, status, dispatches, attempts in rows
                if self.revive(rid, status, dispatches, attempts, now=now)]

    def revive(self, request_id: str, status: str, dispatches: int, attempts: int, now=None,
               force_queued: bool = False) -> bool:
        """Re-send one stalled request if this caller wins the compare-and-set; True if it was sent.

        ``force_queued`` (a replay by the caller) re-sends a queued row however recent its last send."""
        if now is None:
            with transaction(self.sessions) as s:
                now = db_now(s)
        stalled = self._stalled(now, queued_too=not force_queued)
        if force_queued:
            stalled = or_(stalled, RenderRequest.status == "queued")
        if attempts >= self.max_attempts:  # no worker may claim it again: fail it, never re-send it forever
            return self._give_up(request_id, dispatches, attempts, stalled)
        with transaction(self.sessions) as s:
            won = s.execute(update(RenderRequest).where(
                RenderRequest.request_id == request_id, RenderRequest.status == status,
                RenderRequest.dispatches == dispatches, stalled,
            ).values(status="queued", step=0, heartbeat_at=now, dispatches=dispatches + 1)
                .execution_options(synchronize_session=False)).rowcount == 1
        if not won:
            return False
        log.warning("re-sending render %s (was %s, send %d, %d claims)", request_id, status, dispatches + 1, attempts)
        try:
            self.dispatch(request_id)
        except Exception as exc:  # noqa: BLE001 - broker down: the row stays queued, the next sweep retries
            log.warning("re-send of %s failed (%s: %s); retrying after %.0f s", request_id, type(exc).__name__,
                        exc, self.requeue_s)
        return True

    def _give_up(self, request_id: str, dispatches: int, attempts: int, stalled) -> bool:
        """Fail a request whose workers went silent ``max_render_attempts`` times; a replay retries it afresh."""
        with transaction(self.sessions) as s:
            failed = s.execute(update(RenderRequest).where(
                RenderRequest.request_id == request_id, RenderRequest.dispatches == dispatches, stalled,
            ).values(status="failed", error=f"UNAVAILABLE: the render worker went silent {attempts} times while "
                     "rendering this request (killed, or cut off from the database); not re-sent again: a replay "
                     "of the same request_id retries it (see the worker logs)")
                .execution_options(synchronize_session=False)).rowcount
            if failed:
                publish(s, [request_id])  # wake the waiting caller now (a bulk UPDATE skips the flush hook)
        if failed:
            log.warning("gave up on render %s after %d claims", request_id, attempts)
        return False
