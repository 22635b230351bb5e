"""Shared fixtures: a tiny preset built once, fresh PostgreSQL databases, running stacks.

The stacks are real: gRPC servers on a free port, a Celery worker child process,
SQLite or PostgreSQL, and the filesystem broker or Redis on localhost.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
PG_ADMIN = os.environ.get("PIGMENT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("PIGMENT_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory) -> Path:
    from pigment.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("presets") / "tiny")


@pytest.fixture(scope="session")
def pg_database():
    """A factory of fresh PostgreSQL databases (dropped at the end of the session)."""
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    created = []

    def make() -> str:
        name = f"pigment_test_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"

    yield make
    with admin.connect() as conn:
        for name in created:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def make_settings(tmp_path: Path, preset: Path, **overrides):
    from pigment.services.common.settings import Settings

    return Settings(**{"data_dir": tmp_path / "data", "preset": str(preset), "render_timeout_s": 120,
                       "render_queue": f"render.test.{uuid.uuid4().hex[:8]}", **overrides})


@contextmanager
def running_stack(settings, worker: bool = True, supervise: bool = False):
    """Migrate, start a worker process and a gRPC server; yields (stack, channel, worker)."""
    from pigment.services.stack import Stack, Worker
    from pigment.services.store.migrate import upgrade

    upgrade(settings.database_url)
    stack = Stack(settings)
    proc = Worker(settings, supervise=supervise).start() if worker else None
    server, port = stack.server(port=0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield stack, channel, proc
    finally:
        channel.close()
        server.stop(grace=1).wait()
        stack.close()  # the item index and the LISTEN connection
        if proc:
            proc.stop()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_preset):
    settings = make_settings(tmp_path_factory.mktemp("embedded"), tiny_preset)
    with running_stack(settings) as running:
        yield running
