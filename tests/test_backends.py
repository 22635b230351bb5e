"""Rendering backends: parity with eager torch, engine cache, honest start-up, shapes.

Tolerance: onnxruntime fp32 on CPU within TOLERANCE["fp32"] = 1e-4 max |diff| of the
UNet output (measured ~2e-6); pipeline images within 1e-3 max |diff| in [0, 1].
fp16 GPU backends within TOLERANCE["fp16"] = 5e-2 (tests marked ``gpu``).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from pigment.models.backends import (
    TOLERANCE,
    BackendUnavailable,
    ShapeProfile,
    load_unet_backend,
)
from pigment.models.backends import cache as cache_mod
from pigment.models.backends import onnxruntime_backend as ort_backend

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

UNET_CONFIG = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
PROFILE = ShapeProfile(
    batch=(1, 2, 4), height=(4, 8, 16), width=(4, 8, 16), seq_len=(1, 16, 80), multiple=2
)


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def inputs(batch: int, hw: tuple[int, int], seq: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, *hw, generator=g),
        torch.tensor(637),
        torch.randn(batch, seq, 32, generator=g),
    )


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return tiny_unet()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def ort_runner(unet, cache_dir):
    return load_unet_backend("onnxruntime", unet, cache_dir=cache_dir, profile=PROFILE)


@pytest.mark.parametrize("batch,hw,seq", [(2, (8, 8), 16), (1, (16, 12), 7), (3, (4, 8), 77)])
def test_onnxruntime_matches_torch(unet, ort_runner, batch, hw, seq):
    sample, t, ehs = inputs(batch, hw, seq)
    with torch.no_grad():
        want = unet(sample, t, encoder_hidden_states=ehs).sample
    got = ort_runner(sample, t, encoder_hidden_states=ehs, return_dict=False)[0]
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max().item() < TOLERANCE["fp32"]


def test_torch_runner_is_the_reference(unet, cache_dir):
    """The runner over ``unet`` equals an independently built UNet with the same weights, and really
    depends on its weights and its conditioning (so the comparison can fail)."""
    runner = load_unet_backend("torch", unet, cache_dir=cache_dir, profile=PROFILE)
    sample, t, ehs = inputs(2, (8, 8), 16)
    reference, other = tiny_unet(seed=0), tiny_unet(seed=1)  # separate modules, not the runner's
    with torch.no_grad():
        want = reference(sample, t, encoder_hidden_states=ehs).sample
        unlike = other(sample, t, encoder_hidden_states=ehs).sample
    got = runner(sample, t, encoder_hidden_states=ehs).sample
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(got, unlike, atol=1e-3)
    assert not torch.allclose(runner(sample, t, encoder_hidden_states=-ehs).sample, got, atol=1e-3)


def test_pipeline_with_onnxruntime_unet_matches_torch(unet, ort_runner):
    torch.manual_seed(3)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()
    parts = {
        "vae": vae,
        "text_encoder": None,
        "tokenizer": None,
        "scheduler": DDIMScheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    g = torch.Generator().manual_seed(4)
    cond = {
        "prompt_embeds": torch.randn(1, 12, 32, generator=g),
        "negative_prompt_embeds": torch.randn(1, 12, 32, generator=g),
        "num_inference_steps": 4,
        "guidance_scale": 3.0,
        "output_type": "np",
    }
    images = {}
    for name, model in (("torch", unet), ("onnxruntime", ort_runner)):
        pipe = StableDiffusionPipeline(unet=unet, **parts)
        pipe.unet = model
        pipe.set_progress_bar_config(disable=True)
        images[name] = pipe(generator=torch.Generator().manual_seed(5), **cond).images
    assert images["torch"].shape == (1, 16, 16, 3)
    assert np.abs(images["torch"] - images["onnxruntime"]).max() < 1e-3


def test_second_load_uses_the_cache(unet, cache_dir, ort_runner, monkeypatch):
    monkeypatch.setattr(ort_backend, "export_unet", _must_not_export)
    again = load_unet_backend("onnxruntime", unet, cache_dir=cache_dir, profile=PROFILE)
    assert again.cache_key == ort_runner.cache_key


def _must_not_export(*args, **kwargs):
    raise AssertionError("a valid cache entry was rebuilt")


def _entry(cache_dir: Path, runner) -> Path:
    return cache_dir / "onnxruntime" / runner.cache_key


def test_truncated_or_foreign_onnx_is_never_used(unet, cache_dir, ort_runner, tmp_path):
    shutil.copytree(cache_dir / "onnxruntime", tmp_path / "onnxruntime")
    model = _entry(tmp_path, ort_runner) / ort_backend.MODEL
    good = model.read_bytes()
    fields = ort_backend.cache_fields(unet, PROFILE, "cpu", "fp32", None)
    cache = cache_mod.EngineCache(tmp_path, "onnxruntime")
    _write_identity_onnx(model)  # a valid ONNX file of another model
    assert not cache.verify(model.parent, fields)
    model.write_bytes(good[: len(good) // 2])
    runner = load_unet_backend("onnxruntime", unet, cache_dir=tmp_path, profile=PROFILE)
    assert model.read_bytes() == good  # rebuilt (the export is deterministic)
    sample, t, ehs = inputs(1, (8, 8), 5)
    with torch.no_grad():
        want = unet(sample, t, encoder_hidden_states=ehs).sample
    assert (runner(sample, t, ehs).sample - want).abs().max().item() < TOLERANCE["fp32"]


def _write_identity_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("sample", TensorProto.FLOAT, [None, 4, None, None])
    y = helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, [None, 4, None, None])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["sample"], ["out_sample"])], "g", [x], [y]
    )
    onnx.save(helper.make_model(graph), str(path))


def test_entry_of_another_model_is_rejected(unet, cache_dir, ort_runner, tmp_path):
    other = tiny_unet(seed=1)
    fields = ort_backend.cache_fields(unet, PROFILE, "cpu", "fp32", None)
    other_fields = ort_backend.cache_fields(other, PROFILE, "cpu", "fp32", None)
    cache = cache_mod.EngineCache(cache_dir, "onnxruntime")
    entry = _entry(cache_dir, ort_runner)
    assert cache.verify(entry, fields)
    assert not cache.verify(entry, other_fields)  # entry.json + files copied from model A
    copy_dir = tmp_path / "copy"
    shutil.copytree(entry, copy_dir)
    (copy_dir / "stray.onnx.data").write_bytes(b"x")
    assert not cache.verify(copy_dir, fields)


def test_cache_key_changes_with_weights_adapter_and_profile(unet):
    base = ort_backend.cache_fields(unet, PROFILE, "cpu", "fp32", None)
    tuned = copy.deepcopy(unet)
    with torch.no_grad():
        tuned.conv_in.weight[0, 0, 0, 0] += 1e-3  # a fused LoRA delta
    variants = [
        ort_backend.cache_fields(tuned, PROFILE, "cpu", "fp32", None),
        ort_backend.cache_fields(unet, PROFILE, "cpu", "fp32", "adapter-user-7"),
        ort_backend.cache_fields(unet, ShapeProfile(multiple=2), "cpu", "fp32", None),
    ]
    keys = {cache_mod.make_key(f) for f in [base, *variants]}
    assert len(keys) == 4
    assert cache_mod.weights_hash(unet) == cache_mod.weights_hash(copy.deepcopy(unet))


@pytest.mark.parametrize("hw,match", [((9, 8), "multiple of 2 in 4..16"), ((8, 32), "in 4..16")])
def test_unsupported_latent_size_names_the_range(ort_runner, hw, match):
    sample, t, ehs = inputs(1, hw, 5)
    with pytest.raises(ValueError, match=match):
        ort_runner(sample, t, encoder_hidden_states=ehs)


def test_batch_and_tokens_outside_profile(ort_runner):
    with pytest.raises(ValueError, match="batch=5.*1..4"):
        ort_runner(*inputs(5, (8, 8), 5))
    with pytest.raises(ValueError, match="seq_len=81.*1..80"):
        ort_runner(*inputs(1, (8, 8), 81))


def test_unsupported_conditioning_is_refused(ort_runner):
    sample, t, ehs = inputs(1, (8, 8), 5)
    with pytest.raises(ValueError, match="timestep_cond"):
        ort_runner(sample, t, ehs, timestep_cond=torch.zeros(1, 4))


def test_unknown_backend_and_precision(unet, tmp_path):
    with pytest.raises(ValueError, match="one of"):
        load_unet_backend("openvino", unet, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="precision"):
        load_unet_backend("onnxruntime", unet, cache_dir=tmp_path, precision="int8")
    with pytest.raises(ValueError, match="fp16"):
        load_unet_backend("onnxruntime", unet, cache_dir=tmp_path, precision="fp16")
    with pytest.raises(TypeError, match="compile"):
        load_unet_backend("onnxruntime", unet, cache_dir=tmp_path, compile=True)


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_gpu_backends_refuse_without_gpu(unet, tmp_path):
    for name in ("onnxruntime", "tensorrt", "torch"):
        with pytest.raises(BackendUnavailable):
            load_unet_backend(name, unet, cache_dir=tmp_path, device="cuda", profile=PROFILE)
    assert not list(tmp_path.rglob("*.onnx"))  # refused before exporting anything


def test_silent_cpu_fallback_is_refused(ort_runner, cache_dir, monkeypatch):
    """ORT turns an unloadable CUDA provider into a CPU session with a warning; we refuse."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA provider really present")
    monkeypatch.setattr(
        onnxruntime,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    model = _entry(cache_dir, ort_runner) / ort_backend.MODEL
    with pytest.raises(BackendUnavailable, match="instead of CUDAExecutionProvider"):
        ort_backend.open_session(model, "cuda")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ["onnxruntime", "tensorrt", "torch"])
@pytest.mark.parametrize("batch,hw,seq", [(2, (8, 8), 16), (1, (16, 12), 77)])
def test_gpu_fp16_backends_match_torch(unet, tmp_path, name, batch, hw, seq):
    # ONNX Runtime's CUDA EP and TensorRT are the optional `gpu` extra: a CUDA machine without them skips
    # (seen on the lent H200, 2026-12-04); anything else that goes wrong still fails.
    if name == "tensorrt":
        pytest.importorskip("tensorrt", reason="the gpu extra (tensorrt) is not installed")
    if name == "onnxruntime":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            pytest.skip("the gpu extra (onnxruntime-gpu) is not installed: no CUDAExecutionProvider")
    runner = load_unet_backend(
        name, unet, cache_dir=tmp_path, device="cuda", precision="fp16", profile=PROFILE
    )
    sample, t, ehs = inputs(batch, hw, seq)
    with torch.no_grad():
        want = unet(sample, t, encoder_hidden_states=ehs).sample
    got = runner(sample.cuda().half(), t, ehs.cuda().half()).sample.float().cpu()
    assert (got - want).abs().max().item() < TOLERANCE["fp16"]
