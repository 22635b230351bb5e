"""Alembic, driven from code: ``pigment db upgrade`` and the tests use these."""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.pool import NullPool

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


MIGRATION_LOCK = 0x70696731  # pg_advisory_lock key ("pig1"): one migrator at a time across all pods


def upgrade(url: str, revision: str = "head") -> None:
    if url.startswith("sqlite:///"):  # a fresh embedded install has no data directory yet
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with migration_lock(url):
        command.upgrade(alembic_config(url), revision)


@contextmanager
def migration_lock(url: str):
    """On PostgreSQL, hold a session advisory lock while migrating: a second migrator (another job, a
    gateway started by hand) waits, then finds the schema at head and does nothing. Elsewhere a no-op."""
    if not url.startswith("postgresql"):
        yield
        return
    from sqlalchemy import create_engine, text

    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
                conn.commit()
    finally:
        engine.dispose()


@lru_cache(maxsize=1)
def _revisions() -> tuple[str, frozenset[str]]:
    """(head, every revision this code ships), read once from the migration scripts."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return scripts.get_current_head(), frozenset(r.revision for r in scripts.walk_revisions())


def schema_problem(session) -> str | None:
    """Why the database behind ``session`` is not migrated for this code, or None when it is. A revision
    this code does not know is a newer one (a rolling upgrade migrated ahead): not a problem."""
    from sqlalchemy import inspect, text

    conn = session.connection()
    head, known = _revisions()
    # the catalog, not a failing SELECT: a failed statement would abort a PostgreSQL transaction
    if not inspect(conn).has_table("alembic_version"):
        return (f"database schema is not migrated (no alembic_version table; this code needs {head}): run "
                "`pigment db upgrade` (`pigment serve` does, unless --no-migrate)")
    current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    if current is None or (current in known and current != head):
        return f"database schema is at {current or 'no revision'}, this code needs {head}: run `pigment db upgrade`"
    return None


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def revision(url: str, message: str) -> None:
    """Autogenerate a migration from the difference between the database at ``url`` and the tables."""
    command.revision(alembic_config(url), message=message, autogenerate=True)
