"""Image storage: a local directory by default, any fsspec URL in production.

Keys are built by pigment (hashes and checked ids), and every read or delete is
confined to this storage's own root: a URI that a row or a caller names outside
it is refused, so a forged row can never make the server read an arbitrary file.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

import fsspec
from pigment.services.common.errors import InvalidInput, NotFound
from pigment.services.common.ids import show

KEY_RE = re.compile(r"\A[A-Za-z0-9_.:@/-]{1,512}\Z")


class ImageStorage:
    def __init__(self, root: str | Path):
        root = str(root)
        self.root = root if "://" in root else f"file://{Path(root).absolute()}"
        self.fs, self.base = fsspec.core.url_to_fs(self.root)
        self.fs.makedirs(self.base, exist_ok=True)
        self._prefix = self.root.rstrip("/") + "/"

    @staticmethod
    def _check_key(key: str) -> str:
        """A relative key without ``..``, empty or absolute parts (defence in depth: callers build keys)."""
        parts = key.split("/")
        if not KEY_RE.match(key) or any(p in ("", ".", "..") for p in parts):
            raise InvalidInput(f"storage key {show(key)} is malformed")
        return key

    def key_of(self, uri: str) -> str:
        """The key of a URI under this storage's root; InvalidInput for anything else."""
        key = uri[len(self._prefix):] if isinstance(uri, str) and uri.startswith(self._prefix) else ""
        parts = key.split("/")
        if not KEY_RE.match(key) or any(p in ("", ".", "..") for p in parts) or posixpath.normpath(key) != key:
            raise InvalidInput(f"image uri {show(uri)} is outside this server's image storage")
        return key

    def put(self, key: str, data: bytes) -> str:
        """Write ``data`` under ``key`` (overwriting: keys are deterministic, so retries are idempotent)."""
        path = f"{self.base.rstrip('/')}/{self._check_key(key)}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(path, "wb") as fh:
            fh.write(data)
        return self._prefix + key

    def _path(self, uri: str) -> str:
        return f"{self.base.rstrip('/')}/{self.key_of(uri)}"

    def get(self, uri: str) -> bytes:
        path = self._path(uri)
        try:
            with self.fs.open(path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise NotFound(f"image {show(uri)} is no longer stored") from None

    def size(self, uri: str) -> int:
        try:
            return int(self.fs.size(self._path(uri)))
        except FileNotFoundError:
            raise NotFound(f"image {show(uri)} is no longer stored") from None

    def exists(self, uri: str) -> bool:
        try:
            return self.fs.exists(self._path(uri))
        except InvalidInput:
            return False

    def delete(self, uri: str) -> bool:
        """Remove one stored image, and its folder once empty (a request's folder name can hold a user id);
        False if it was not there."""
        path = self._path(uri)
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            return False
        parent = path.rsplit("/", 1)[0]
        try:
            if parent.rstrip("/") != self.base.rstrip("/") and not self.fs.ls(parent):
                self.fs.rmdir(parent)
        except OSError:  # a concurrent write, or a store without folders: nothing to prune
            pass
        return True
