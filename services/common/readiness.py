"""Readiness: can this gateway serve a render now? Plain Python (no grpc); the server maps it to health.

Ready means: the database answers and is migrated to this code's schema, the broker accepts connections, and at
least one worker with a fresh heartbeat row consumes the render queue
(services/render/liveness.py). The check runs on a background thread
(``Periodic``) and the health service only reads its last result, so health
answers at once even when the database hangs or every RPC slot is rendering.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from pigment.services.store.db import db_now, transaction
from pigment.services.store.migrate import schema_problem
from pigment.services.store.tables import WorkerBeat
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("pigment.readiness")


class Readiness:
    def __init__(self, sessions: sessionmaker[Session], render_queue: str, stale_s: float,
                 broker_check: Callable[[], None] | None = None):
        self.sessions = sessions
        self.render_queue = render_queue
        self.stale_s = stale_s
        self.broker_check = broker_check
        self.schema_ok = False  # the database is migrated to this code's head (services/store/migrate.py)

    def problems(self) -> list[str]:
        """Why this gateway cannot serve renders now; empty when ready."""
        found = []
        try:
            with transaction(self.sessions) as s:
                s.execute(text("SELECT 1"))
                if not self.schema_ok:  # once at head it stays so: checked until then, not every time
                    unmigrated = schema_problem(s)
                    self.schema_ok = unmigrated is None
                if self.schema_ok:
                    cutoff = db_now(s) - timedelta(seconds=self.stale_s)  # the clock the workers' rows use
                    live = s.scalars(select(WorkerBeat.queues).where(WorkerBeat.last_seen >= cutoff)).all()
            if not self.schema_ok:  # one clear reason, not "no such table" from each query
                found.append(unmigrated)
            elif not any(self.render_queue in (queues or []) for queues in live):
                found.append(f"no live worker consumes the render queue {self.render_queue!r}")
        except Exception as exc:  # noqa: BLE001 - any failure to look is "not ready", with why
            found.append(f"database: {str(exc).splitlines()[0][:200]}")
        if self.broker_check is not None:
            try:
                self.broker_check()
            except Exception as exc:  # noqa: BLE001
                found.append(f"broker unreachable: {type(exc).__name__}: {str(exc)[:200]}")
        return found


class Periodic:
    """Calls ``fn`` every ``interval_s`` on a daemon thread until ``stop()``; errors are logged, not fatal."""

    def __init__(self, name: str, fn: Callable[[], object], interval_s: float):
        self.fn, self.interval_s = fn, interval_s
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Periodic:
        self.thread.start()
        return self

    def _run(self) -> None:
        last = None  # the last failure's text: the same failure again is not logged again
        while not self._stop.is_set():
            try:
                self.fn()
                if last is not None:
                    log.warning("%s recovered", self.thread.name)
                last = None
            except Exception as exc:
                if str(exc) != last:
                    log.warning("%s failed (logged once until it changes)", self.thread.name, exc_info=True)
                last = str(exc)
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
