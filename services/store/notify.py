"""Render completion by notification: PostgreSQL LISTEN/NOTIFY, SQL polling only as the embedded fallback.

Writer side: every flush that changes a ``RenderRequest`` (status, step, error)
issues ``pg_notify('pigment_render', request_id)`` in the same transaction, so
the notification is delivered exactly when the change commits, whoever made it
(worker, gateway, reaper). Bulk ``UPDATE``s call :func:`publish` themselves.

Reader side: one listening connection per gateway process; ``wait(request_id,
timeout)`` returns as soon as a notification for that id arrives (or the
timeout passes), and the caller re-reads the row. A notification that arrives
before its waiter registers is remembered (a bounded recent set), so the
read-then-wait race never costs a full timeout; a lost connection falls back
to polling until it is back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from pigment.services.store.tables import RenderRequest
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("pigment.notify")
CHANNEL = "pigment_render"
POLL_S = 0.05  # the embedded fallback's period (SQLite has no LISTEN)
RECENT = 4096  # notifications remembered for waiters not yet registered


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql")


def publish(session: Session, request_ids) -> None:
    """Notify listeners that these requests changed (delivered at commit); a no-op off PostgreSQL."""
    if not is_postgres(str(session.get_bind().url)):
        return
    for rid in request_ids:
        session.execute(text("SELECT pg_notify(:channel, :rid)"), {"channel": CHANNEL, "rid": rid})


def install_publisher(factory: sessionmaker) -> None:
    """Notify on every flushed change to a RenderRequest made through sessions of ``factory``."""

    @event.listens_for(factory, "after_flush")
    def _after_flush(session, _flush_context):
        changed = [o.request_id for o in (*session.new, *session.dirty) if isinstance(o, RenderRequest)]
        if changed:
            publish(session, changed)


class PollingNotifier:
    """SQLite / embedded: nothing to listen to; wait one poll period."""

    kind = "poll"

    def wait(self, request_id: str, timeout: float) -> bool:
        time.sleep(max(0.0, min(POLL_S, timeout)))
        return False

    def close(self) -> None:
        pass


class PgNotifier:
    """LISTEN on one dedicated autocommit connection in a daemon thread; wakes the waiters of each id."""

    kind = "listen"

    def __init__(self, url: str, safety_poll_s: float = 1.0):
        self.dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.safety_poll_s = safety_poll_s
        self._lock = threading.Lock()
        self._waiters: dict[str, list[threading.Event]] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._listening = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-listen", daemon=True)
        self._thread.start()
        self._listening.wait(5)  # normally ready in milliseconds; polling covers a slow start

    def wait(self, request_id: str, timeout: float) -> bool:
        """True when a notification for ``request_id`` arrived (possibly just before this call)."""
        if not self._listening.is_set():  # connection down: poll, as the embedded mode does
            time.sleep(max(0.0, min(POLL_S, timeout)))
            return False
        done = threading.Event()
        with self._lock:
            if request_id in self._recent:  # notified between the caller's read and this wait
                del self._recent[request_id]
                return True
            self._waiters.setdefault(request_id, []).append(done)
        try:
            return done.wait(max(0.0, min(timeout, self.safety_poll_s)))
        finally:
            with self._lock:
                events = self._waiters.get(request_id, [])
                if done in events:
                    events.remove(done)
                if not events:
                    self._waiters.pop(request_id, None)
                self._recent.pop(request_id, None)

    def _deliver(self, request_id: str) -> None:
        with self._lock:
            events = self._waiters.get(request_id)
            if events:
                for e in events:
                    e.set()
                return
            self._recent[request_id] = None
            self._recent.move_to_end(request_id)
            while len(self._recent) > RECENT:
                self._recent.popitem(last=False)

    def _run(self) -> None:
        import psycopg

        backoff = 1.0
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self._deliver(note.payload)
            except Exception as exc:  # noqa: BLE001 - reconnect with backoff; waiters poll meanwhile
                was_listening = self._listening.is_set()
                self._listening.clear()
                if not self._stop.is_set():
                    if was_listening:
                        log.warning("LISTEN %s lost (%s); polling until it is back", CHANNEL, type(exc).__name__)
                    backoff = min(30.0, backoff * 2) if not was_listening else 1.0
                    self._stop.wait(backoff)
        self._listening.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(3)


def make_notifier(settings):
    """LISTEN/NOTIFY when the database is PostgreSQL (and not forced to poll), else polling."""
    if settings.render_notify == "poll" or not is_postgres(settings.database_url):
        return PollingNotifier()
    return PgNotifier(settings.database_url, settings.notify_safety_poll_s)
