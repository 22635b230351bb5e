"""SIGTERM: health flips to NOT_SERVING first, in-flight calls finish, the process exits 0; secrets never printed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from conftest import PG_ADMIN
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc
from test_ops_observability import free_port

PASSWORD = "hunter2-ops"  # local PostgreSQL trusts, so the password is accepted and ignored


def with_password(url: str) -> str:
    return url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


def test_settings_hide_urls():
    from pigment.services.common.settings import Settings

    s = Settings(database_url=with_password(PG_ADMIN), broker_url=f"redis://:{PASSWORD}@127.0.0.1:6379/0")
    assert PASSWORD not in repr(s) and PASSWORD not in str(s.model_dump())
    assert PASSWORD in s.database_url and PASSWORD in s.broker_url  # the code still reads them


def test_db_upgrade_does_not_print_the_password(pg_database, capsys):
    from pigment.services import cli

    url = with_password(pg_database())
    os.environ["PIGMENT_DATABASE_URL"] = url
    try:
        assert cli.main(["db", "upgrade"]) == 0
    finally:
        del os.environ["PIGMENT_DATABASE_URL"]
    out = capsys.readouterr()
    assert "upgrade to head" in out.out and PASSWORD not in out.out + out.err


@pytest.mark.integration
def test_sigterm_flips_health_then_drains_in_flight(tmp_path, tiny_preset, pg_database):
    port = free_port()
    env = {**os.environ, "PIGMENT_DATA_DIR": str(tmp_path / "data"), "PIGMENT_PRESET": str(tiny_preset),
           "PIGMENT_DATABASE_URL": with_password(pg_database()), "PIGMENT_RENDER_QUEUE": f"render.sigterm.{port}",
           "PIGMENT_SHUTDOWN_DELAY_S": "3", "PIGMENT_RENDER_TIMEOUT_S": "120"}
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pigment.services.cli", "serve", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while "pigment serving" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        history_pb2_grpc.HistoryServiceStub(channel).LogInteractions(
            history_pb2.LogInteractionsRequest(user_id="drain", create_user=True))
        result = {}

        def render():
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            try:
                result["resp"] = stub.GeneratePersonalized(gpb.GenerateRequest(
                    request_id="drain-1", user_id="drain", prompt="a star", num_images=4, num_inference_steps=60,
                    height=32, width=32), timeout=150)
            except grpc.RpcError as exc:
                result["error"] = exc

        caller = threading.Thread(target=render)
        caller.start()
        time.sleep(1.0)  # the call is in flight (preference + queue + render take seconds here)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        caller.join(150)
        assert "error" not in result, result.get("error")
        assert len(result["resp"].images) == 4
        assert proc.wait(60) == 0
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "serve.log").read_text()
    assert "NOT_SERVING; draining" in out and "drained" in out
    assert PASSWORD not in out
