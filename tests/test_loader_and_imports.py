"""The one loader verifies manifests; the gRPC and SQL parts import without torch."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from pigment.models.loader import ModelIntegrityError, load_component, preset_version, read_manifest


def test_tiny_preset_round_trips_through_the_loader(tiny_preset):
    names = set(read_manifest(tiny_preset)["components"])
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "llm", "llm_tokenizer", "clip"} <= names
    unet = load_component(tiny_preset, "unet")
    assert type(unet).__name__ == "UNet2DConditionModel"
    tok = load_component(tiny_preset, "tokenizer")
    assert tok.decode(tok("a red star").input_ids, skip_special_tokens=True) == "a red star"
    assert preset_version(tiny_preset).startswith("tiny-1@")


def test_modified_weights_are_refused(tiny_preset, tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_preset, copy)
    weights = copy / "llm" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        load_component(copy, "llm")
    (copy / "vae" / "config.json").unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        load_component(copy, "vae")
    with pytest.raises(ModelIntegrityError, match="no manifest.json"):
        load_component(tmp_path, "unet")


def test_grpc_and_sql_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import pigment.services.gateway.servicer, pigment.services.history.servicer\n"
        "import pigment.services.preference.servicer, pigment.services.stack, pigment.services.store.migrate\n"
        "import pigment.services.render.celery_app, pigment.services.cli\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
