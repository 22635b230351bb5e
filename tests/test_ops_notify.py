"""Render completion by notification: the gateway's wait wakes on PostgreSQL NOTIFY, not a 50 ms SQL poll."""

from __future__ import annotations

import threading
import time

import pytest
from pigment.services.store.db import make_sessionmaker, transaction
from pigment.services.store.migrate import upgrade
from pigment.services.store.notify import PgNotifier, PollingNotifier, make_notifier, publish
from pigment.services.store.tables import RenderRequest, User
from sqlalchemy import event


@pytest.fixture
def pg(pg_database):
    url = pg_database()
    upgrade(url)
    sessions = make_sessionmaker(url)
    with transaction(sessions) as s:
        s.add(User(user_id="u"))
    notifier = PgNotifier(url)
    yield url, sessions, notifier
    notifier.close()


def add_request(sessions, rid: str) -> None:
    with transaction(sessions) as s:
        s.add(RenderRequest(request_id=rid, user_id="u", params_hash="h", params={"method": "pmg"},
                            conditioning={}, model_version="v", status="queued", total_steps=2))


def test_wait_wakes_on_an_orm_change_and_remembers_an_early_one(pg):
    _url, sessions, notifier = pg
    add_request(sessions, "r1")  # the insert notifies too; nobody waits yet: remembered
    assert notifier.wait("r1", 0.5) is True
    assert notifier.wait("r1", 0.2) is False  # consumed: no change since

    def finish():
        time.sleep(0.3)
        with transaction(sessions) as s:
            s.get(RenderRequest, "r1").status = "done"

    threading.Thread(target=finish).start()
    t0 = time.monotonic()
    assert notifier.wait("r1", 5.0) is True
    assert 0.25 < time.monotonic() - t0 < 2.0
    with transaction(sessions) as s:  # a bulk UPDATE notifies through publish()
        publish(s, ["r2"])
    assert notifier.wait("r2", 1.0) is True


def test_gateway_wait_reads_sql_on_notifications_not_every_50ms(pg, tmp_path):
    """Before: _wait re-read the row every 50 ms (~20 reads a second per waiting call)."""
    from pigment.services.common.settings import Settings
    from pigment.services.gateway.core import GatewayCore

    url, sessions, notifier = pg
    add_request(sessions, "r3")
    settings = Settings(data_dir=tmp_path, database_url=url)
    defaults = {"num_inference_steps": 2, "guidance_scale": 3.0, "height": 32, "width": 32}  # the preset's
    gateway = GatewayCore(settings, sessions, None, None, None, None, defaults, lambda: "v", notifier=notifier)
    reads = []
    event.listen(sessions.kw["bind"], "before_cursor_execute",
                 lambda conn, cur, stmt, *a: reads.append(stmt) if "FROM render_requests" in stmt else None)

    def finish():
        time.sleep(1.5)
        with transaction(sessions) as s:
            s.get(RenderRequest, "r3").status = "done"

    threading.Thread(target=finish).start()
    t0 = time.monotonic()
    row = gateway._wait("r3", None, None)
    waited = time.monotonic() - t0
    assert row.status == "done" and 1.4 < waited < 2.5
    finish_read = 1  # the finisher's own get()
    assert len(reads) - finish_read <= 4, f"{len(reads)} reads of render_requests in {waited:.1f}s"


def test_embedded_sqlite_falls_back_to_polling(tmp_path):
    from pigment.services.common.settings import Settings

    assert isinstance(make_notifier(Settings(data_dir=tmp_path)), PollingNotifier)
    assert make_notifier(Settings(data_dir=tmp_path, database_url="postgresql+psycopg://x@127.0.0.1:1/none",
                                  render_notify="poll")).kind == "poll"


def test_progress_writes_are_throttled_but_the_last_step_always_lands(tmp_path):
    """Every step used to write (and NOTIFY): 100 fast steps were 100 UPDATEs, each waking every waiter."""
    from pigment.services.render.core import RenderCore

    url = f"sqlite:///{tmp_path / 'p.db'}"
    upgrade(url)
    sessions = make_sessionmaker(url)
    with transaction(sessions) as s:
        s.add(User(user_id="u"))
    add_request(sessions, "r4")
    core = RenderCore(sessions, None, None)
    updates = []
    event.listen(sessions.kw["bind"], "before_cursor_execute",
                 lambda conn, cur, stmt, *a: updates.append(stmt) if stmt.startswith("UPDATE render_requests") else None)
    for step in range(1, 101):
        core._progress(["r4"], step, 100)
    assert 1 <= len(updates) <= 3
    with transaction(sessions) as s:
        assert s.get(RenderRequest, "r4").step == 100


def test_concurrent_migrations_are_serialized_by_the_advisory_lock(pg_database):
    """Two migrators at once (a Job re-run beside a hand-started one): both succeed, the schema lands once.
    Without the lock the two transactional DDL runs block each other (seen: no progress in 10 minutes)."""
    from sqlalchemy import create_engine, text

    url = pg_database()
    results: list = []

    def migrate():
        try:
            upgrade(url)
            results.append(None)
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            results.append(exc)

    threads = [threading.Thread(target=migrate, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [None, None], results
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    engine.dispose()
