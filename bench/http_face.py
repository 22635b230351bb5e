"""What fetching a generation costs on each face: GetGeneration over gRPC (metadata only, inline PNG, signed
URL), the same over the HTTP/JSON face, the PNG by signed URL, and StreamGenerationImage.

    python bench/http_face.py --calls 200 --out bench/out/http_face.json

Starts the embedded stack (SQLite, a real Celery worker on the filesystem broker, gRPC, the HTTP face) on a
fresh directory with the ``tiny`` preset built from configs, renders one image at ``--size``, then times
``--calls`` sequential calls of each kind from one client. Prints p50/p95 in ms and each kind's p50 as a
ratio to gRPC metadata-only. Writes {"kinds": {name: {"p50_ms", "p95_ms"}}, "png_bytes", ...}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path


def timed(fn, calls: int) -> dict:
    fn()  # warm: connections, caches
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    q = statistics.quantiles(samples, n=20)
    return {"p50_ms": statistics.median(samples), "p95_ms": q[18]}


def kinds(gen, gid: str, http_url: str) -> dict:
    from pigment.v1 import generation_pb2 as gpb
    from pigment.v1 import media_pb2

    def get(delivery):
        return lambda: gen.GetGeneration(
            gpb.GetGenerationRequest(generation_id=gid, delivery=delivery)
        )

    signed = gen.GetGeneration(
        gpb.GetGenerationRequest(generation_id=gid, delivery=media_pb2.IMAGE_DELIVERY_URL)
    ).generation.image.url

    def fetch(url):
        def call():
            with urllib.request.urlopen(url, timeout=30) as resp:
                return resp.read()

        return call

    return {
        "grpc GetGeneration NONE": get(media_pb2.IMAGE_DELIVERY_NONE),
        "grpc GetGeneration INLINE": get(media_pb2.IMAGE_DELIVERY_INLINE),
        "grpc GetGeneration URL": get(media_pb2.IMAGE_DELIVERY_URL),
        "http GET /v1/generations/{id}": fetch(f"{http_url}/v1/generations/{gid}"),
        "http GET signed image URL": fetch(signed),
        "grpc StreamGenerationImage": lambda: b"".join(
            c.chunk.data
            for c in gen.StreamGenerationImage(gpb.StreamGenerationImageRequest(generation_id=gid))
        ),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument(
        "--size", type=int, default=0, help="image side in pixels (0: the preset's default)"
    )
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import grpc
    from pigment.models.tiny import build_tiny
    from pigment.services.common.settings import Settings
    from pigment.services.stack import Stack, Worker
    from pigment.services.store.migrate import upgrade
    from pigment.v1 import generation_pb2 as gpb
    from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc

    tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
    settings = Settings(
        data_dir=tmp / "data", preset=str(build_tiny(tmp / "tiny")), render_queue="render.bench"
    )
    upgrade(settings.database_url)
    stack = Stack(settings)
    worker = Worker(settings).start()
    server, port = stack.server(port=0)
    server.start()
    http = stack.http_server(0).start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        history_pb2_grpc.HistoryServiceStub(channel).LogInteractions(
            history_pb2.LogInteractionsRequest(user_id="bench", create_user=True)
        )
        gen = generation_pb2_grpc.GenerationServiceStub(channel)
        result = gen.GeneratePersonalized(
            gpb.GenerateRequest(
                request_id="bench-1",
                user_id="bench",
                num_images=1,
                num_inference_steps=2,
                height=args.size,
                width=args.size,
            ),  # 0: the preset's
            timeout=300,
        )
        gid = result.images[0].generation_id
        png = len(
            gen.GetGeneration(gpb.GetGenerationRequest(generation_id=gid)).generation.image.png
        )
        results = {name: timed(fn, args.calls) for name, fn in kinds(gen, gid, http.url).items()}
    finally:
        http.stop()
        server.stop(0)
        stack.close()
        worker.stop()
    base = results["grpc GetGeneration NONE"]["p50_ms"]
    print(f"{'call':34s} {'p50 ms':>8s} {'p95 ms':>8s} {'p50 / grpc NONE':>16s}   ({png} B PNG)")
    for name, r in results.items():
        print(f"{name:34s} {r['p50_ms']:8.2f} {r['p95_ms']:8.2f} {r['p50_ms'] / base:16.2f}")
    out = {
        "kinds": results,
        "png_bytes": png,
        "calls": args.calls,
        "size": args.size,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.platform(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
