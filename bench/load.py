"""Load on the real stack over loopback: latency, throughput, and how fast a full queue says no.

Phase ``serve``: N concurrent clients send M GeneratePersonalized calls (distinct request ids) to a
running stack (gRPC server, real Celery worker processes, SQLite + filesystem broker by default, or
``--database-url``/``--broker-url``): p50/p99 latency and throughput of answered calls.
Phase ``full``: a stack with no worker and ``--queue-depth`` Q: Q calls wait in the queue, then K more
are rejected RESOURCE_EXHAUSTED (rejection latency p50/p99, target under 50 ms), then health checks are
timed (target under 100 ms); these callers run in a process of their own, as real clients do. Bounded by count and by ``--budget-s``. Writes JSON.

    nice -n 10 .venv/bin/python bench/load.py --clients 8 --requests 32 --out bench/out/load.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import grpc
from conftest import make_settings, running_stack  # the same stack the tests run
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)


def request(rid: str, steps: int) -> gpb.GenerateRequest:
    return gpb.GenerateRequest(request_id=rid, user_id="bench", prompt="a star", num_images=1,
                               num_inference_steps=steps, height=32, width=32)


def add_user(channel) -> None:
    history_pb2_grpc.HistoryServiceStub(channel).LogInteractions(
        history_pb2.LogInteractionsRequest(user_id="bench", create_user=True), timeout=30)


def timed(fn) -> tuple[str, float]:
    t0 = time.perf_counter()
    try:
        fn()
        code = "OK"
    except grpc.RpcError as err:
        code = err.code().name
    return code, time.perf_counter() - t0


def serve_phase(preset: Path, args, extra: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        settings = make_settings(Path(tmp), preset, max_queue_depth=max(256, args.requests), **extra)
        with running_stack(settings) as (_, channel, _):
            add_user(channel)
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            timed(lambda: stub.GeneratePersonalized(request("warm", args.steps), timeout=300))  # model load
            stop_at = time.monotonic() + args.budget_s

            def call(i):
                if time.monotonic() > stop_at:
                    return "SKIPPED", 0.0
                return timed(lambda: stub.GeneratePersonalized(request(f"load-{i}", args.steps), timeout=300))

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                results = list(pool.map(call, range(args.requests)))
            wall = time.perf_counter() - t0
    ok = [t for c, t in results if c == "OK"]
    codes = {c: sum(1 for x, _ in results if x == c) for c, _ in results}
    return {"clients": args.clients, "requests": args.requests, "steps": args.steps, "codes": codes,
            "p50_ms": pct(ok, 0.5), "p99_ms": pct(ok, 0.99), "mean_ms": round(statistics.mean(ok) * 1000, 1) if ok else None,
            "throughput_rps": round(len(ok) / wall, 3), "wall_s": round(wall, 1)}


def server_rejections() -> dict[str, float]:
    """Sum, count and buckets of this process's pigment_rpc_seconds for rejected GeneratePersonalized calls."""
    from prometheus_client import REGISTRY

    labels = {"method": "GeneratePersonalized", "code": "RESOURCE_EXHAUSTED"}
    found = {k: REGISTRY.get_sample_value(f"pigment_rpc_seconds_{k}", labels) or 0.0 for k in ("sum", "count")}
    for le in ("0.01", "0.05"):
        found[f"le_{le}"] = REGISTRY.get_sample_value("pigment_rpc_seconds_bucket", {**labels, "le": le}) or 0.0
    return found


def over_limit_calls(target: str, clients: int, calls: int) -> tuple[list[tuple[str, float]], list[float]]:
    """In a separate process: ``calls`` GeneratePersonalized calls over the limit from ``clients`` threads (a
    warm-up call first: the first call on a channel pays its connection), then as many health checks."""
    with grpc.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        timed(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10))
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda i: timed(lambda: stub.GeneratePersonalized(
                request(f"over-{i}", 2), timeout=30)), range(calls)))
        health_s = [timed(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5))[1] for _ in range(calls)]
    return results, health_s


def full_phase(preset: Path, args, extra: dict) -> dict:
    from pigment.services.stack import Stack
    from pigment.services.store.migrate import upgrade
    from pigment.services.store.tables import RenderRequest
    from sqlalchemy import func, select

    with tempfile.TemporaryDirectory() as tmp:
        settings = make_settings(Path(tmp), preset, max_queue_depth=args.queue_depth, render_timeout_s=120, **extra)
        upgrade(settings.database_url)
        stack = Stack(settings)  # no worker: the admitted calls wait, and the queue stays full
        server, port = stack.server(port=0)
        server.start()
        try:
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            add_user(channel)
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            waiting = [threading.Thread(target=timed, daemon=True, args=(
                lambda i=i: stub.GeneratePersonalized(request(f"fill-{i}", 2), timeout=120),)) for i in range(args.queue_depth)]
            for t in waiting:
                t.start()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with stack.sessions() as s:
                    if s.scalar(select(func.count()).select_from(RenderRequest)
                                .where(RenderRequest.status == "queued")) >= args.queue_depth:
                        break
                time.sleep(0.05)
            # the callers run in a process of their own, as real clients do: client threads sharing the
            # server's interpreter (and its GIL) would be timed as if they were the server's own cost
            before = server_rejections()
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients:
                results, health_s = clients.submit(over_limit_calls, f"127.0.0.1:{port}", args.clients,
                                                   args.reject_calls).result()
            handled = {k: v - before[k] for k, v in server_rejections().items()}
            rejections = [t for c, t in results if c == "RESOURCE_EXHAUSTED"]
            with stack.sessions() as s:  # waiting in the queue (a shared database may hold done rows too)
                admitted = s.scalar(select(func.count()).select_from(RenderRequest)
                                    .where(RenderRequest.status.in_(("queued", "running"))))
            channel.close()
        finally:
            server.stop(0).wait()
            stack.close()
    return {"queue_depth": args.queue_depth, "calls_over_limit": args.reject_calls, "clients": args.clients,
            "rejected": len(rejections), "admitted_rows": admitted,
            "reject_p50_ms": pct(rejections, 0.5), "reject_p99_ms": pct(rejections, 0.99),
            # the server's own handling time of those calls (its pigment_rpc_seconds histogram): the rest of
            # what a caller waits is gRPC transport and CPU scheduling on the machine
            "server_reject_mean_ms": round(handled["sum"] / handled["count"] * 1000, 2) if handled["count"] else None,
            "server_reject_within_10ms": round(handled["le_0.01"] / handled["count"], 3) if handled["count"] else None,
            "server_reject_within_50ms": round(handled["le_0.05"] / handled["count"], 3) if handled["count"] else None,
            "health_p50_ms": pct(health_s, 0.5), "health_p99_ms": pct(health_s, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--queue-depth", type=int, default=4)
    ap.add_argument("--reject-calls", type=int, default=50)
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--database-url", default="")
    ap.add_argument("--broker-url", default="")
    ap.add_argument("--preset", type=Path, default=None, help="a preset directory (default: build tiny)")
    ap.add_argument("--phase", choices=["both", "serve", "full"], default="both")
    ap.add_argument("--out", type=Path, default=Path("bench/out/load.json"))
    args = ap.parse_args()
    extra = {k: v for k, v in (("database_url", args.database_url), ("broker_url", args.broker_url)) if v}
    with tempfile.TemporaryDirectory() as presets:
        from pigment.models.tiny import build_tiny

        preset = args.preset or build_tiny(Path(presets) / "tiny")
        report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {platform.processor()}",
                  "backend": extra or "embedded (SQLite + filesystem broker)",
                  "serve": serve_phase(preset, args, extra) if args.phase in ("both", "serve") else None,
                  "full_queue": full_phase(preset, args, extra) if args.phase in ("both", "full") else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
