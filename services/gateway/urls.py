"""Signed, short-lived image URLs: ``/v1/{generations|items}/{id}/image?expires=MS&sig=HEX``.

Why signed URLs rather than only the bearer-authorized path: an ``<img src>``, a CDN, a mail client or another
service fetches a URL without our API key, and a caller must never paste its key into a URL. The signature is
HMAC-SHA256 over (kind, id, expiry) with a server secret, so the URL grants that one image until it expires and
nothing else; it is minted only after the caller was authorized for the image. The same paths also accept
``Authorization: Bearer`` without a signature (services/gateway/http.py).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from urllib.parse import quote

from pigment.services.common.errors import FailedPrecondition, PermissionDenied

KINDS = ("generations", "items")


def load_secret(path: Path) -> bytes:
    """The signing secret in ``path``, created (32 random bytes, mode 0600) when absent."""
    path = Path(path)
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        return path.read_bytes()
    except FileExistsError:  # another process created it between the check and the open
        return path.read_bytes()
    except OSError as exc:
        raise FailedPrecondition(
            f"URL signing key {path}: {exc.strerror}; create it (head -c 32 /dev/urandom "
            "> FILE) and point PIGMENT_URL_SIGNING_KEY_FILE at it"
        ) from exc


class UrlSigner:
    """``base_url`` (settable once the HTTP face has its port): where callers reach the HTTP face, or ""."""

    def __init__(self, secret: bytes, ttl_s: float, base_url: str = ""):
        if len(secret) < 16:
            raise ValueError("the URL signing secret needs at least 16 bytes")
        self.secret = secret
        self.ttl_s = ttl_s
        self.base_url = base_url.rstrip("/")

    def _sig(self, kind: str, ident: str, expires_ms: int) -> str:
        msg = f"{kind}\n{ident}\n{expires_ms}".encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()

    def sign(self, kind: str, ident: str, base_url: str | None = None) -> tuple[str, int]:
        """(URL, expiry in ms since 1970); ``base_url`` overrides the configured one ("" gives a path)."""
        expires_ms = int((time.time() + self.ttl_s) * 1000)
        base = self.base_url if base_url is None else base_url.rstrip("/")
        path = f"/v1/{kind}/{quote(ident, safe='')}/image"
        return (
            f"{base}{path}?expires={expires_ms}&sig={self._sig(kind, ident, expires_ms)}",
            expires_ms,
        )

    def check(self, kind: str, ident: str, expires: str, sig: str) -> None:
        """PermissionDenied unless ``sig`` is this server's signature for (kind, ident, expires), not expired."""
        if not (expires.isascii() and expires.isdigit() and len(expires) <= 15):
            raise PermissionDenied(
                "the image URL's expires parameter is malformed: ask for a fresh URL"
            )
        good = self._sig(kind, ident, int(expires))
        if not hmac.compare_digest(good, sig.lower()):
            raise PermissionDenied("the image URL's signature does not match: ask for a fresh URL")
        if int(expires) < time.time() * 1000:
            raise PermissionDenied("the image URL has expired: ask for a fresh URL (GetGeneration)")
