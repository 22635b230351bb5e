"""One background thread per item index for the work an upsert must not wait for.

A rebuild (IVF retraining, HNSW compaction, a kind change) or a recall
re-measurement takes minutes at 1M items; ``ItemIndex.sync`` used to run it
inline, so the upsert that crossed a threshold blocked that long. Now sync
applies the rows (removals included, at once) and hands the rest here.
Requests coalesce: many while one runs cause one more run, not many.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Maintenance:
    def __init__(self, work: Callable[[str], None]) -> None:
        self._work = work
        self._cond = threading.Condition()
        self._pending: str | None = None
        self._running = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    def request(self, why: str) -> None:
        """Run ``work(why)`` soon on the maintenance thread (once, however often asked)."""
        with self._cond:
            if self._stopping:
                return
            self._pending = self._pending or why
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="item-index-maintenance", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._stopping)
                if self._stopping:
                    return
                why, self._pending, self._running = self._pending, None, True
            try:
                self._work(why)
            except Exception:  # the serving index stays as it was; the next sync asks again
                log.exception("item index maintenance (%s) failed", why)
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: self._pending is None and not self._running, timeout=timeout
            )

    def stop(self) -> None:
        """Let a running job finish, drop a pending one, end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
