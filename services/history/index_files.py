"""Item index files: the manifest (the commit point), atomic fsync'd writes, the writer lock.

The manifest records the index file's sha256; a load that finds another digest
(a file changed in place, same size) refuses the file and the index is rebuilt
from SQL: a corrupt index must never serve scores.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pigment.services.common.errors import FailedPrecondition

MANIFEST = "manifest.json"
LOCK_FILE = "index.lock"
MANIFEST_FORMAT = 2  # 2: sha256 of the index file, recall measurement, tuned search effort


@dataclass
class Manifest:
    embedding_model: str
    model_hash: str | None
    dim: int
    index_type: str
    ntotal: int
    high_water_mark: int
    high_water_pk: int
    index_file: str
    index_bytes: int
    index_sha256: str
    trained_on: int
    nlist: int | None = None
    search_effort: int | None = None
    """nprobe (IVF) or efSearch (HNSW) chosen by the tuner (or fixed by config)."""
    recall: dict[str, Any] | None = None
    """The last recall measurement on the catalog (index_tuning.RecallReport as a dict)."""
    saved_at: float = field(default_factory=time.time)
    format: int = MANIFEST_FORMAT


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write via ``<path>.tmp``, fsync it, rename over ``path``, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class WriterLock:
    """An exclusive, non-blocking fcntl lock on ``<dir>/index.lock`` (released on close/exit)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise FailedPrecondition(
                f"item index {directory} is already open for writing by another process "
                f"(pid {holder}); only one writer is allowed: open it with read_only=True"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1
