"""GPU measurements of the serving path, in one run (for a lent GPU; `bench/gpu.sh` wraps it).

On an sd15-architecture preset (random weights, `pigment models build --arch sd15`, nothing downloaded):

* ``unet``: one UNet call at 512x512 per backend and precision (torch eager fp16 / bf16, torch.compile fp16,
  ONNX Runtime CUDA and TensorRT when installed), at 1 and 8 images (x2 for guidance); a backend that cannot
  run is recorded with its error, the others are still measured; ratios against torch eager fp16.
* ``render``: the worker's own ``Renderer`` (what a Celery worker runs) on cuda fp16, ``--steps`` steps,
  1, 4 and 8 images in one denoising loop (the gateway's micro-batching): latency and images/s.
* ``serve``: GeneratePersonalized end to end through real gRPC, the gateway, the queue (filesystem broker)
  and a real worker rendering on the GPU (``render_device=cuda``, ``render_dtype=fp16``).
* ``retrieval``: exact inner-product top-10 over 1M x 512 fp16 vectors with torch on the GPU, batch 1 and 64
  (what a GPU flat index costs), against the CPU brute force in bench/RESULTS.md.

    python bench/gpu.py --preset /tmp/sd15 --out bench/out/gpu.json [--sections unet,render,serve,retrieval]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds per call, each call synchronised (CUDA launches are asynchronous)."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def peak_gb() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0


UNET_CONFIGS = [("torch", "fp16", {}), ("torch", "bf16", {}), ("onnxruntime", "fp16", {}), ("tensorrt", "fp16", {})]
COMPILE_CONFIGS = [("torch", "fp16", {"compile": True})]  # its own section, last: inductor takes minutes


def unet_section(preset: str, device: str, repeats: int, configs=UNET_CONFIGS) -> list[dict]:
    from pigment.models.backends import load_unet_backend
    from pigment.models.loader import load_component

    if device == "cpu":
        configs = [("torch", "fp32", c[2]) for c in configs if c[0] == "torch"][:1]
    runs = []
    for backend, precision, options in configs:
        name = f"{backend}{'+compile' if options.get('compile') else ''} {precision}"
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
        try:
            unet = load_component(preset, "unet").to(device, dtype)
            cfg = unet.config
            t0 = time.perf_counter()
            runner = unet if backend == "torch" and not options else load_unet_backend(
                backend, unet, cache_dir=Path(preset) / ".engines", device=device,
                precision="fp16" if precision != "fp32" else "fp32", **options)
            load_s = time.perf_counter() - t0
            latent = 64 if device != "cpu" else cfg.sample_size
            for images in (1, 8):
                n = 2 * images
                x = torch.randn(n, cfg.in_channels, latent, latent, device=device, dtype=dtype)
                ehs = torch.randn(n, 77, cfg.cross_attention_dim, device=device, dtype=dtype)
                t = torch.full((n,), 500, device=device)
                if device != "cpu":
                    torch.cuda.reset_peak_memory_stats()
                with torch.inference_mode():
                    secs = timed(partial(runner, x, t, encoder_hidden_states=ehs, return_dict=False), repeats, warmup=3)
                runs.append({"backend": name, "images": images, "unet_batch": n, "latent": latent,
                             "unet_call_ms": round(1000 * statistics.median(secs), 2),
                             "load_s": round(load_s, 1), "peak_mem_gb": peak_gb()})
                print(json.dumps(runs[-1]), flush=True)
            if hasattr(runner, "close"):
                runner.close()
            del runner, unet
        except Exception as exc:  # noqa: BLE001  recorded, the other backends are still measured
            runs.append({"backend": name, "error": f"{type(exc).__name__}: {str(exc)[:400]}",
                         "traceback": traceback.format_exc(limit=2)[-800:]})
            print(json.dumps({k: runs[-1][k] for k in ("backend", "error")}), flush=True)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return runs


def unet_ratios(runs: list[dict]) -> dict:
    ref = {r["images"]: r["unet_call_ms"] for r in runs if r.get("backend") == "torch fp16" and "error" not in r}
    return {f"{r['backend']} / torch fp16, {r['images']} img": round(r["unet_call_ms"] / ref[r["images"]], 3)
            for r in runs if "error" not in r and r["backend"] != "torch fp16" and r["images"] in ref}


def render_section(preset: str, device: str, steps: int) -> list[dict]:
    from pigment.models.pipeline import Renderer, RenderInputs

    dtype = "fp16" if device != "cpu" else "fp32"
    t0 = time.perf_counter()
    renderer = Renderer(preset, device=device, dtype=dtype)
    load_s = time.perf_counter() - t0
    runs = []
    for images in (1, 4, 8):
        batch = [RenderInputs(segments=[f"a red star, request {i}"], num_inference_steps=steps, seed=i)
                 for i in range(images)]
        if device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        secs = timed(partial(renderer.render_batch, batch), repeats=3, warmup=1)
        s = statistics.median(secs)
        runs.append({"images": images, "steps": steps, "size": renderer.defaults["height"], "dtype": dtype,
                     "latency_s": round(s, 3), "images_per_s": round(images / s, 2),
                     "ms_per_step": round(1000 * s / steps, 1), "load_s": round(load_s, 1),
                     "peak_mem_gb": peak_gb()})
        print(json.dumps(runs[-1]), flush=True)
    return runs


def top10(queries: torch.Tensor, items: torch.Tensor):
    return torch.topk(queries @ items.T, 10, dim=1)


def retrieval_section(device: str, n: int, dim: int = 512) -> dict:
    """Exact top-10 by one matrix product on the device: recall 1.0 by construction."""
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.float16 if device != "cpu" else torch.float32
    items = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1).to(device, dtype)
    out = {"n": n, "dim": dim, "dtype": str(dtype).removeprefix("torch."),
           "memory_gb": round(items.numel() * items.element_size() / 2**30, 2)}
    for batch in (1, 64):
        queries = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device, dtype)
        secs = timed(partial(top10, queries, items), repeats=200, warmup=10)
        out[f"p50_ms_batch{batch}"] = round(1000 * statistics.median(secs), 3)
        out[f"p99_ms_batch{batch}"] = round(1000 * sorted(secs)[int(0.99 * len(secs)) - 1], 3)
    print(json.dumps(out), flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help="an sd15-architecture preset directory")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=10, help="timed UNet calls per configuration")
    p.add_argument("--sections", default="unet,render,serve,retrieval,compile", help="run in this order (compile last: inductor takes minutes)")
    p.add_argument("--retrieval-n", type=int, default=1_000_000)
    p.add_argument("--out", default="bench/out/gpu.json")
    args = p.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for a smoke run")
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "preset": args.preset,
              "device": torch.cuda.get_device_name(0) if args.device != "cpu" else platform.processor() or "cpu",
              "torch": torch.__version__, "python": platform.python_version()}

    def run(name, fn):
        print(f"[gpu] {name} ...", flush=True)
        t = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as exc:  # noqa: BLE001  one section failing keeps the others' numbers
            result[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-1500:]}
            print(result[name]["traceback"], flush=True)
        result[f"{name}_section_s"] = round(time.perf_counter() - t, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))

    import realsize

    overrides = {"render_device": args.device, "render_dtype": "fp16"} if args.device != "cpu" else {}
    sections = {
        "unet": lambda: unet_section(args.preset, args.device, args.repeats),
        "render": lambda: render_section(args.preset, args.device, args.steps),
        "serve": lambda: realsize.serve_once(args.preset, args.steps, None, **overrides),
        "retrieval": lambda: retrieval_section(args.device, args.retrieval_n),
        "compile": lambda: unet_section(args.preset, args.device, args.repeats, COMPILE_CONFIGS),
    }
    for name in args.sections.split(","):
        run(name, sections[name])
    unet_runs = [r for name in ("unet", "compile") if isinstance(result.get(name), list) for r in result[name]]
    result["unet_ratio_to_torch_fp16"] = unet_ratios(unet_runs)
    print("ratios:", json.dumps(result["unet_ratio_to_torch_fp16"]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("wrote", args.out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
