"""TensorRT UNet runner: an engine built from the ONNX export, cached per GPU and version.

The engine has one optimization profile covering the ShapeProfile's dynamic axes
(batch, latent H/W, token length). ``precision="fp16"`` builds from the fp32 ONNX
with the FP16 builder flag (I/O stays fp32; the runner casts). Weights are baked
into the engine, so every weights/adapter hash gets its own engine (the cache key
has both); an engine is never refitted in place, so two users' adapters are never
blended. Not exercised on the CPU-only CI: tests are marked ``gpu``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from .base import BackendUnavailable, ShapeProfile, UNetRunner
from .cache import EngineCache, adapter_state, device_name, weights_hash
from .export import UNET_INPUTS, UNET_OUTPUT, export_unet

ENGINE = "unet.plan"
ONNX = "unet.onnx"


def _trt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(
            f"tensorrt is not importable: {exc}; install tensorrt>=10"
        ) from exc
    return tensorrt


def _require_cuda(device: str) -> None:
    if torch.device(device).type != "cuda":
        raise ValueError(f"device={device!r} is not allowed for tensorrt: 'cuda[:N]'")
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"tensorrt needs a CUDA GPU; torch {torch.__version__} sees none")


def _profile_shapes(
    profile: ShapeProfile, in_channels: int, ctx_dim: int
) -> dict[str, list[tuple]]:
    shapes: dict[str, list[tuple]] = {name: [] for name in UNET_INPUTS}
    for i in range(3):
        b, h, w, s = profile.batch[i], profile.height[i], profile.width[i], profile.seq_len[i]
        shapes["sample"].append((b, in_channels, h, w))
        shapes["timestep"].append((b,))
        shapes["encoder_hidden_states"].append((b, s, ctx_dim))
    return shapes


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    profile: ShapeProfile,
    precision: str,
    in_channels: int,
    ctx_dim: int,
    workspace_gib: int = 8,
) -> None:
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data beside the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    for name, (low, best, high) in _profile_shapes(profile, in_channels, ctx_dim).items():
        opt.set_shape(name, low, best, high)
    config.add_optimization_profile(opt)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    engine_path.write_bytes(bytes(plan))


class TensorRTUNetRunner(UNetRunner):
    name = "tensorrt"

    def __init__(self, runtime: Any, engine: Any, config: Any, **kw: Any) -> None:
        super().__init__(config, **kw)
        self.runtime = runtime  # must outlive the engine
        self.engine = engine
        self.context = engine.create_execution_context()

    def _run(
        self, sample: torch.Tensor, timesteps: torch.Tensor, ehs: torch.Tensor
    ) -> torch.Tensor:
        feeds = [t.to(self.device, torch.float32).contiguous() for t in (sample, timesteps, ehs)]
        out = torch.empty_like(feeds[0])
        for name, tensor in zip(UNET_INPUTS, feeds):
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.context.set_tensor_address(UNET_OUTPUT, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return out  # ordered on torch's current stream; no host sync needed

    def close(self) -> None:
        self.context = self.engine = self.runtime = None

    def ready(self) -> bool:
        return self.context is not None


def load(
    unet: torch.nn.Module,
    *,
    cache_dir: Path,
    device: str,
    precision: str,
    profile: ShapeProfile,
    adapter_hash: str | None = None,
) -> TensorRTUNetRunner:
    trt = _trt()
    _require_cuda(device)
    fields = {
        "backend": "tensorrt",
        "weights": weights_hash(unet),
        "adapter": adapter_hash,
        "adapter_state": adapter_state(unet),
        "profile": profile.as_dict(),
        "precision": precision,
        "device": device_name(device),
        "torch": torch.__version__,
        "tensorrt": trt.__version__,
    }
    in_ch, ctx = unet.config.in_channels, unet.config.cross_attention_dim

    def build(tmp: Path) -> None:
        onnx_dir = tmp.parent / f"{tmp.name}.onnx"  # scratch: the engine alone is cached
        onnx_dir.mkdir()
        try:
            export_unet(unet, onnx_dir / ONNX, profile=profile, device=device, precision="fp32")
            build_engine(
                onnx_dir / ONNX,
                tmp / ENGINE,
                profile=profile,
                precision=precision,
                in_channels=in_ch,
                ctx_dim=ctx,
            )
        finally:
            shutil.rmtree(onnx_dir, ignore_errors=True)

    cache = EngineCache(cache_dir, "tensorrt")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    key, entry = cache.get_or_build(fields, build)
    with torch.cuda.device(torch.device(device)):
        engine = runtime.deserialize_cuda_engine((entry / ENGINE).read_bytes())
        if engine is None:  # hash matched but this TensorRT refused it: rebuild once
            cache.discard(entry)
            key, entry = cache.get_or_build(fields, build)
            engine = runtime.deserialize_cuda_engine((entry / ENGINE).read_bytes())
    if engine is None:
        raise BackendUnavailable(
            f"TensorRT {trt.__version__} cannot deserialize the engine it built"
        )
    return TensorRTUNetRunner(
        runtime,
        engine,
        unet.config,
        profile=profile,
        device=device,
        precision=precision,
        cache_key=key,
    )
