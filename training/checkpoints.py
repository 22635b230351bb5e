"""Resumable training checkpoints in safetensors (never pickle): model tensors + AdamW state + JSON meta."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE, META = "state.safetensors", "trainer.json"


def save_checkpoint(ckpt: Path, tensors: dict[str, torch.Tensor], optimizer, meta: dict) -> None:
    """Write ``tensors`` (already prefixed by the caller) and the optimizer state atomically."""
    ckpt.mkdir(parents=True, exist_ok=True)
    out = {k: v.detach().contiguous() for k, v in tensors.items()}
    for n, p in enumerate(optimizer.param_groups[0]["params"]):
        for key, value in optimizer.state.get(p, {}).items():
            out[f"opt.{n}.{key}"] = torch.as_tensor(value).detach().contiguous()
    tmp = ckpt / f"{STATE}.tmp"
    save_file(out, str(tmp))
    tmp.replace(ckpt / STATE)
    (ckpt / META).write_text(json.dumps(meta))


def load_checkpoint(ckpt: Path, optimizer) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Restore the optimizer state; returns (model tensors, meta), or None when there is no checkpoint."""
    if not (ckpt / META).is_file():
        return None
    tensors = load_file(str(ckpt / STATE))
    for n, p in enumerate(optimizer.param_groups[0]["params"]):
        state = part(tensors, f"opt.{n}.")
        if state:
            optimizer.state[p] = state
    return tensors, json.loads((ckpt / META).read_text())


def part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
