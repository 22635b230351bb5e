"""Eager PyTorch runner (the reference), optionally through ``torch.compile``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from .base import BackendUnavailable, ShapeProfile, UNetRunner
from .cache import weights_hash


class TorchUNetRunner(UNetRunner):
    name = "torch"

    def __init__(self, unet: torch.nn.Module, *, compile: bool = False, **kw: Any) -> None:
        super().__init__(unet.config, **kw)
        self.unet = unet
        # Static shapes: on the lent H200 (torch 2.11, 2026-12-04) dynamic=True had not finished compiling the
        # SD 1.5 UNet after 5 minutes; static compiled in 79 s and ran 1.8x eager (bench/RESULTS.md, "GPU").
        # Each new batch size compiles once more (the gateway's micro-batches are at most render_max_batch).
        self._forward = torch.compile(unet, dynamic=False) if compile else unet

    def _run(
        self, sample: torch.Tensor, timesteps: torch.Tensor, ehs: torch.Tensor
    ) -> torch.Tensor:
        with torch.inference_mode():
            return self._forward(
                sample.to(self.device, self.dtype),
                timesteps.to(self.device),
                encoder_hidden_states=ehs.to(self.device, self.dtype),
                return_dict=False,
            )[0]

    def close(self) -> None:
        self.unet = self._forward = None

    def ready(self) -> bool:
        return self.unet is not None


def load(
    unet: torch.nn.Module,
    *,
    device: str,
    precision: str,
    profile: ShapeProfile,
    compile: bool = False,
    adapter_hash: str | None = None,
    cache_dir: Path | None = None,
) -> TorchUNetRunner:
    """Nothing is cached on disk; ``cache_key`` is the weights hash (+ adapter) for logging."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(
            f"torch {torch.__version__} sees no CUDA device for device={device!r}"
        )
    if precision == "fp16" and dev.type == "cpu":
        raise ValueError("precision='fp16' is not allowed with torch on cpu: use 'fp32'")
    dtype = torch.float16 if precision == "fp16" else torch.float32
    param = next(unet.parameters())
    if param.device != dev or param.dtype != dtype:
        unet = copy.deepcopy(unet).to(device=dev, dtype=dtype)
    key = weights_hash(unet)[:32] + (f"+{adapter_hash}" if adapter_hash else "")
    return TorchUNetRunner(
        unet.eval(),
        compile=compile,
        profile=profile,
        device=device,
        precision=precision,
        cache_key=key,
    )
