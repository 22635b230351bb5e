"""Image storage: a local directory by default, any fsspec URL in production."""

from __future__ import annotations

from pathlib import Path

import fsspec


class ImageStorage:
    def __init__(self, root: str | Path):
        root = str(root)
        self.root = root if "://" in root else f"file://{Path(root).absolute()}"
        self.fs, self.base = fsspec.core.url_to_fs(self.root)
        self.fs.makedirs(self.base, exist_ok=True)

    def put(self, key: str, data: bytes) -> str:
        """Write ``data`` under ``key`` (overwriting: keys are deterministic, so retries are idempotent)."""
        path = f"{self.base.rstrip('/')}/{key}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(path, "wb") as fh:
            fh.write(data)
        return f"{self.root.rstrip('/')}/{key}"

    def get(self, uri: str) -> bytes:
        with fsspec.open(uri, "rb") as fh:
            return fh.read()

    def exists(self, uri: str) -> bool:
        fs, path = fsspec.core.url_to_fs(uri)
        return fs.exists(path)
