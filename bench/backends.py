"""Rendering backends side by side: UNet step latency and images/s per backend.

CPU (default): torch eager vs ONNX Runtime on a tiny UNet (per-operator overhead
dominates) and a mid-size UNet (compute dominates), batch 2 (= one image with
classifier-free guidance), rounds interleaved so a busy machine hurts both alike.
GPU (``--device cuda``): torch fp16 eager / torch.compile / ORT CUDA fp16 / TensorRT
fp16 on an SD 1.5-sized UNet from config at 512x512, batch 1 and 8, 30 guided steps.

    python bench/backends.py --out /tmp/backends.json [--preset tiny] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from pigment.models.backends import BackendUnavailable, ShapeProfile, load_unet_backend
from pigment.models.backends.export import export_vae_decoder
from pigment.models.backends.onnxruntime_backend import open_session

CROSS = ("CrossAttnDownBlock2D", "DownBlock2D")
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "sample_size": 8,
        "attention_head_dim": 8,
        "down_block_types": CROSS,
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    },
    "mid": {
        "block_out_channels": (128, 256, 256),
        "layers_per_block": 1,
        "cross_attention_dim": 128,
        "sample_size": 32,
        "attention_head_dim": 8,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    },
    "sd15": {
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "sample_size": 64,
        "attention_head_dim": 8,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    },
}
SEQ_LEN = 77
SD15_TFLOP_PER_CALL = 0.8  # per UNet call per image at 512x512
H100_TFLOPS = 790.0  # dense bf16/fp16


def build_unet(preset: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(in_channels=4, out_channels=4, **PRESETS[preset]).eval()


def unet_inputs(
    unet: UNet2DConditionModel, batch: int, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    size, ctx = unet.config.sample_size, unet.config.cross_attention_dim
    sample = torch.randn(batch, 4, size, size, generator=g)
    ehs = torch.randn(batch, SEQ_LEN, ctx, generator=g)
    return sample.to(device, dtype), torch.tensor(500), ehs.to(device, dtype)


def seconds_per_call(fn: Callable[[], Any], iters: int, device: str = "cpu") -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def interleaved(fns: dict[str, Callable[[], Any]], iters: int, rounds: int) -> dict[str, float]:
    """Median over rounds of seconds per call, backends alternating within each round."""
    for fn in fns.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(seconds_per_call(fn, iters))
    return {name: statistics.median(s) for name, s in samples.items()}


def measure_worker_batching(
    runner: Any, unet: UNet2DConditionModel, images: int, steps: int
) -> dict[str, float]:
    """Hook for worker batching: `images` guided images one at a time (UNet batch 2 each)
    vs all in one UNet batch of 2*images, through the same runner. Replace with the
    worker's own batched path once it exists."""
    one = unet_inputs(unet, 2)
    many = unet_inputs(unet, 2 * images)
    per_image = seconds_per_call(lambda: runner(*one), iters=images)
    per_batch = seconds_per_call(lambda: runner(*many), iters=1)
    return {
        "worker_batch_images": images,
        "unbatched_images_per_s": 1.0 / (per_image * steps),
        "batched_images_per_s": images / (per_batch * steps),
    }


def bench_cpu_preset(
    preset: str,
    batch: int,
    steps: int,
    iters: int,
    rounds: int,
    cache_dir: Path,
    batching_images: int,
    threads: int,
) -> dict[str, Any]:
    unet = build_unet(preset)
    size = unet.config.sample_size
    profile = ShapeProfile(
        batch=(1, batch, max(batch, 2 * batching_images)),
        height=(size, size, size),
        width=(size, size, size),
        seq_len=(1, SEQ_LEN, 2 * SEQ_LEN),
        multiple=1,
    )
    start = time.perf_counter()
    ort = load_unet_backend(
        "onnxruntime", unet, cache_dir=cache_dir, profile=profile, threads=threads
    )
    build_s = time.perf_counter() - start
    ref = load_unet_backend("torch", unet, cache_dir=cache_dir, profile=profile)
    args = unet_inputs(unet, batch)
    diff = (ort(*args).sample - ref(*args).sample).abs().max().item()
    times = interleaved(
        {"torch": lambda: ref(*args), "onnxruntime": lambda: ort(*args)}, iters, rounds
    )
    result = {
        "device": "cpu",
        "threads": threads,
        "preset": preset,
        "batch": batch,
        "latent": [size, size],
        "seq_len": SEQ_LEN,
        "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
        "torch_step_ms": times["torch"] * 1e3,
        "onnxruntime_step_ms": times["onnxruntime"] * 1e3,
        "ort_speedup": times["torch"] / times["onnxruntime"],
        "max_abs_diff": diff,
        "onnxruntime_build_or_load_s": build_s,
        "steps": steps,
        "images_per_s_note": f"UNet only, batch {batch} = {batch // 2} guided image(s), {steps} steps",
    }
    for name in ("torch", "onnxruntime"):
        result[f"{name}_images_per_s"] = (batch // 2) / (times[name] * steps)
    if batching_images:
        result.update(measure_worker_batching(ort, unet, batching_images, steps))
    return result


def bench_vae_decoder(iters: int, rounds: int, cache_dir: Path, threads: int) -> dict[str, Any]:
    """Does exporting the VAE decoder pay? Tiny-preset VAE, 8x8 latents -> 16x16 pixels."""
    torch.manual_seed(3)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()
    path = export_vae_decoder(vae, cache_dir / "vae_decoder.onnx", latent_hw=8)
    session = open_session(path, "cpu", threads)
    latent = torch.randn(1, 4, 8, 8)

    def eager() -> Any:
        with torch.inference_mode():
            return vae.decode(latent).sample

    feed = {"latent": latent.numpy()}
    diff = (torch.from_numpy(session.run(None, feed)[0]) - eager()).abs().max().item()
    times = interleaved(
        {"torch": eager, "onnxruntime": lambda: session.run(None, feed)}, iters, rounds
    )
    return {
        "component": "vae_decoder",
        "latent": [8, 8],
        "torch_ms": times["torch"] * 1e3,
        "onnxruntime_ms": times["onnxruntime"] * 1e3,
        "ort_speedup": times["torch"] / times["onnxruntime"],
        "max_abs_diff": diff,
    }


def bench_gpu(batches: list[int], steps: int, cache_dir: Path) -> list[dict[str, Any]]:
    """SD 1.5-sized UNet at 512x512 (64x64 latents), fp16, guided: UNet batch = 2 x images."""
    unet = build_unet("sd15").to("cuda", torch.float16)
    profile = ShapeProfile(
        batch=(1, 2, 2 * max(batches)),
        height=(64, 64, 64),
        width=(64, 64, 64),
        seq_len=(77, 77, 154),
        multiple=8,
    )
    variants = {
        "torch_fp16": ("torch", {}),
        "torch_compile_fp16": ("torch", {"compile": True}),
        "onnxruntime_cuda_fp16": ("onnxruntime", {}),
        "tensorrt_fp16": ("tensorrt", {}),
    }
    rows = []
    for label, (name, opts) in variants.items():
        try:
            runner = load_unet_backend(
                name,
                unet,
                cache_dir=cache_dir,
                device="cuda",
                precision="fp16",
                profile=profile,
                **opts,
            )
        except (BackendUnavailable, RuntimeError) as exc:
            rows.append(
                {"device": torch.cuda.get_device_name(), "backend": label, "error": str(exc)}
            )
            continue
        for images in batches:
            args = unet_inputs(unet, 2 * images, "cuda", torch.float16)
            for _ in range(3):
                runner(*args)
            step_s = seconds_per_call(lambda r=runner, a=args: r(*a), steps, "cuda")
            floor_s = SD15_TFLOP_PER_CALL * 2 * images / H100_TFLOPS
            rows.append(
                {
                    "device": torch.cuda.get_device_name(),
                    "preset": "sd15",
                    "backend": label,
                    "images": images,
                    "batch": 2 * images,
                    "steps": steps,
                    "step_ms": step_s * 1e3,
                    "it_per_s": 1.0 / step_s,
                    "images_per_s": images / (step_s * steps),
                    "flop_floor_fraction": floor_s / step_s,
                }
            )
        runner.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="all", choices=["all", "tiny", "mid"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--iters", type=int, default=10, help="UNet calls per timing round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch and ORT CPU threads")
    args = parser.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or Path(tmp)
        report: dict[str, Any] = {
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
            "torch": torch.__version__,
        }
        if args.device == "cuda":
            report["gpu"] = bench_gpu([1, 8], 30, cache_dir)
        else:
            presets = ["tiny", "mid"] if args.preset == "all" else [args.preset]
            report["results"] = [
                bench_cpu_preset(
                    p,
                    args.batch,
                    args.steps,
                    args.iters if p == "tiny" else max(2, args.iters // 5),
                    args.rounds,
                    cache_dir,
                    16 if p == "tiny" else 4,
                    threads,
                )
                for p in presets
            ]
            report["vae_decoder"] = bench_vae_decoder(args.iters, args.rounds, cache_dir, threads)
            report.update(report["results"][0])  # the tiny preset's keys at top level
    report["load_avg_1m_at_end"] = os.getloadavg()[0]  # the CPU VM is shared
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
