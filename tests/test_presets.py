"""Presets drive serving: sampler defaults and precision from the manifest, `pigment models manifest`,
backend shape limits at the gateway, and verification of every model file once at start-up."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import make_settings, running_stack
from pigment.models import loader
from pigment.services.cli import main
from pigment.services.common.errors import FailedPrecondition, InvalidInput, Unavailable

COMPONENTS = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]


def copy_preset(src: Path, dst: Path, components=None) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("manifest.json", *(
        [] if components is None else [n for n in loader.read_manifest(src)["components"] if n not in components])))
    return dst


def test_manifest_cli_records_components_and_sampler_defaults(tiny_preset, tmp_path):
    preset = copy_preset(tiny_preset, tmp_path / "ckpt", COMPONENTS)
    # options and component names in any order (the README's form used to be rejected by argparse)
    assert main(["models", "manifest", "--dir", str(preset), *COMPONENTS[:2], "--steps", "7",
                 *COMPONENTS[2:], "--guidance", "5.5", "--size", "48x64", "--dtype", "fp32"]) == 0
    m = loader.read_manifest(preset)
    assert sorted(m["components"]) == sorted(COMPONENTS)
    assert m["defaults"] == {"num_inference_steps": 7, "guidance_scale": 5.5, "height": 48, "width": 64,
                             "num_images": 1, "dtype": "fp32"}
    assert main(["models", "verify", "--dir", str(preset)]) == 0


def test_manifest_cli_derives_the_native_size_and_refuses_bad_input(tiny_preset, tmp_path, capsys):
    preset = copy_preset(tiny_preset, tmp_path / "ckpt", COMPONENTS)
    assert main(["models", "manifest", "--dir", str(preset), *COMPONENTS]) == 0
    # the tiny UNet's sample_size 16 x the VAE's 2x downscale: its native 32x32, from its configs
    assert loader.sampler_defaults(preset)["height"] == 32
    with pytest.raises(SystemExit) as exc:  # no component: refused, nothing written
        main(["models", "manifest", "--dir", str(tmp_path / "empty")])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):  # the old hint `pigment models manifest DIR` crashed with a TypeError
        main(["models", "manifest", str(preset)])
    assert main(["models", "manifest", "--dir", str(preset), "nosuchdir"]) == 2
    assert main(["models", "manifest", "--dir", str(preset), "unet", "--size", "big"]) == 2
    assert "HxW" in capsys.readouterr().err
    with pytest.raises(loader.ModelIntegrityError, match="at least one component"):
        loader.write_manifest(preset, {})


def test_derived_guidance_follows_the_unet_config_not_a_name(tmp_path):
    """diffusers' defaults: 7.5 for an SD UNet, 5.0 for an SDXL one (addition_embed_type "text_time")."""
    components = {"unet": {"path": "unet"}, "vae": {"path": "vae"}}
    for name, extra, guidance in (("sd-xl-named", {}, 7.5), ("plain", {"addition_embed_type": "text_time"}, 5.0)):
        (tmp_path / name / "unet").mkdir(parents=True)
        (tmp_path / name / "vae").mkdir()
        (tmp_path / name / "unet" / "config.json").write_text(json.dumps({"sample_size": 128, **extra}))
        (tmp_path / name / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [1, 2, 3, 4]}))
        d = loader.derived_defaults(tmp_path / name, components)
        assert (d["guidance_scale"], d["height"], d["num_inference_steps"]) == (guidance, 1024, 50), name


def gateway(settings, defaults, limits=None):
    from pigment.services.gateway.core import GatewayCore, GenerateParams

    core = GatewayCore(settings, None, None, None, None, None, defaults, lambda: "v", limits=limits)
    return core, GenerateParams


def test_unset_request_fields_come_from_the_preset(tiny_preset, tmp_path):
    settings = make_settings(tmp_path, tiny_preset)
    defaults = {"num_inference_steps": 2, "guidance_scale": 7.5, "height": 512, "width": 512}
    core, Params = gateway(settings, defaults)
    r = core.resolve(Params(request_id="r1", user_id="u"))
    assert (r.num_inference_steps, r.guidance_scale, r.height, r.width) == (2, 7.5, 512, 512)
    with pytest.raises(FailedPrecondition, match="sampler defaults"):
        gateway(settings, {"height": 512})


def test_backend_shape_limits_are_checked_at_the_gateway(tiny_preset, tmp_path):
    settings = make_settings(tmp_path, tiny_preset, render_backend="onnxruntime")
    limits = loader.image_limits(tiny_preset, "onnxruntime")
    assert limits == (4, 16, 64)  # latent 8..32 (multiple 2) of the tiny UNet x the VAE's 2x
    assert loader.image_limits(tiny_preset, "torch") is None
    core, Params = gateway(settings, loader.sampler_defaults(tiny_preset), limits)
    assert core.resolve(Params(request_id="r1", user_id="u")).height == 32
    with pytest.raises(InvalidInput, match="onnxruntime render backend: a multiple of 4 in 16..64"):
        core.resolve(Params(request_id="r2", user_id="u", height=72, width=32))
    # the same limits the exported UNet enforces
    from pigment.models.backends import ShapeProfile

    unet_cfg = json.loads((tiny_preset / "unet" / "config.json").read_text())
    profile = ShapeProfile.for_unet(type("C", (), unet_cfg))
    assert (profile.multiple * 2, profile.height[0] * 2, profile.height[2] * 2) == limits


def test_one_precision_for_every_component(tiny_preset, tmp_path):
    """A checkpoint whose text encoder is stored in fp16 renders in fp32 on CPU (it used to fail with
    "mat1 and mat2 must have the same dtype"); fp16 on CPU is refused up front."""
    import torch
    from pigment.models.pipeline import Renderer, RenderInputs
    from pigment.services.common.settings import Settings
    from pydantic import ValidationError

    preset = copy_preset(tiny_preset, tmp_path / "half", None)
    shutil.copy(tiny_preset / "manifest.json", preset / "manifest.json")
    te = loader.load_component(preset, "text_encoder").to(torch.float16)
    te.save_pretrained(preset / "text_encoder")
    loader.refresh_component(preset, "text_encoder")
    renderer = Renderer(preset)
    assert {p.dtype for p in renderer.text_encoder.parameters()} == {torch.float32}
    out = renderer.render(RenderInputs(segments=["a red star"], num_inference_steps=2))
    assert out.images[0].size == (32, 32)  # the preset's default size
    with pytest.raises(ValueError, match="not allowed on cpu"):
        Renderer(preset, dtype="fp16")
    with pytest.raises(ValidationError, match="needs render_device cuda"):
        Settings(render_dtype="bf16", render_device="cpu")


def test_verification_is_remembered_across_restarts(tiny_preset, tmp_path):
    preset = copy_preset(tiny_preset, tmp_path / "p", None)
    shutil.copy(tiny_preset / "manifest.json", preset / "manifest.json")
    cache = tmp_path / "verified.json"
    n_files = sum(len(c["files"]) for c in loader.read_manifest(preset)["components"].values())
    first = loader.verify_preset(preset, cache)
    assert first["files"] == first["hashed"] == n_files
    loader._CHECKED.clear()  # a new process: only the cache file remembers
    assert loader.verify_preset(preset, cache)["hashed"] == 0
    loader._CHECKED.clear()
    weights = preset / "llm" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, new content (and mtime): hashed again, refused
    weights.write_bytes(bytes(data))
    with pytest.raises(loader.ModelIntegrityError, match="llm/model.safetensors has sha256"):
        loader.verify_preset(preset, cache)


def test_a_corrupt_unet_fails_the_request_at_once_with_the_reason(tiny_preset, tmp_path):
    """The worker verifies every file before consuming; a request then fails with why, not after 300 s."""
    from pigment.services.gateway.core import GenerateParams

    preset = copy_preset(tiny_preset, tmp_path / "bad", None)
    shutil.copy(tiny_preset / "manifest.json", preset / "manifest.json")
    weights = preset / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    settings = make_settings(tmp_path, preset)  # render_timeout_s 120: the test wants far less
    with running_stack(settings) as (stack, _channel, _worker):
        with pytest.raises(loader.ModelIntegrityError):
            stack.verify_models()  # what `pigment serve` runs before it serves
        stack.history.log_interactions("u", [], create_user=True)
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="failed verification.*sha256"):
            stack.gateway.generate(GenerateParams(request_id="bad-1", user_id="u", method="non_personalized"))
        assert time.monotonic() - t0 < 60


def test_retrieval_threshold_is_the_presets_and_the_reason_matches_the_outcome(embedded):
    """The tiny preset's random CLIP has no tuned threshold: auto generates and says why. A match above a
    threshold with nothing to show (text-only items) must not report "retrieving" while it generates."""
    from pigment.services.gateway.core import GenerateParams
    from pigment.services.history.core import ItemRecord

    stack, _channel, _worker = embedded
    decider = stack.gateway.decider
    assert decider.config.threshold is None  # not 0.87, which was tuned for the toy CLIP
    stack.history.upsert_items([ItemRecord(item_id="text-only", caption="a red star")])
    stack.history.log_interactions("reader", [], create_user=True)
    params = GenerateParams(request_id="thr-1", user_id="reader", prompt="a red star", num_images=1,
                            retrieval="auto")
    untuned = decider.decide("reader", params, [], None)
    assert untuned.generate and not untuned.retrieve and "no retrieval threshold" in untuned.reason
    low = decider.with_config(threshold=-1.0).decide("reader", params, [], None)
    assert low.generate and not low.retrieve and not low.items
    assert "retrieving" not in low.reason and low.reason.endswith("generating"), low.reason


def test_an_sdxl_architecture_preset_is_built_and_served_through_grpc(tmp_path):
    """`pigment models build --arch sdxl-small`: SDXL's UNet (text_time: pooled embeds + time ids), two text
    encoders and an Euler scheduler, served by the real gateway and worker with the SDXL pipeline (chosen from
    the UNet's config), every PMG method included; the exported backends refuse it with the reason."""
    import io

    from pigment.models.backends import BackendUnavailable
    from pigment.models.pipeline import Renderer
    from pigment.v1 import generation_pb2 as pb
    from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc
    from PIL import Image

    preset = tmp_path / "sdxl"
    assert main(["models", "build", "--arch", "sdxl-small", "--dir", str(preset)]) == 0
    m = loader.read_manifest(preset)
    assert {"text_encoder_2", "tokenizer_2"} <= set(m["components"]) and m["defaults"]["height"] == 128
    unet_cfg = json.loads((preset / "unet" / "config.json").read_text())
    assert unet_cfg["addition_embed_type"] == "text_time"
    assert json.loads((preset / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "EulerDiscreteScheduler"
    with pytest.raises(BackendUnavailable, match="SDXL's pooled text embeds and time ids"):
        Renderer(preset, backend="onnxruntime", cache_dir=tmp_path / "engines")

    settings = make_settings(tmp_path, preset)
    with running_stack(settings) as (_stack, channel, _worker):
        history = history_pb2_grpc.HistoryServiceStub(channel)
        png = io.BytesIO()
        Image.new("RGB", (32, 32), (200, 30, 30)).save(png, format="PNG")
        history.UpsertItems(history_pb2.UpsertItemsRequest(items=[
            history_pb2.Item(item_id="i1", caption="a large red star", image_png=png.getvalue())]))
        history.LogInteractions(history_pb2.LogInteractionsRequest(user_id="u", create_user=True, interactions=[
            history_pb2.Interaction(item_id="i1", kind="like", timestamp_ms=1_700_000_000_000)]))
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        for method in (pb.METHOD_PMG, pb.METHOD_PMG_SOFT, pb.METHOD_NON_PERSONALIZED):
            resp = stub.GeneratePersonalized(pb.GenerateRequest(
                request_id=f"sdxl-{method}", user_id="u", prompt="a star", num_images=1, num_inference_steps=2,
                method=method, retrieval=pb.RETRIEVAL_MODE_GENERATE_ONLY), timeout=300)
            assert [Image.open(io.BytesIO(img.png)).size for img in resp.images] == [(128, 128)]  # the manifest's
            # soft tokens in the UNet's cross-attention width (both encoders side by side)
            assert resp.conditioning.soft_tokens == (0 if method == pb.METHOD_NON_PERSONALIZED else 2)
