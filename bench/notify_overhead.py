"""Service overhead per request, SQL polling vs LISTEN/NOTIFY, on PostgreSQL + Redis with the toy preset.

Overhead = the gateway's total minus the worker's render time (history, preference, queueing, hand-offs and
the wait for the completion signal). Each mode runs N sequential GeneratePersonalized calls through real gRPC
and a real worker process; the only difference is ``PIGMENT_RENDER_NOTIFY`` (poll: re-read SQL every 50 ms;
auto: wake on NOTIFY).

    python bench/notify_overhead.py --requests 20 --out bench/out/notify_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import PG_ADMIN, REDIS_URL, make_settings, running_stack
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc


def fresh_database() -> tuple[str, object]:
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    name = f"pigment_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}", (admin, name)


def drop(handle) -> None:
    from sqlalchemy import text

    admin, name = handle
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def run(preset: Path, mode: str, n: int, steps: int) -> dict:
    url, handle = fresh_database()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            settings = make_settings(Path(tmp), preset, database_url=url, broker_url=REDIS_URL, render_notify=mode)
            with running_stack(settings) as (stack, channel, _):
                history_pb2_grpc.HistoryServiceStub(channel).LogInteractions(
                    history_pb2.LogInteractionsRequest(user_id="bench", create_user=True))
                stub = generation_pb2_grpc.GenerationServiceStub(channel)
                rows = []
                for i in range(n + 2):  # the first two warm the worker and the encoders up
                    resp = stub.GeneratePersonalized(gpb.GenerateRequest(
                        request_id=f"{mode}-{i}", user_id="bench", prompt="a star", num_images=1,
                        num_inference_steps=steps, seed=i + 1), timeout=600)
                    rows.append(dict(resp.timings_ms))
                kind = stack.notifier.kind
    finally:
        drop(handle)
    rows = rows[2:]
    overhead = [r["total"] - r["worker_render"] for r in rows]
    signal = [r["render"] - r["worker_render"] - r.get("queue_wait", 0.0) for r in rows]
    return {"mode": mode, "notifier": kind, "requests": n,
            "overhead_ms_median": round(statistics.median(overhead), 1),
            "overhead_ms_mean": round(statistics.mean(overhead), 1),
            "completion_signal_ms_median": round(statistics.median(signal), 1),
            "worker_render_ms_median": round(statistics.median(r["worker_render"] for r in rows), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default=str(Path(__file__).resolve().parents[1] / "models" / "presets" / "toy"))
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="bench/out/notify_overhead.json")
    args = ap.parse_args()
    report = {"preset": Path(args.preset).name, "steps": args.steps,
              "runs": [run(Path(args.preset), mode, args.requests, args.steps) for mode in ("poll", "auto")]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
