"""On-disk cache of exported models and built engines, verified before every use.

An entry is a directory ``cache_dir/<backend>/<key>/`` holding the artefacts and
``entry.json``: the key's fields and the sha256 of every artefact file. The key
hashes the weights (every state_dict tensor; a LoRA adapter loaded or fused in
changes it), the adapter hash, the shape profile, the precision, the device name
and the library versions. An entry whose ``entry.json`` is missing, whose fields
differ, or whose files are missing, truncated or swapped is deleted and rebuilt,
never used. Entries are built in a temporary directory and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from pigment.models.loader import sha256_file

log = logging.getLogger(__name__)

ENTRY = "entry.json"
FORMAT = 1  # bump when the export or the entry layout changes


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every state_dict tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def adapter_state(module: torch.nn.Module) -> list[Any]:
    """Active PEFT adapters and their scales: they change outputs without changing tensors."""
    state = []
    for name, sub in module.named_modules():
        scaling = getattr(sub, "scaling", None)
        if isinstance(scaling, dict) and scaling:
            active = getattr(sub, "active_adapters", [])
            disabled = bool(getattr(sub, "disable_adapters", False))
            state.append([name, sorted(scaling.items()), list(active), disabled])
    return state


def device_name(device: str) -> str:
    """The GPU's name and compute capability, or 'cpu'."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev.type
    major, minor = torch.cuda.get_device_capability(dev)
    return f"{torch.cuda.get_device_name(dev)} sm_{major}{minor}"


def make_key(fields: Mapping[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT, **fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class EngineCache:
    """Get-or-build of verified cache entries for one backend."""

    def __init__(self, cache_dir: Path, backend: str) -> None:
        self.root = Path(cache_dir) / backend
        self.root.mkdir(parents=True, exist_ok=True)

    def get_or_build(
        self, fields: Mapping[str, Any], build: Callable[[Path], None]
    ) -> tuple[str, Path]:
        """Return (key, entry dir); ``build(tmp_dir)`` writes the artefacts when needed."""
        key = make_key(fields)
        entry = self.root / key
        if self.verify(entry, fields):
            return key, entry
        if entry.exists():
            log.warning("cache entry %s is stale or corrupt; rebuilding", entry)
            self.discard(entry)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            build(tmp)
            self._seal(tmp, fields)
            os.replace(tmp, entry)
        except OSError:
            if not self.verify(entry, fields):  # lost a race to a bad entry: surface it
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return key, entry

    def verify(self, entry: Path, fields: Mapping[str, Any]) -> bool:
        """True only when entry.json matches ``fields`` and every file matches its sha256."""
        try:
            meta = json.loads((entry / ENTRY).read_text())
            expected = json.loads(json.dumps({"format": FORMAT, **fields}))
            if meta.get("fields") != expected:
                return False
            files = meta["files"]
            on_disk = {p.name for p in entry.iterdir() if p.name != ENTRY}
            if not files or set(files) != on_disk:
                return False
            return all(sha256_file(entry / name) == digest for name, digest in files.items())
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def discard(self, entry: Path) -> None:
        shutil.rmtree(entry, ignore_errors=True)

    @staticmethod
    def _seal(tmp: Path, fields: Mapping[str, Any]) -> None:
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {"fields": {"format": FORMAT, **fields}, "files": files}
        (tmp / ENTRY).write_text(json.dumps(meta, indent=1, sort_keys=True))
