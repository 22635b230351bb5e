"""Batched vs unbatched render-worker throughput for N concurrent GeneratePersonalized calls.

Both runs use the real embedded stack (gRPC, SQLite, a Celery worker process on
the filesystem broker); the only difference is the gateway's micro-batching
window. Prints the ratio and writes JSON.

    python bench/worker_batching.py --requests 16 --out bench/out/worker_batching.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_settings, running_stack
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc


def run(preset: Path, window_ms: float, n: int, steps: int, tag: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        settings = make_settings(Path(tmp), preset, render_batch_window_ms=window_ms, render_max_batch=n)
        with running_stack(settings) as (_, channel, _):
            history_pb2_grpc.HistoryServiceStub(channel).LogInteractions(
                history_pb2.LogInteractionsRequest(user_id="bench", create_user=True))
            stub = generation_pb2_grpc.GenerationServiceStub(channel)

            def call(i, prefix):
                return stub.GeneratePersonalized(gpb.GenerateRequest(
                    request_id=f"{prefix}-{i}", user_id="bench", prompt="a star", num_images=1,
                    num_inference_steps=steps, seed=i + 1), timeout=600)

            call(0, "warmup")  # load the models in the worker first
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                list(pool.map(lambda i: call(i, tag), range(n)))
            seconds = time.perf_counter() - t0
    return {"window_ms": window_ms, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default=None, help="preset dir (default: build tiny in a temp dir)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--window-ms", type=float, default=200.0)
    ap.add_argument("--out", default="bench/out/worker_batching.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        preset = Path(args.preset) if args.preset else __import__(
            "pigment.models.tiny", fromlist=["build_tiny"]).build_tiny(Path(tmp) / "tiny")
        unbatched = run(preset, 0.0, args.requests, args.steps, "unbatched")
        batched = run(preset, args.window_ms, args.requests, args.steps, "batched")
    report = {
        "device": f"cpu ({platform.machine()}, {__import__('os').cpu_count()} cores)",
        "preset": args.preset or "tiny", "requests": args.requests, "steps": args.steps,
        "unbatched_images_per_s": unbatched["images_per_s"], "batched_images_per_s": batched["images_per_s"],
        "speedup": round(batched["images_per_s"] / unbatched["images_per_s"], 2),
        "runs": {"unbatched": unbatched, "batched": batched},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
