"""Catalog ingestion throughput through the real gRPC service (`pigment ingest --address`).

    nice -n 10 python bench/ingest.py --n 2000 --out /tmp/ingest.json [--preset DIR] [--batch 256]

A fresh embedded stack (SQLite in WAL mode, a local FAISS index, the preset's
CLIP; default the tiny preset built from configs) serves on a free port in
this process; ``n`` toy-world items (32x32 PNG files beside a JSONL file) are
ingested with ``ingest()`` + ``GrpcSink``, exactly what the CLI runs. Reported:
items/s end to end, per-batch latency, and where the time goes (reading the
file, measured apart; inside the service, which runs in this process: CLIP
image embedding, PNG writes to image storage, FAISS catch-up; the rest is
gRPC + SQL), plus a rerun after completion (which should cost only reading).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
from pigment.services.common.settings import Settings
from pigment.services.history.ingest import GrpcSink, _batches, ingest
from pigment.services.stack import Stack
from pigment.services.store.migrate import upgrade
from pigment.training.toy_world import png_bytes, random_items


def write_items(directory: Path, n: int, seed: int) -> Path:
    attrs, images = random_items(n, seed)
    (directory / "images").mkdir(parents=True)
    path = directory / "items.jsonl"
    with open(path, "w") as fh:
        for k, (a, img) in enumerate(zip(attrs, images)):
            (directory / "images" / f"{k}.png").write_bytes(png_bytes(img))
            cap = f"a {a['size']} {a['colour']} {a['shape']} on a {a['background']} background"
            fh.write(
                json.dumps(
                    {
                        "item_id": f"bench-{k:06d}",
                        "caption": cap,
                        "image_path": f"images/{k}.png",
                        "attributes": a,
                    }
                )
                + "\n"
            )
    return path


class TimedSink(GrpcSink):
    def __init__(self, channel):
        super().__init__(channel)
        self.latencies: list[float] = []

    def upsert(self, records):
        t0 = time.perf_counter()
        model = super().upsert(records)
        self.latencies.append(time.perf_counter() - t0)
        return model


def time_stages(stack: Stack) -> dict[str, float]:
    """Wrap the in-process service's CLIP, image storage and index catch-up with timers (seconds)."""
    spent = {"clip_embed": 0.0, "image_storage_put": 0.0, "index_sync": 0.0}

    def timed(obj, name: str, key: str) -> None:
        inner = getattr(obj, name)

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t0

        setattr(obj, name, wrapper)

    timed(stack.history.embedder, "embed_images", "clip_embed")
    timed(stack.history.storage, "put", "image_storage_put")
    timed(stack.history.index, "sync", "index_sync")
    return spent


def read_only(items: Path, batch: int) -> float:
    t0 = time.perf_counter()
    for _ in _batches(items, 0, batch, 1 << 30):
        pass
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument(
        "--preset", default=None, help="preset directory (default: tiny, built from configs)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="pigment-ingest-bench-") as tmp:
        tmp = Path(tmp)
        preset = args.preset
        if preset is None:
            from pigment.models.tiny import build_tiny

            preset = str(build_tiny(tmp / "tiny"))
        settings = Settings(
            data_dir=tmp / "data", preset=preset, render_queue=f"bench.{uuid.uuid4().hex[:8]}"
        )
        upgrade(settings.database_url)
        stack = Stack(settings)
        t0 = time.perf_counter()
        model_id = stack.history.embedder.model_id
        _ = stack.history.index
        load_s = time.perf_counter() - t0
        items = write_items(tmp / "catalog", args.n, args.seed)
        read_s = read_only(items, args.batch)
        spent = time_stages(stack)
        server, port = stack.server(port=0)
        server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                sink = TimedSink(channel)
                report = ingest(items, sink, args.batch, show_progress=False)
                t1 = time.perf_counter()
                rerun = ingest(items, GrpcSink(channel), args.batch, show_progress=False)
                rerun_s = time.perf_counter() - t1
        finally:
            server.stop(grace=1).wait()
        stats = stack.history.index.stats()
        stack.history.index.close()

    lat = sorted(sink.latencies)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "python": sys.version.split()[0],
        "load_avg_1m": os.getloadavg()[0],
        "preset": args.preset
        or "tiny (random weights, CLIP ViT 32x32/patch 8, width 32, projection 32)",
        "embedding_model": model_id,
        "n": args.n,
        "batch": args.batch,
        "model_load_s": round(load_s, 2),
        "upserted": report.upserted,
        "seconds": round(report.seconds, 2),
        "items_per_s": round(report.items_per_s, 1),
        "batch_latency_s": {
            "p50": round(statistics.median(lat), 3),
            "max": round(lat[-1], 3),
            "batches": len(lat),
        },
        "breakdown_s": {
            "read_and_parse_file": round(read_s, 2),
            **{k: round(v, 2) for k, v in spent.items()},
            "grpc_and_sql_rest": round(report.seconds - read_s - sum(spent.values()), 2),
        },
        "rerun_after_complete_s": round(rerun_s, 3),
        "rerun_upserted": rerun.upserted - report.upserted,
        "index": {k: stats[k] for k in ("kind", "ntotal")},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
