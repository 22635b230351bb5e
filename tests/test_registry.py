"""Model registry: register, promote, rollback, sha256 refusal at load, per-version cache, and the CLI."""

from __future__ import annotations

import pytest
import torch
from pigment.services.common.errors import AlreadyExists, FailedPrecondition, NotFound
from pigment.services.registry import (
    AdapterCache,
    AdapterMismatch,
    Registry,
    adapter_version_label,
    sha256_path,
)
from pigment.services.store.db import make_sessionmaker
from pigment.services.store.migrate import upgrade
from safetensors.torch import save_file


@pytest.fixture()
def registry(tmp_path):
    url = f"sqlite:///{tmp_path / 'reg.db'}"
    upgrade(url)
    return Registry(make_sessionmaker(url))


def adapter(path, value: float):
    save_file({"lora.weight": torch.full((2, 2), value)}, str(path))
    return path


def test_promote_retires_previous_and_rollback_restores_it(registry, tmp_path):
    v1 = registry.register("pmg_head", adapter(tmp_path / "a.safetensors", 1.0), version="pmg-1",
                           metrics={"clip_i": 0.71})
    v2 = registry.register("pmg_head", adapter(tmp_path / "b.safetensors", 2.0), version="pmg-2", parent="pmg-1",
                           metrics={"clip_i": 0.74}, notes="trained on round 2 pairs")
    other = registry.register("unet_lora", adapter(tmp_path / "u.safetensors", 3.0))
    assert other.version.startswith("unet_lora-") and v2.parent == "pmg-1" and v1.status == "registered"
    assert registry.active("pmg_head") is None and registry.active_versions() == {}

    registry.promote("pmg-1")
    registry.promote("pmg-2", notes="beats pmg-1 on held-out users")
    assert registry.active_versions() == {"pmg_head": "pmg-2"}
    assert registry.get("pmg-1").status == "retired"

    rejected, restored = registry.rollback("pmg_head", notes="users disliked it")
    assert (rejected.version, restored.version) == ("pmg-2", "pmg-1")
    assert registry.get("pmg-2").status == "rejected" and "users disliked it" in registry.get("pmg-2").notes
    assert registry.active_versions() == {"pmg_head": "pmg-1"}
    with pytest.raises(FailedPrecondition, match="rejected"):
        registry.promote("pmg-2")

    rejected, restored = registry.rollback("pmg_head")
    assert rejected.version == "pmg-1" and restored is None  # back to the preset's own weights
    with pytest.raises(FailedPrecondition, match="no active"):
        registry.rollback("pmg_head")
    with pytest.raises(NotFound):
        registry.promote("nope")


def test_register_is_idempotent_by_content(registry, tmp_path):
    path = adapter(tmp_path / "a.safetensors", 1.0)
    assert registry.register("pmg_head", path).version == registry.register("pmg_head", path).version
    with pytest.raises(AlreadyExists):
        registry.register("pmg_head", adapter(tmp_path / "b.safetensors", 5.0), version=registry.list()[0].version)
    with pytest.raises(NotFound, match="parent"):
        registry.register("pmg_head", path, version="x", parent="missing")


def test_modified_adapter_is_refused_at_load_and_promote(registry, tmp_path):
    path = adapter(tmp_path / "a.safetensors", 1.0)
    registry.register("unet_lora", path, version="u-1")
    loads = []
    cache = AdapterCache(registry, loader=lambda p, data: loads.append(p) or {"v": 1})
    assert cache.resolve({"unet_lora": "u-1"}) == {"unet_lora": {"v": 1}}
    assert cache.get("u-1") == {"v": 1} and len(loads) == 1  # cached per version

    adapter(path, 9.0)  # tampered after registration
    fresh = AdapterCache(registry)
    with pytest.raises(AdapterMismatch, match="refusing to load a modified or corrupt adapter"):
        fresh.get("u-1")
    with pytest.raises(AdapterMismatch, match="sha256"):
        registry.promote("u-1")
    assert AdapterMismatch.status == "FAILED_PRECONDITION"


def test_directory_adapter_hash_and_default_loader(registry, tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    adapter(folder / "unet.safetensors", 1.0)
    digest = sha256_path(folder)
    entry = registry.register("unet_lora", folder, version="dir-1")
    assert entry.sha256 == digest
    loaded = AdapterCache(registry).get("dir-1")
    assert torch.equal(loaded["unet.safetensors"]["lora.weight"], torch.ones(2, 2))
    assert adapter_version_label({"unet_lora": "dir-1", "pmg_head": "p"}) == "pmg_head=p,unet_lora=dir-1"
    assert adapter_version_label({}) is None


def test_models_cli_list_promote_rollback(tmp_path, monkeypatch, capsys):
    from pigment.services.cli import main

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    upgrade(url)
    monkeypatch.setenv("PIGMENT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PIGMENT_DATABASE_URL", url)
    path = adapter(tmp_path / "a.safetensors", 1.0)
    assert main(["models", "register", "pmg_head", str(path), "--version", "cli-1"]) == 0
    assert main(["models", "promote", "cli-1", "--notes", "first"]) == 0
    assert main(["models", "list"]) == 0
    assert "cli-1" in capsys.readouterr().out
    assert main(["models", "rollback", "pmg_head"]) == 0
    assert "rejected cli-1" in capsys.readouterr().out
    assert main(["models", "promote", "nope"]) == 2  # NOT_FOUND, reported, not a traceback


def test_worker_builds_one_renderer_per_adapter_version_and_refuses_a_modified_one(registry, tmp_path):
    from pigment.services.common.errors import ModelNotReady
    from pigment.services.render.core import RenderCore

    built = []
    core = RenderCore(registry.sessions, None, lambda **kw: built.append(kw) or object(), registry=registry)
    good, bad = tmp_path / "good", tmp_path / "bad"
    for folder, value in ((good, 1.0), (bad, 2.0)):
        folder.mkdir()
        adapter(folder / "pytorch_lora_weights.safetensors", value)
    registry.register("unet_lora", good, version="lora-1")
    registry.register("unet_lora", bad, version="lora-2")
    base = object()
    assert core.renderer_for({}, base) == (None, base)
    assert core.renderer_for({"pmg_head": "p"}, base) == (None, base)  # applied by the preference side
    version, renderer = core.renderer_for({"unet_lora": "lora-1"}, base)
    assert version == "lora-1" and built == [{"unet_adapter": good}]
    assert core.renderer_for({"unet_lora": "lora-1"}, base)[1] is renderer and len(built) == 1  # cached

    adapter(bad / "pytorch_lora_weights.safetensors", 7.0)
    with pytest.raises(AdapterMismatch, match="sha256"):
        core.renderer_for({"unet_lora": "lora-2"}, base)
    with pytest.raises(ModelNotReady, match="ip_adapter"):
        core.renderer_for({"ip_adapter": "x"}, base)
