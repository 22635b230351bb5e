"""Engine and session factory; SQLite runs in WAL mode with a busy timeout."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pigment.services.common.errors import Unavailable
from pigment.services.store.tables import Counter, utcnow
from sqlalchemy import create_engine, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, connect_args={"connect_timeout": 5})


def make_sessionmaker(url: str) -> sessionmaker[Session]:
    factory = sessionmaker(make_engine(url), expire_on_commit=False)
    if url.startswith("postgresql"):  # render status changes wake gateways by NOTIFY (services/store/notify.py)
        from pigment.services.store.notify import install_publisher

        install_publisher(factory)
    return factory


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success, rolls back on error, and maps a lost database to UNAVAILABLE."""
    try:
        with factory() as session, session.begin():
            yield session
    except (OperationalError, InterfaceError) as exc:
        raise Unavailable(f"database unavailable: {str(exc.orig or exc).splitlines()[0]}") from exc


def db_now(session: Session):
    """Now by the database's clock on PostgreSQL, so heartbeats written on one host and judged on another never
    compare two hosts' clocks; this host's clock on SQLite (a file: one host by construction)."""
    if session.get_bind().dialect.name == "postgresql":
        return session.scalar(text("SELECT now()"))
    return utcnow()


def next_counter(session: Session, name: str, by: int = 1) -> int:
    """Reserve ``by`` values of counter ``name`` under a row lock; returns the last one."""
    row = session.execute(select(Counter).where(Counter.name == name).with_for_update()).scalar_one_or_none()
    if row is None:
        row = Counter(name=name, value=0)
        session.add(row)
        session.flush()
    row.value += by
    session.flush()
    return row.value
