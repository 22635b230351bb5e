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
    "text_encoder_2": "transformers:CLIPTextModelWithProjection",  # SDXL's second encoder (pooled projection)
    "tokenizer_2": "transformers:AutoTokenizer",
    "llm": "transformers:AutoModelForCausalLM",
    "llm_tokenizer": "transformers:AutoTokenizer",
    "clip": "transformers:CLIPModel",
    "clip_tokenizer": "transformers:AutoTokenizer",
    "preference_head": "pigment.models.preference_head:PreferenceHead",
    "probe": "pigment.models.probe:AttributeProbe",
    "image_encoder": "transformers:CLIPVisionModel",
    "dino_encoder": "transformers:Dinov2Model",  # a real preset's reference encoder (DINOv2: identity, not captions)
    "reference_encoder": "pigment.models.subject_encoder:SubjectEncoder",  # the toy preset's stand-in for one
    "reference_projector": "pigment.models.reference:ReferenceProjector",
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
            f"no {MANIFEST} in {preset_dir}: build the preset (`pigment models build --arch tiny --dir DIR`) "
            f"or record a checkpoint with `pigment models manifest --dir DIR COMPONENTS...`"
        )
    return json.loads(path.read_text())


def write_manifest(preset_dir: str | Path, components: dict[str, dict[str, Any]], **meta: Any) -> dict:
    """Hash every file of every component and write ``manifest.json``.

    ``components`` maps name -> {"path": relative dir, "kind": kind, ...extra}.
    """
    if not components:
        raise ModelIntegrityError(f"a manifest for {preset_dir} needs at least one component")
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


# Files whose sha256 this process has checked: resolved path -> (stat key, sha256). A file is re-hashed
# only when its stat key (size, mtime_ns, inode) changes, so a start-up check makes later loads free.
_CHECKED: dict[str, tuple[tuple[int, int, int], str]] = {}


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _check_file(path: Path, expected: str) -> bool:
    """Raise unless ``path`` has sha256 ``expected``; True when it had to be hashed (False: known unchanged)."""
    if not path.is_file():
        raise ModelIntegrityError(f"{path} is listed in the manifest but missing")
    key, name = _stat_key(path), str(path.resolve())
    if _CHECKED.get(name) == (key, expected):
        return False
    actual = sha256_file(path)
    if actual != expected:
        raise ModelIntegrityError(
            f"{path} has sha256 {actual[:12]}..., manifest says {expected[:12]}...: "
            "refusing to load a modified or corrupt file"
        )
    _CHECKED[name] = (key, actual)
    return True


def _verified(comp_dir: str, files_json: str) -> bool:
    for rel, expected in json.loads(files_json).items():
        _check_file(Path(comp_dir) / rel, expected)
    return True


def verify_preset(preset_dir: str | Path, cache_file: str | Path | None = None) -> dict[str, Any]:
    """Check every file of every component against the manifest, once, at start-up.

    ``cache_file`` (JSON: resolved path -> [size, mtime_ns, inode, sha256]) remembers files already
    verified, so a restart does not re-hash unchanged gigabytes: a file whose size, mtime and inode all
    match its entry is trusted (replacing a file changes its inode or mtime). Raises
    ``ModelIntegrityError`` naming the first bad file; returns {"files", "hashed", "bytes_hashed", "seconds"}.
    """
    import time

    t0 = time.perf_counter()
    manifest = read_manifest(preset_dir)
    if not manifest.get("components"):
        raise ModelIntegrityError(f"the manifest of {preset_dir} lists no components")
    cache = _read_cache(cache_file)
    for name, (key, sha) in cache.items():
        _CHECKED.setdefault(name, (tuple(key), sha))
    files = hashed = size = 0
    for entry in manifest["components"].values():
        comp_dir = Path(preset_dir) / entry["path"]
        for rel, expected in entry["files"].items():
            path = comp_dir / rel
            files += 1
            if _check_file(path, expected):
                hashed, size = hashed + 1, size + path.stat().st_size
    if cache_file is not None and hashed:
        _write_cache(cache_file)
    return {"files": files, "hashed": hashed, "bytes_hashed": size, "seconds": round(time.perf_counter() - t0, 3)}


def _read_cache(cache_file: str | Path | None) -> dict[str, tuple[list, str]]:
    if cache_file is None or not Path(cache_file).is_file():
        return {}
    try:
        raw = json.loads(Path(cache_file).read_text())
        return {name: (v[:3], v[3]) for name, v in raw.items()}
    except (ValueError, KeyError, IndexError, TypeError):  # a torn or foreign file: verify from scratch
        return {}


def _write_cache(cache_file: str | Path) -> None:
    """Atomically (temp file + rename): a crash leaves the old cache or the new one."""
    path = Path(cache_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({n: [*k, sha] for n, (k, sha) in _CHECKED.items()}, sort_keys=True))
    tmp.replace(path)


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


SAMPLER_KEYS = ("num_inference_steps", "guidance_scale", "height", "width")
DTYPES = ("fp32", "fp16", "bf16")


def preset_defaults(preset_dir: str | Path) -> dict[str, Any]:
    """Sampler defaults the preset was validated with (steps, guidance, size, images, dtype)."""
    return dict(read_manifest(preset_dir).get("defaults", {}))


def sampler_defaults(preset_dir: str | Path) -> dict[str, Any]:
    """``preset_defaults``, refusing a manifest that lacks any of ``SAMPLER_KEYS`` (serving has no numbers
    of its own: a request that leaves them unset gets what the preset was made for)."""
    defaults = preset_defaults(preset_dir)
    missing = [k for k in SAMPLER_KEYS if k not in defaults]
    if missing:
        raise ModelIntegrityError(
            f"the manifest of {preset_dir} has no sampler defaults {missing}: record them with "
            f"`pigment models manifest --dir {preset_dir} --steps N --guidance G --size HxW COMPONENTS...`")
    return defaults


def derived_defaults(preset_dir: str | Path, components: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sampler defaults read off a checkpoint's own configs: the UNet's native size (sample_size times the
    VAE's downscale), diffusers' pipeline steps and guidance (50, and 7.5 for StableDiffusionPipeline or 5.0
    for StableDiffusionXLPipeline: an SDXL UNet is told by its config, addition_embed_type "text_time",
    not by a name), fp32."""
    out: dict[str, Any] = {"num_inference_steps": 50, "guidance_scale": 7.5, "num_images": 1, "dtype": "fp32"}
    unet, vae = components.get("unet"), components.get("vae")
    ucfg = json.loads((Path(preset_dir) / unet["path"] / "config.json").read_text()) if unet else {}
    if ucfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text embeds + size/crop time ids
        out["guidance_scale"] = 5.0
    if unet and vae:
        vcfg = json.loads((Path(preset_dir) / vae["path"] / "config.json").read_text())
        sample = ucfg.get("sample_size", 64)
        sample = sample if isinstance(sample, int) else max(sample)
        out["height"] = out["width"] = int(sample) * 2 ** (len(vcfg.get("block_out_channels", [0] * 4)) - 1)
    return out


def latent_range(sample_size: int, n_down_blocks: int) -> tuple[int, int, int]:
    """(multiple, min, max) latent size an exported UNet accepts by default: 1/2x to 2x its sample_size,
    a multiple of 2 ** (down blocks - 1). ``backends.ShapeProfile.for_unet`` and the gateway share it."""
    multiple = 2 ** (n_down_blocks - 1)
    return multiple, max(multiple, sample_size // 2 // multiple * multiple), 2 * sample_size


EXPORTED_BACKENDS = ("onnxruntime", "tensorrt")  # a fixed shape profile; torch takes any multiple of 8


def image_limits(preset_dir: str | Path, backend: str) -> tuple[int, int, int] | None:
    """(multiple, min, max) image pixels ``backend`` renders for this preset; None when only the
    pipeline's own checks apply. Read from config.json files: no torch, so the gateway can check."""
    if backend not in EXPORTED_BACKENDS:
        return None
    ucfg = json.loads((component_dir(preset_dir, "unet") / "config.json").read_text())
    vcfg = json.loads((component_dir(preset_dir, "vae") / "config.json").read_text())
    sample = ucfg.get("sample_size", 64)
    sample = sample if isinstance(sample, int) else max(sample)
    scale = 2 ** (len(vcfg.get("block_out_channels", [0] * 4)) - 1)
    multiple, low, high = latent_range(int(sample), len(ucfg["down_block_types"]))
    return scale * multiple, scale * low, scale * high


def torch_dtype(name: str):
    """``fp32`` | ``fp16`` | ``bf16`` -> the torch dtype (torch imported here, not at module import)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not allowed: one of {DTYPES}")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


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
    return write_manifest(preset_dir, components, **meta)
