"""The one loader: every model component comes from a local directory.

A preset is a directory with a ``manifest.json``::

    {"preset": "tiny", "version": "tiny-1",
     "components": {"unet": {"path": "unet", "kind": "unet",
                             "files": {"config.json": "<sha256>", ...}}, ...}}

``kind`` picks the class (see ``KINDS``); every file listed is checked against
its sha256 before anything is deserialised, and loading always passes
``local_files_only=True``, so a real SD 1.5 / Llama / CLIP directory works the
same way once ``write_manifest`` has recorded it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"

# kind -> "module:Class" whose ``from_pretrained`` loads it.
KINDS: dict[str, str] = {
    "unet": "diffusers:UNet2DConditionModel",
    "vae": "diffusers:AutoencoderKL",
    "scheduler": "diffusers:DDIMScheduler",
    "text_encoder": "transformers:CLIPTextModel",
    "tokenizer": "transformers:AutoTokenizer",
    "llm": "transformers:AutoModelForCausalLM",
    "llm_tokenizer": "transformers:AutoTokenizer",
    "clip": "transformers:CLIPModel",
    "clip_tokenizer": "transformers:AutoTokenizer",
    "preference_head": "pigment.models.preference_head:PreferenceHead",
    "probe": "pigment.models.probe:AttributeProbe",
}
_ALLOWED_MODULES = ("diffusers", "transformers", "pigment.models")


class ModelIntegrityError(RuntimeError):
    """A preset directory does not match its manifest (missing file, wrong sha256)."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(preset_dir: str | Path) -> dict[str, Any]:
    path = Path(preset_dir) / MANIFEST
    if not path.is_file():
        raise ModelIntegrityError(
            f"no {MANIFEST} in {preset_dir}: build the preset (`pigment models build-tiny`) "
            f"or record a checkpoint with `pigment models manifest DIR`"
        )
    return json.loads(path.read_text())


def write_manifest(preset_dir: str | Path, components: dict[str, dict[str, Any]], **meta: Any) -> dict:
    """Hash every file of every component and write ``manifest.json``.

    ``components`` maps name -> {"path": relative dir, "kind": kind, ...extra}.
    """
    root = Path(preset_dir)
    out: dict[str, dict[str, Any]] = {}
    for name, entry in components.items():
        comp_dir = root / entry["path"]
        files = {
            str(p.relative_to(comp_dir)): sha256_file(p)
            for p in sorted(comp_dir.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }
        if not files:
            raise ModelIntegrityError(f"component {name!r} has no files under {comp_dir}")
        out[name] = {**entry, "files": files}
    manifest = {**meta, "components": out}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


@lru_cache(maxsize=64)
def _verified(comp_dir: str, files_json: str) -> bool:
    files = json.loads(files_json)
    for rel, expected in files.items():
        path = Path(comp_dir) / rel
        if not path.is_file():
            raise ModelIntegrityError(f"{path} is listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelIntegrityError(
                f"{path} has sha256 {actual[:12]}..., manifest says {expected[:12]}...: "
                "refusing to load a modified or corrupt file"
            )
    return True


def _resolve_class(spec: str):
    module_name, _, cls_name = spec.partition(":")
    if not module_name.startswith(_ALLOWED_MODULES):
        raise ModelIntegrityError(f"class {spec!r} is not from an allowed module {_ALLOWED_MODULES}")
    return getattr(importlib.import_module(module_name), cls_name)


def component_dir(preset_dir: str | Path, name: str) -> Path:
    entry = _entry(read_manifest(preset_dir), name, preset_dir)
    return Path(preset_dir) / entry["path"]


def _entry(manifest: dict, name: str, preset_dir: str | Path) -> dict:
    try:
        return manifest["components"][name]
    except KeyError:
        have = ", ".join(sorted(manifest.get("components", {})))
        raise ModelIntegrityError(f"preset {preset_dir} has no component {name!r} (has: {have})") from None


def has_component(preset_dir: str | Path, name: str) -> bool:
    return name in read_manifest(preset_dir).get("components", {})


def load_component(preset_dir: str | Path, name: str, **kwargs: Any):
    """Verify ``name`` against the manifest, then ``from_pretrained(dir, local_files_only=True)``."""
    manifest = read_manifest(preset_dir)
    entry = _entry(manifest, name, preset_dir)
    comp_dir = Path(preset_dir) / entry["path"]
    _verified(str(comp_dir.resolve()), json.dumps(entry["files"], sort_keys=True))
    spec = entry.get("class") or KINDS[entry["kind"]]
    if entry["kind"] == "scheduler" and "class" not in entry:
        config = json.loads((comp_dir / "scheduler_config.json").read_text())
        spec = f"diffusers:{config.get('_class_name', 'DDIMScheduler')}"
    cls = _resolve_class(spec)
    _quiet_hub_progress()
    obj = cls.from_pretrained(str(comp_dir), local_files_only=True, **kwargs)
    if hasattr(obj, "eval"):
        obj.eval()
    return obj


@lru_cache(maxsize=1)
def _quiet_hub_progress() -> None:
    """Loading from disk needs no per-shard progress bars in service logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def preset_version(preset_dir: str | Path) -> str:
    """A short, stable id for what is loaded: manifest version + hash of the manifest."""
    manifest_path = Path(preset_dir) / MANIFEST
    digest = sha256_file(manifest_path)[:10]
    return f"{read_manifest(preset_dir).get('version', Path(preset_dir).name)}@{digest}"


def preset_defaults(preset_dir: str | Path) -> dict[str, Any]:
    """Sampler defaults the preset was validated with (steps, guidance, size, images)."""
    return dict(read_manifest(preset_dir).get("defaults", {}))


def default_soft_weight(cfg: dict, method: str) -> float:
    """The soft-token weight ``method`` renders with unless the request sets one.

    Beside the keywords (``pmg``) the soft tokens only refine them and a small weight
    is best; alone (``pmg_soft``) they carry the whole preference and need their full
    trained scale, so ``preference.json`` sets ``soft_weight_alone`` apart (both chosen on val).
    """
    return float(cfg.get("soft_weight_alone" if method == "pmg_soft" else "soft_weight", 1.0))


def preset_file(preset_dir: str | Path, name: str) -> Path | None:
    """An optional config file shipped with the preset (e.g. ``preference.json``)."""
    path = Path(preset_dir) / name
    return path if path.is_file() else None


def refresh_component(preset_dir: str | Path, name: str, **extra: Any) -> dict:
    """Re-hash one component after it was replaced (e.g. a newly trained head); other entries stay."""
    manifest = read_manifest(preset_dir)
    entry = {k: v for k, v in _entry(manifest, name, preset_dir).items() if k != "files"}
    components = {n: {k: v for k, v in e.items() if k != "files"} for n, e in manifest["components"].items()}
    components[name] = {**entry, **extra}
    meta = {k: v for k, v in manifest.items() if k != "components"}
    _verified.cache_clear()
    return write_manifest(preset_dir, components, **meta)
