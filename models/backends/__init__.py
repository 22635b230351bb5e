"""UNet rendering backends chosen by name: ``torch``, ``onnxruntime``, ``tensorrt``.

    runner = load_unet_backend("onnxruntime", unet, cache_dir=Path("~/.cache/pigment"))
    pipe.unet = runner  # drop-in for StableDiffusionPipeline called with prompt_embeds

Backends import lazily, so ``tensorrt`` is only needed when asked for. A GPU
backend that cannot really run on the GPU raises ``BackendUnavailable`` (serving
maps it to ``ModelNotReady``); nothing falls back to CPU quietly.

Tolerances against eager torch on the same inputs (fp32 unless stated):
onnxruntime CPU/CUDA fp32 max |diff| <= 1e-4 on UNet outputs (measured ~2e-6 on the
tiny UNet); fp16 backends (torch fp16, ORT CUDA fp16, TensorRT fp16) <= 5e-2 against
fp32 torch, with images compared by mean |diff| <= 1e-2 in [0, 1].
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from .base import PRECISIONS, BackendUnavailable, ShapeProfile, UNetRunner

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "TOLERANCE",
    "BackendUnavailable",
    "ShapeProfile",
    "UNetRunner",
    "load_unet_backend",
]

# name -> module (relative to this package) with ``load(unet, **kw) -> UNetRunner``
BACKENDS: dict[str, str] = {
    "torch": ".torch_backend",
    "onnxruntime": ".onnxruntime_backend",
    "tensorrt": ".tensorrt_backend",
}

# max |output - torch fp32 output| on the same UNet inputs, per precision
TOLERANCE: dict[str, float] = {"fp32": 1e-4, "fp16": 5e-2}


def load_unet_backend(
    name: str,
    unet: Any,
    *,
    cache_dir: Path,
    device: str = "cpu",
    precision: str = "fp32",
    profile: ShapeProfile | None = None,
    adapter_hash: str | None = None,
    **options: Any,
) -> UNetRunner:
    """Build (or load from ``cache_dir``) a runner for ``unet`` on ``device``.

    ``adapter_hash`` names the LoRA adapter loaded into ``unet`` (the weights hash
    covers its tensors already; this keeps it visible in the key). ``options`` go to
    the backend: ``compile=True`` (torch), ``threads=N`` / ``exporter="dynamo"``
    (onnxruntime).
    """
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not allowed: one of {sorted(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not allowed: one of {PRECISIONS}")
    module = importlib.import_module(BACKENDS[name], __name__)
    profile = profile or ShapeProfile.for_unet(unet.config)
    return module.load(
        unet,
        cache_dir=Path(cache_dir),
        device=device,
        precision=precision,
        profile=profile,
        adapter_hash=adapter_hash,
        **options,
    )
