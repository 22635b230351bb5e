"""ONNX Runtime UNet runner: CPU execution provider, or CUDA with IO binding.

The CUDA path checks that the session really runs on CUDAExecutionProvider:
ONNX Runtime silently falls back to CPU when the CUDA libraries fail to load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import BackendUnavailable, ShapeProfile, UNetRunner
from .cache import EngineCache, adapter_state, device_name, weights_hash
from .export import UNET_INPUTS, UNET_OUTPUT, export_unet

MODEL = "unet.onnx"
_NP = {torch.float32: np.float32, torch.float16: np.float16}


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a base dependency
        raise BackendUnavailable(f"onnxruntime is not importable: {exc}") from exc
    return onnxruntime


def providers_for(device: str) -> list[Any]:
    """Execution providers for ``device``; raise if a GPU provider is not installed."""
    ort, dev = _ort(), torch.device(device)
    if dev.type == "cpu":
        return ["CPUExecutionProvider"]
    if dev.type != "cuda":
        raise ValueError(f"device={device!r} is not allowed for onnxruntime: 'cpu' or 'cuda[:N]'")
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise BackendUnavailable(
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (available: {available}); "
            "install onnxruntime-gpu matching this CUDA"
        )
    return [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]


def session_options(threads: int | None = None, low_memory: bool = False) -> Any:
    """``low_memory``: no pre-packed weight copies and no arena (an 860M UNet otherwise holds its
    weights about twice over on CPU), at some cost in speed."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if low_memory:
        opts.enable_cpu_mem_arena = False
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


def open_session(path: Path, device: str, threads: int | None = None, low_memory: bool = False) -> Any:
    """An InferenceSession on ``device``; raise BackendUnavailable if CUDA did not load."""
    ort = _ort()
    session = ort.InferenceSession(
        str(path), session_options(threads, low_memory), providers=providers_for(device)
    )
    if (
        torch.device(device).type == "cuda"
        and session.get_providers()[0] != "CUDAExecutionProvider"
    ):
        raise BackendUnavailable(
            f"onnxruntime created the session on {session.get_providers()} instead of "
            "CUDAExecutionProvider (CUDA/cuDNN libraries did not load); refusing to run on CPU"
        )
    return session


def cache_fields(
    unet: torch.nn.Module,
    profile: ShapeProfile,
    device: str,
    precision: str,
    adapter_hash: str | None,
) -> dict[str, Any]:
    import onnx

    return {
        "backend": "onnxruntime",
        "weights": weights_hash(unet),
        "adapter": adapter_hash,
        "adapter_state": adapter_state(unet),
        "profile": profile.as_dict(),
        "precision": precision,
        "device": device_name(device),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": _ort().__version__,
    }


class OnnxRuntimeUNetRunner(UNetRunner):
    name = "onnxruntime"

    def __init__(self, session: Any, config: Any, **kw: Any) -> None:
        super().__init__(config, **kw)
        self.session = session
        self._cuda = self.device.type == "cuda"

    def _run(
        self, sample: torch.Tensor, timesteps: torch.Tensor, ehs: torch.Tensor
    ) -> torch.Tensor:
        dtype = self.dtype
        feeds = (
            sample.to(self.device, dtype),
            timesteps.to(self.device),
            ehs.to(self.device, dtype),
        )
        if self._cuda:
            return self._run_bound(*feeds)
        inputs = {name: t.detach().contiguous().numpy() for name, t in zip(UNET_INPUTS, feeds)}
        return torch.from_numpy(self.session.run([UNET_OUTPUT], inputs)[0])

    def _run_bound(self, *feeds: torch.Tensor) -> torch.Tensor:
        """IO binding: ORT reads and writes torch's CUDA buffers, no host round trip."""
        feeds = tuple(t.contiguous() for t in feeds)
        out = torch.empty_like(feeds[0])
        binding = self.session.io_binding()
        index = self.device.index or 0
        for name, tensor in (*zip(UNET_INPUTS, feeds), (UNET_OUTPUT, out)):
            bind = binding.bind_output if name == UNET_OUTPUT else binding.bind_input
            bind(name, "cuda", index, _NP[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # inputs written before ORT reads
        self.session.run_with_iobinding(binding)
        return out

    def close(self) -> None:
        self.session = None

    def ready(self) -> bool:
        return self.session is not None


def load(
    unet: torch.nn.Module,
    *,
    cache_dir: Path,
    device: str,
    precision: str,
    profile: ShapeProfile,
    adapter_hash: str | None = None,
    threads: int | None = None,
    exporter: str = "torchscript",
    low_memory: bool = False,
) -> OnnxRuntimeUNetRunner:
    providers_for(device)  # fail before the (slow) export when CUDA EP is missing
    if precision == "fp16" and torch.device(device).type == "cpu":
        raise ValueError("precision='fp16' is not allowed with onnxruntime on cpu: use 'fp32'")
    fields = cache_fields(unet, profile, device, precision, adapter_hash)
    cache = EngineCache(cache_dir, "onnxruntime")

    def build(tmp: Path) -> None:
        export_unet(
            unet,
            tmp / MODEL,
            profile=profile,
            device=device,
            precision=precision,
            exporter=exporter,
        )

    key, entry = cache.get_or_build(fields, build)
    try:
        session = open_session(entry / MODEL, device, threads, low_memory)
    except BackendUnavailable:
        raise
    except Exception:  # noqa: BLE001 - ORT's load errors derive from Exception only
        # verified by hash, yet unreadable (e.g. written by a broken exporter): rebuild once
        cache.discard(entry)
        key, entry = cache.get_or_build(fields, build)
        session = open_session(entry / MODEL, device, threads, low_memory)
    return OnnxRuntimeUNetRunner(
        session, unet.config, profile=profile, device=device, precision=precision, cache_key=key
    )
