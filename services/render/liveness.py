"""Worker liveness: a heartbeat row per worker (readiness) and a watchdog on the parent that started it.

When the worker is ready, a daemon thread upserts ``worker_beats`` (id, queues,
last_seen) every ``heartbeat_interval_s``; the gateway's readiness needs a fresh
row for its render queue (services/common/readiness.py). The row is deleted on
a clean shutdown; a killed worker's row simply goes stale.

A worker started by ``pigment serve`` (``PIGMENT_PARENT_PID`` set) stops itself
(SIGTERM: warm shutdown, the current task finishes or is redelivered) when that
parent is gone, so a killed server leaves no orphan consuming its queues:
PR_SET_PDEATHSIG on Linux (``die_with_parent``, at import of the worker app),
and the heartbeat thread's watchdog on ``getppid()`` everywhere.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

from celery.signals import worker_ready, worker_shutdown

log = logging.getLogger("pigment.liveness")
_stop = threading.Event()
_state: dict = {}


def die_with_parent() -> None:
    """Ask Linux for SIGTERM when the starting process dies; stop now if it already has."""
    parent = os.environ.get("PIGMENT_PARENT_PID")
    if not parent:
        return
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # died before the prctl above
        os.kill(os.getpid(), signal.SIGTERM)


def beat(sessions, worker_id: str, queues: list[str]) -> None:
    """Upsert this worker's heartbeat row."""
    from pigment.services.store.db import db_now, transaction
    from pigment.services.store.tables import WorkerBeat
    from sqlalchemy import update

    with transaction(sessions) as s:
        now = db_now(s)  # readiness judges it by the same clock
        if s.execute(update(WorkerBeat).where(WorkerBeat.worker_id == worker_id)
                     .values(last_seen=now, queues=queues)).rowcount == 0:
            s.add(WorkerBeat(worker_id=worker_id, queues=queues, host=socket.gethostname(), pid=os.getpid(),
                             started_at=now, last_seen=now))


def _loop(sessions, worker_id: str, queues: list[str], interval: float, parent: int | None) -> None:
    while not _stop.is_set():
        if parent is not None and os.getppid() != parent:
            log.error("the process that started this worker (pid %d) is gone: shutting down", parent)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        try:
            beat(sessions, worker_id, queues)
        except Exception:  # a database blip: readiness drops if it lasts, the next beat retries
            log.warning("worker heartbeat failed", exc_info=True)
        _stop.wait(interval)


@worker_ready.connect
def _start(sender=None, **_kwargs) -> None:
    from pigment.services.common.settings import Settings
    from pigment.services.store.db import make_sessionmaker

    settings = Settings()
    queues = sorted(sender.app.amqp.queues.consume_from)
    parent = int(os.environ["PIGMENT_PARENT_PID"]) if os.environ.get("PIGMENT_PARENT_PID") else None
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    sessions = make_sessionmaker(settings.database_url)
    _state.update(sessions=sessions, worker_id=worker_id)
    threading.Thread(target=_loop, args=(sessions, worker_id, queues, settings.heartbeat_interval_s, parent),
                     name="worker-heartbeat", daemon=True).start()
    log.info("worker %s heartbeat on queues %s", worker_id, queues)


@worker_shutdown.connect
def _forget(**_kwargs) -> None:
    _stop.set()
    if not _state:
        return
    try:
        from pigment.services.store.db import transaction
        from pigment.services.store.tables import WorkerBeat
        from sqlalchemy import delete

        with transaction(_state["sessions"]) as s:
            s.execute(delete(WorkerBeat).where(WorkerBeat.worker_id == _state["worker_id"]))
    except Exception:
        log.warning("could not remove this worker's heartbeat row", exc_info=True)
