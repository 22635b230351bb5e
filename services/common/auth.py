"""Who is calling and what they may do. No grpc here (the interceptor is ``services/common/grpc_auth.py``).

A caller presents an API key (``authorization: Bearer <key>``). The operator's
key file maps ``sha256(key)`` to ``{tenant, scopes}``; plain keys are never
stored (``pigment auth add-key`` prints a new key once). A key turns into a
``Principal``: its tenant bounds every user, item, job and generation it may
touch, and the ``admin`` scope allows DeleteUser and segment batches.

Tenant ``"*"`` in the key file (an operator key, admin only) and the embedded
default without keys (``LOCAL_ADMIN``, loopback only) act on every tenant.

Per-tenant rate limits and quotas use the ``limits`` library (Redis in
production, ``memory://`` embedded); an exceeded limit raises ``RateLimited``
with the seconds to wait.
"""

from __future__ import annotations

import contextvars
import hashlib
import ipaddress
import json
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pigment.services.common.errors import (
    FailedPrecondition,
    Overloaded,
    PermissionDenied,
    PigmentError,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from pigment.services.common.ids import is_id

ADMIN = "admin"
ALL_TENANTS = "*"
SCOPES = (ADMIN,)
KEY_PREFIX = "pgm_"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``tenant`` None: every tenant (an operator key, or the local embedded admin)."""

    tenant: str | None
    scopes: frozenset[str] = field(default_factory=frozenset)
    key_id: str = ""  # the first characters of the key's hash, for logs

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.scopes

    def sees(self, tenant: str | None) -> bool:
        """May act on rows of ``tenant`` (users, private items, jobs)."""
        return self.tenant is None or tenant == self.tenant

    def require_admin(self, what: str) -> None:
        if not self.is_admin:
            raise PermissionDenied(f"{what} needs the admin scope (pigment auth add-key --admin)")

    @property
    def limit_key(self) -> str:
        return self.tenant if self.tenant is not None else ALL_TENANTS


LOCAL_ADMIN = Principal(tenant=None, scopes=frozenset({ADMIN}), key_id="local")

_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("pigment_principal", default=None)


def current_principal() -> Principal:
    """The principal of the RPC being served (set by the auth interceptor)."""
    principal = _current.get()
    if principal is None:  # a servicer reached without the interceptor: never assume a caller
        raise Unauthenticated("no authenticated caller for this call")
    return principal


def set_principal(principal: Principal | None) -> contextvars.Token:
    return _current.set(principal)


def reset_principal(token: contextvars.Token) -> None:
    try:
        _current.reset(token)
    except ValueError:  # a stream closed from another thread: that thread never saw the principal
        pass


# -- keys ---------------------------------------------------------------------------------------------
def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def bearer_token(header: str | None) -> str | None:
    """The key of an ``authorization: Bearer <key>`` value, else None."""
    scheme, _, token = (header or "").strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _read_entries(path: Path) -> dict[str, dict]:
    text = path.read_text() if path.exists() else ""
    data = (json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)) if text.strip() else {}
    return _check_entries(data, path)


def _check_entries(data, path: Path) -> dict[str, dict]:
    if not isinstance(data, dict):
        raise FailedPrecondition(f"auth keys file {path} must map sha256(key) -> {{tenant, scopes}}")
    for digest, entry in data.items():
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise FailedPrecondition(f"auth keys file {path}: {str(digest)[:16]!r} is not a sha256 hex digest "
                                     "(the file holds hashes of keys, never keys)")
        if not isinstance(entry, dict) or not isinstance(entry.get("tenant"), str) or not entry["tenant"]:
            raise FailedPrecondition(f"auth keys file {path}: entry {digest[:12]} needs a tenant")
        if entry["tenant"] != ALL_TENANTS and not is_id(entry["tenant"]):
            # the one id pattern (services/common/ids.py): a tenant a key names must be one a request may name
            raise FailedPrecondition(f"auth keys file {path}: entry {digest[:12]}: tenant must be 1..128 "
                                     "characters of [A-Za-z0-9_.:@-], starting with a letter or digit")
        unknown = set(entry.get("scopes") or []) - set(SCOPES)
        if unknown:
            raise FailedPrecondition(f"auth keys file {path}: entry {digest[:12]} has unknown scopes "
                                     f"{sorted(unknown)}: allowed {list(SCOPES)}")
        if entry["tenant"] == ALL_TENANTS and ADMIN not in (entry.get("scopes") or []):
            raise FailedPrecondition(f"auth keys file {path}: entry {digest[:12]}: tenant '*' needs the admin scope")
    return data


class KeyStore:
    """The operator's key file, re-read when it changes (a new or revoked key needs no restart)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._entries: dict[str, Principal] = {}
        self._reload()
        if not self._entries:
            raise FailedPrecondition(f"auth keys file {self.path} holds no keys: add one with "
                                     "`pigment auth add-key --tenant NAME`")

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError as exc:
            raise FailedPrecondition(f"auth keys file {self.path} does not exist: create it with "
                                     "`pigment auth add-key --tenant NAME`") from exc
        if stamp == self._stamp:
            return
        self._entries = {
            digest: Principal(None if e["tenant"] == ALL_TENANTS else e["tenant"],
                              frozenset(e.get("scopes") or []), digest[:12])
            for digest, e in _read_entries(self.path).items()}
        self._stamp = stamp

    def authenticate(self, header: str | None) -> Principal:
        token = bearer_token(header)
        if token is None:
            raise Unauthenticated("missing credentials: send `authorization: Bearer <api key>`")
        with self._lock:
            self._reload()
            principal = self._entries.get(hash_key(token))
        if principal is None:
            raise Unauthenticated("invalid API key")
        return principal


def add_key(path: Path, tenant: str, admin: bool = False, note: str = "") -> str:
    """Write sha256 of a new key under ``tenant`` into the key file (atomically); returns the key itself."""
    if tenant == ALL_TENANTS and not admin:
        raise FailedPrecondition("tenant '*' (every tenant) needs --admin")
    if not tenant:
        raise FailedPrecondition("a key needs a tenant (--tenant NAME, or '*' with --admin for an operator key)")
    path = Path(path)
    entries = _read_entries(path) if path.exists() else {}
    key = new_key()
    entries[hash_key(key)] = {"tenant": tenant, "scopes": [ADMIN] if admin else [], "note": note,
                              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _check_entries(entries, path)  # the same checks a server applies when it reads the file
    _write_entries(path, entries)
    return key


def revoke_key(path: Path, prefix: str) -> str:
    """Remove the one entry whose hash starts with ``prefix`` (at least 8 characters); returns its hash."""
    path = Path(path)
    entries = _read_entries(path)
    found = [d for d in entries if len(prefix) >= 8 and d.startswith(prefix)]
    if len(found) != 1:
        raise FailedPrecondition(f"{len(found)} keys in {path} have a hash starting with {prefix!r}: "
                                 "give at least 8 characters of exactly one (`pigment auth list`)")
    del entries[found[0]]
    _write_entries(path, entries)
    return found[0]


def list_keys(path: Path) -> dict[str, dict]:
    return _read_entries(Path(path))


def _write_entries(path: Path, entries: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        if path.suffix == ".json":
            json.dump(entries, f, indent=1)
        else:
            yaml.safe_dump(entries, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _parse(text: str) -> list:
    from limits import parse_many

    return parse_many(text) if text else []


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, auth_on: bool) -> None:
    """Auth may be off only on a loopback address: refuse to start otherwise."""
    if not auth_on and not is_loopback(host):
        raise FailedPrecondition(
            f"refusing to serve on {host} without authentication: anyone who reaches the port could act as "
            "any user. Set PIGMENT_AUTH_KEYS_FILE (create keys with `pigment auth add-key --tenant NAME`) "
            "or bind 127.0.0.1 (PIGMENT_HOST)")


# -- rate limits and quotas ---------------------------------------------------------------------------
class RateLimiter:
    """Per-tenant limits with the ``limits`` library (sliding window counter: O(1) per check, unlike a moving
    window whose cost grows with the limit).

    ``calls``: every authenticated call, e.g. "20/second;600/minute". ``images``: images a tenant may have
    rendered (new requests, not replays; batch jobs count users x images), e.g. "100/minute;5000/day".
    An empty string is no limit. ``tenants`` overrides them per tenant: {tenant: {"calls": ..., "images": ...}}.
    """

    def __init__(self, storage_url: str = "memory://", calls: str = "", images: str = "",
                 tenants: dict[str, dict[str, str]] | None = None):
        from limits import storage, strategies

        self.groups = {"calls": _parse(calls), "images": _parse(images)}
        self.tenants = {}
        for tenant, groups in (tenants or {}).items():
            unknown = set(groups) - set(self.groups)
            if unknown:
                raise ValueError(f"rate limits of tenant {tenant!r}: unknown groups {sorted(unknown)}: "
                                 f"allowed {sorted(self.groups)}")
            self.tenants[tenant] = {**self.groups, **{g: _parse(v) for g, v in groups.items()}}
        self.storage = storage.storage_from_string(storage_url)
        self.strategy = strategies.SlidingWindowCounterRateLimiter(self.storage)

    @property
    def enabled(self) -> bool:
        return any(self.groups.values()) or any(any(g.values()) for g in self.tenants.values())

    def charge(self, principal: Principal, group: str, cost: int = 1) -> None:
        """Count ``cost`` against the tenant's ``group`` limits, or raise RateLimited (nothing counted)."""
        limits = self.tenants.get(principal.limit_key, self.groups)[group]
        if not limits or cost <= 0:
            return
        try:
            self._charge(limits, (principal.limit_key, group), cost)
        except PigmentError:
            raise
        except Exception as exc:  # storage down: fail closed, with a status the caller can retry on
            raise Unavailable(f"rate-limit storage unreachable ({type(exc).__name__}): retry later") from exc

    def _charge(self, limits, ident: tuple[str, str], cost: int) -> None:
        group = ident[1]
        for limit in limits:
            if cost > limit.amount:
                raise Overloaded(f"{cost} {group} in one call can never fit the tenant's limit of {limit}: split it",
                                 reason="OVER_QUOTA_SIZE")
            if not self.strategy.test(limit, *ident, cost=cost):
                reset, _ = self.strategy.get_window_stats(limit, *ident)
                wait = max(0.0, reset - time.time())
                raise RateLimited(f"tenant {ident[0]} is over its {group} limit of {limit}: "
                                  f"retry in {wait:.1f}s", wait, subject=f"tenant:{ident[0]}", quota=f"{group} {limit}")
        for limit in limits:
            self.strategy.hit(limit, *ident, cost=cost)
