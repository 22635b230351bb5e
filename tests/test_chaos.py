"""Chaos: kill -9 workers mid-render, restart the broker with tasks queued, stop the server mid-stream,
all against real PostgreSQL, a real (private) Redis and real worker processes; every accepted request
ends answered exactly once (counted in SQL). The run is in tests/chaos.py; its report is printed."""

from __future__ import annotations

import json

import pytest

from chaos import PrivateRedis, chaos_redis, run_chaos, write_report
from conftest import make_settings

FAST = {"heartbeat_interval_s": 0.5, "heartbeat_stale_s": 4.0, "reaper_interval_s": 0.5,
        "requeue_queued_after_s": 3.0, "render_timeout_s": 60}


def chaos(tmp_path, tiny_preset, pg_url, **kwargs) -> dict:
    redis = PrivateRedis(tmp_path / "redis")
    redis.start()
    chaos_redis[redis.url] = redis
    try:
        settings = make_settings(tmp_path, tiny_preset, database_url=pg_url, broker_url=redis.url, **FAST)
        report = run_chaos(settings, **kwargs)
    finally:
        chaos_redis.pop(redis.url, None)
        redis.stop()
    write_report(report, tmp_path / "chaos.json")
    print("chaos report:", json.dumps({k: v for k, v in report.items() if not k.endswith("_ids")}))
    return report


@pytest.mark.integration
def test_chaos_no_request_lost_or_duplicated(tmp_path, tiny_preset, pg_database):
    report = chaos(tmp_path, tiny_preset, pg_database(), requests=12, clients=4, budget_s=150)
    assert report["faults_injected"] >= 3, report
    assert report["answered"] == report["requests"], report
    assert report["lost"] == 0 and report["duplicated"] == 0, report


@pytest.mark.integration
@pytest.mark.slow
def test_chaos_long(tmp_path, tiny_preset, pg_database):
    report = chaos(tmp_path, tiny_preset, pg_database(), requests=40, clients=8, budget_s=400,
                   faults=("kill_worker", "broker_restart", "server_stop", "kill_worker") * 3)
    assert report["lost"] == 0 and report["duplicated"] == 0 and report["answered"] == report["requests"], report
