"""Trainer configs: a dataclass filled from an optional YAML file, then command-line overrides."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None, **overrides) -> T:
    """``cls`` (a dataclass) from YAML at ``path`` plus non-None ``overrides``; unknown keys stop the run."""
    data = (yaml.safe_load(Path(path).read_text()) if path else {}) or {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(data) - set(cls.__dataclass_fields__)
    if unknown:
        raise SystemExit(f"unknown config keys: {sorted(unknown)}")
    return cls(**data)
