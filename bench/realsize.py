"""Real-size measurements: an SD 1.5-architecture preset (random weights, `pigment models build --arch sd15`).

Per backend, in a fresh child process (so peak RSS is that process's own): load time, per-UNet-call time at
512x512 (batch 2: classifier-free guidance), VAE decode time, a whole render (``--steps`` steps), peak RSS.
Then the service end to end: a real gRPC server and Celery worker on the preset, one GeneratePersonalized at
the preset's 512x512 with ``--steps`` steps; first-request time, and the service's own overhead
(total - the worker's render time) as a share of the render.

    nice -n 10 python bench/realsize.py --preset /tmp/sd15 --steps 1 --backends torch,onnxruntime \
        --out bench/out/realsize.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(preset: str, backend: str, steps: int, calls: int, cache: str, exporter: str = "torchscript",
          low_memory: bool = False, render: bool = True) -> dict:
    """Runs in its own process: the renderer alone (``load_s`` includes the ONNX export on a cache miss)."""
    import torch
    from pigment.models.pipeline import Renderer, RenderInputs

    torch.manual_seed(0)
    t0 = time.perf_counter()
    options = {"exporter": exporter, "low_memory": low_memory} if backend == "onnxruntime" else {}
    renderer = Renderer(preset, backend=backend, cache_dir=Path(cache), backend_options=options)
    load_s = time.perf_counter() - t0
    size = renderer.defaults["height"]
    latent = size // renderer.vae_scale
    unet = renderer.pipe.unet
    sample = torch.randn(2, 4, latent, latent)
    ehs = torch.randn(2, renderer.tokenizer.model_max_length, renderer.text_dim)
    unet_s = []
    with torch.inference_mode():
        for _ in range(calls):
            t = time.perf_counter()
            unet(sample, torch.tensor(500), encoder_hidden_states=ehs, return_dict=False)
            unet_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        renderer.pipe.vae.decode(torch.randn(1, 4, latent, latent) / renderer.pipe.vae.config.scaling_factor)
        vae_s = time.perf_counter() - t
    t = time.perf_counter()
    if render:
        renderer.render(RenderInputs(segments=["a red star"], num_inference_steps=steps, seed=1))
    render_s = time.perf_counter() - t if render else None
    return {"backend": backend, **options, "size": size,
            "load_s": round(load_s, 2),
            "unet_call_s": [round(x, 2) for x in unet_s], "unet_batch": 2, "vae_decode_s": round(vae_s, 2),
            "render_s": render_s and round(render_s, 2), "steps": steps, "peak_rss_mb": round(peak_rss_mb())}


def measure_backend(preset: str, backend: str, steps: int, calls: int, cache: str, exporter: str = "torchscript",
                    max_rss_mb: float | None = None, low_memory: bool = False, render: bool = True) -> dict:
    """The child's result; on a shared machine it is killed (and says so) once its RSS passes ``max_rss_mb``."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import realsize; "
            f"print('RESULT', json.dumps(realsize.child({preset!r}, {backend!r}, {steps}, {calls}, {cache!r}, "
            f"{exporter!r}, {low_memory!r}, {render!r})))")
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=err, text=True)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, rss_mb(proc.pid) or 0.0)
            if max_rss_mb and peak > max_rss_mb:
                proc.kill()
                proc.wait()
                return {"backend": backend, "error": f"killed at {peak:.0f} MB RSS "
                        f"(--max-rss-mb {max_rss_mb:.0f}) after {time.perf_counter() - t0:.0f} s"}
            time.sleep(0.5)
        out.seek(0)
        err.seek(0)
        line = next((x for x in out.read().splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            return {"backend": backend, "error": err.read()[-1500:]}
    return {**json.loads(line[7:]), "process_s": round(time.perf_counter() - t0, 1)}


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def ratios(backends: list[dict]) -> dict:
    """Each backend's fastest UNet call and VAE decode against torch's (below 1: faster than torch)."""
    ok = {b["backend"]: b for b in backends if "error" not in b}
    if "torch" not in ok:
        return {}
    ref = ok["torch"]
    return {name: {"unet_call": round(min(b["unet_call_s"]) / min(ref["unet_call_s"]), 3),
                   "render": round(b["render_s"] / ref["render_s"], 3) if b["render_s"] and ref["render_s"] else None,
                   "peak_rss": round(b["peak_rss_mb"] / ref["peak_rss_mb"], 3)}
            for name, b in ok.items() if name != "torch"}


def serve_once(preset: str, steps: int, broker: str | None, **overrides) -> dict:
    """One request through gRPC, the gateway, the queue and a real worker (``overrides``: more Settings, e.g.
    ``render_device="cuda"``)."""
    import grpc
    from pigment.services.common.settings import Settings
    from pigment.services.stack import Stack, Worker
    from pigment.services.store.migrate import upgrade
    from pigment.v1 import generation_pb2 as gen_pb
    from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc

    data = Path(tempfile.mkdtemp(prefix="realsize-"))
    extra = {"broker_url": broker} if broker else {}
    settings = Settings(data_dir=data, preset=preset, render_timeout_s=1800, render_queue=f"render.realsize.{time.time_ns()}",
                        **extra, **overrides)
    upgrade(settings.database_url)
    t0 = time.perf_counter()
    stack = Stack(settings)
    verify = stack.verify_models()
    worker = Worker(settings).start(wait_ready_s=1800)
    server, port = stack.server(port=0)
    server.start()
    start_s = time.perf_counter() - t0
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        history = history_pb2_grpc.HistoryServiceStub(channel)
        history.LogInteractions(history_pb2.LogInteractionsRequest(user_id="u", create_user=True))
        gen = generation_pb2_grpc.GenerationServiceStub(channel)
        out = []
        for n in range(2):  # the first loads the models in both processes; the second is steady state
            t = time.perf_counter()
            resp = gen.GeneratePersonalized(gen_pb.GenerateRequest(
                request_id=f"realsize-{n}", user_id="u", prompt="a red star", num_inference_steps=steps,
                method=gen_pb.METHOD_NON_PERSONALIZED), timeout=1800)
            wall = (time.perf_counter() - t) * 1000
            timings = dict(resp.timings_ms)
            render = timings.get("worker_render", 0.0)
            out.append({"wall_ms": round(wall), "worker_render_ms": round(render),
                        "overhead_ms": round(wall - render), "overhead_share": round((wall - render) / wall, 4),
                        "image_bytes": len(resp.images[0].png), "timings_ms": {k: round(v) for k, v in timings.items()}})
        channel.close()
        worker_rss = vm_hwm_mb(worker.proc.pid)  # the solo-pool worker renders in its own process
    finally:
        server.stop(grace=1).wait()
        worker.stop()
    return {"broker": settings.broker_url, "start_s": round(start_s, 1), "verify": verify, "requests": out,
            "gateway_peak_rss_mb": round(peak_rss_mb()), "worker_peak_rss_mb": worker_rss}


def vm_hwm_mb(pid: int) -> float | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help="an sd15-architecture preset (pigment models build --arch sd15)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--calls", type=int, default=2, help="timed UNet calls per backend")
    p.add_argument("--backends", default="torch", help="comma list: torch,onnxruntime")
    p.add_argument("--serve", action="store_true", help="also one request end to end through gRPC + worker")
    p.add_argument("--broker", default=None, help="e.g. redis://127.0.0.1:6379/0 (default: filesystem)")
    p.add_argument("--cache", default=None, help="engine cache dir (default: a temp dir)")
    p.add_argument("--ort-exporter", default="torchscript", choices=("torchscript", "dynamo"),
                   help="ONNX exporter for onnxruntime (dynamo streams the weights: less memory)")
    p.add_argument("--max-rss-mb", type=float, default=None, help="kill a backend's process past this RSS")
    p.add_argument("--ort-low-memory", action="store_true", help="onnxruntime without pre-packing or arena")
    p.add_argument("--no-render", action="store_true", help="UNet calls and VAE decode only, no whole render")
    p.add_argument("--out", default="bench/out/realsize.json")
    p.add_argument("--append", action="store_true", help="add to the results already in --out (e.g. --backends '' "
                   "--serve after a backends run)")
    args = p.parse_args()
    import os

    cache = args.cache or tempfile.mkdtemp(prefix="realsize-engines-")
    result = {"preset": args.preset, "loadavg_start": os.getloadavg(),
              "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                                                 "platform": platform.platform()},
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "backends": []}
    if args.append and Path(args.out).is_file():
        result = {**json.loads(Path(args.out).read_text()), "appended": result}
    for backend in filter(None, args.backends.split(",")):
        print(f"[realsize] {backend} ...", flush=True)
        result["backends"].append(measure_backend(args.preset, backend, args.steps, args.calls, cache,
                                                  args.ort_exporter, args.max_rss_mb, args.ort_low_memory,
                                                  not args.no_render))
        print(json.dumps(result["backends"][-1]), flush=True)
        write(args.out, result)  # each phase is kept, whatever happens to the next
    if result["backends"]:
        result["ratio_to_torch"] = ratios(result["backends"])
        print("ratio to torch (fastest UNet call, render, peak RSS):", json.dumps(result["ratio_to_torch"]))
    if args.serve:
        print("[realsize] serving one request end to end ...", flush=True)
        result["serve"] = serve_once(args.preset, args.steps, args.broker)
        print(json.dumps(result["serve"]), flush=True)
    result["loadavg_end"] = os.getloadavg()
    write(args.out, result)
    return 0


def write(out: str, result: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
