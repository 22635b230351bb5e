"""Model registry: adapter versions with their sha256, lineage, status and metrics.

A trainer registers what it wrote (``register``); a version serves once it is
promoted (``promote``: the previous active version of that kind is retired);
``rollback`` rejects the active version and re-activates the one before it.
The gateway stamps the active versions on every RenderRequest, and workers load
adapters *by version* through ``AdapterCache`` (one load per version per
process, sha256-checked), so a promotion reaches running workers without a
restart while requests already in flight finish on the version they started with.

No torch at import; the cores take a sessionmaker.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pigment.services.common.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound
from pigment.services.store.db import transaction
from pigment.services.store.tables import ModelVersion
from sqlalchemy import select

KIND_RE = re.compile(r"^[a-z0-9_]{1,32}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
STATUSES = ("registered", "active", "retired", "rejected")
# Which process applies which kind: the preference encoder (gateway side) or the renderer (worker side).
PREFERENCE_KINDS = frozenset({"pmg_head", "pigeon_lora"})
RENDER_KINDS = frozenset({"unet_lora", "ip_adapter"})


class AdapterMismatch(FailedPrecondition):
    """An adapter on disk does not match the sha256 its registry entry recorded."""


def _now() -> datetime:
    return datetime.now(UTC)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory as the sorted list of (relative path, file sha256)."""
    path = Path(path)
    if path.is_file():
        return sha256_bytes(path.read_bytes())
    if not path.is_dir():
        raise NotFound(f"adapter path {path} does not exist")
    listing = [f"{p.relative_to(path).as_posix()}\0{sha256_bytes(p.read_bytes())}\n"
               for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    if not listing:
        raise InvalidInput(f"adapter directory {path} has no files")
    return sha256_bytes("".join(listing).encode())


def adapter_version_label(adapters: dict | None) -> str | None:
    """The compact form stored on Generation rows: "kind=version,..." sorted, None when no adapters."""
    return ",".join(f"{k}={v}" for k, v in sorted(adapters.items())) if adapters else None


class Registry:
    def __init__(self, sessions):
        self.sessions = sessions

    # -- writing ------------------------------------------------------------------
    def register(self, kind: str, path: str | Path, *, version: str | None = None, parent: str | None = None,
                 metrics: dict | None = None, notes: str = "") -> ModelVersion:
        """Record an adapter file or directory; the same content registered again returns its entry."""
        if not KIND_RE.match(kind or ""):
            raise InvalidInput(f"kind={kind!r} is malformed: allowed 1-32 characters of [a-z0-9_]")
        path = Path(path).absolute()
        digest = sha256_path(path)
        version = version or f"{kind}-{digest[:12]}"
        if not VERSION_RE.match(version):
            raise InvalidInput(f"version={version!r} is malformed: allowed 1-128 characters of [A-Za-z0-9_.-]")
        with transaction(self.sessions) as s:
            existing = s.get(ModelVersion, version)
            if existing is not None:
                if (existing.kind, existing.sha256) != (kind, digest):
                    raise AlreadyExists(f"version {version!r} is already registered for other content")
                return existing
            if parent is not None and s.get(ModelVersion, parent) is None:
                raise NotFound(f"parent version {parent!r} is not registered")
            row = ModelVersion(version=version, kind=kind, path=str(path), sha256=digest, parent=parent,
                               status="registered", metrics=dict(metrics or {}), notes=notes)
            s.add(row)
        return row

    def promote(self, version: str, notes: str = "") -> ModelVersion:
        """Make ``version`` the active one of its kind (checked on disk first); the previous one is retired."""
        entry = self.get(version)
        if entry.status == "rejected":
            raise FailedPrecondition(f"version {version!r} was rejected ({entry.notes or 'no reason given'}); "
                                     "register a new version instead")
        self.verify(entry)
        with transaction(self.sessions) as s:
            for old in s.scalars(select(ModelVersion).where(ModelVersion.kind == entry.kind,
                                                            ModelVersion.status == "active")):
                if old.version != version:
                    old.status = "retired"
            row = s.get(ModelVersion, version)
            row.status, row.promoted_at = "active", _now()
            row.notes = _append(row.notes, notes)
        return row

    def rollback(self, kind: str, notes: str = "") -> tuple[ModelVersion, ModelVersion | None]:
        """Reject the active version of ``kind`` and re-activate the one promoted before it (if any).

        Returns (rejected, restored); restored None means the kind falls back to the preset's weights."""
        with transaction(self.sessions) as s:
            current = s.scalars(select(ModelVersion).where(ModelVersion.kind == kind,
                                                           ModelVersion.status == "active")).first()
            if current is None:
                raise FailedPrecondition(f"no active {kind} version to roll back")
            current.status = "rejected"
            current.notes = _append(current.notes, notes or "rolled back")
            previous = s.scalars(
                select(ModelVersion).where(ModelVersion.kind == kind, ModelVersion.status == "retired",
                                           ModelVersion.promoted_at.is_not(None))
                .order_by(ModelVersion.promoted_at.desc())).first()
            if previous is not None:
                previous.status, previous.promoted_at = "active", _now()
        return current, previous

    # -- reading ------------------------------------------------------------------
    def get(self, version: str) -> ModelVersion:
        with transaction(self.sessions) as s:
            row = s.get(ModelVersion, version)
        if row is None:
            raise NotFound(f"model version {version!r} is not registered")
        return row

    def list(self, kind: str | None = None) -> list[ModelVersion]:
        query = select(ModelVersion).order_by(ModelVersion.kind, ModelVersion.created_at)
        if kind:
            query = query.where(ModelVersion.kind == kind)
        with transaction(self.sessions) as s:
            return list(s.scalars(query))

    def active(self, kind: str) -> ModelVersion | None:
        with transaction(self.sessions) as s:
            return s.scalars(select(ModelVersion).where(ModelVersion.kind == kind,
                                                        ModelVersion.status == "active")).first()

    def active_versions(self) -> dict[str, str]:
        """{kind: version} of every active version: what the gateway stamps on each request."""
        with transaction(self.sessions) as s:
            return dict(s.execute(select(ModelVersion.kind, ModelVersion.version)
                                  .where(ModelVersion.status == "active")).all())

    def verify(self, entry: ModelVersion | str) -> Path:
        """The adapter's path, after checking its sha256 against the registry; refuses a mismatch."""
        entry = self.get(entry) if isinstance(entry, str) else entry
        path = Path(entry.path)
        if not path.exists():
            raise AdapterMismatch(f"adapter {entry.version} ({entry.kind}) is missing at {path}")
        actual = sha256_path(path)
        check_digest(entry, actual)
        return path


def check_digest(entry: ModelVersion, actual: str) -> None:
    if actual != entry.sha256:
        raise AdapterMismatch(
            f"adapter {entry.version} ({entry.kind}) at {entry.path} has sha256 {actual[:12]}..., the registry "
            f"says {entry.sha256[:12]}...: refusing to load a modified or corrupt adapter")


def _append(notes: str, more: str) -> str:
    return f"{notes}\n{more}".strip() if more else notes


def load_safetensors(path: Path, data: bytes | None = None):
    """Default loader: a .safetensors file (from the bytes already hashed), or a directory of them."""
    from safetensors.torch import load, load_file

    if data is not None:
        return load(data)
    return {p.relative_to(path).as_posix(): load_file(p) for p in sorted(path.rglob("*.safetensors"))}


class AdapterCache:
    """Adapters loaded by version, once per process (LRU of ``max_versions``), sha256-checked at load.

    A file is read once, hashed and loaded from the same bytes, so what was checked is what is used."""

    def __init__(self, registry: Registry, loader: Callable = load_safetensors, max_versions: int = 4):
        self.registry = registry
        self.loader = loader
        self.max_versions = max_versions
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, version: str):
        with self._lock:
            if version in self._cache:
                self._cache.move_to_end(version)
                return self._cache[version]
        entry = self.registry.get(version)
        path = Path(entry.path)
        if path.is_file():
            data = path.read_bytes()
            check_digest(entry, sha256_bytes(data))
            loaded = self.loader(path, data)
        else:
            loaded = self.loader(self.registry.verify(entry), None)
        with self._lock:
            self._cache[version] = loaded
            while len(self._cache) > self.max_versions:
                self._cache.popitem(last=False)
        return loaded

    def resolve(self, adapters: dict | None, kinds: frozenset[str] | None = None) -> dict:
        """{kind: loaded adapter} for the versions a request recorded (only ``kinds``, if given)."""
        return {kind: self.get(version) for kind, version in sorted((adapters or {}).items())
                if kinds is None or kind in kinds}


# -- `pigment models list | register | promote | rollback` ----------------------------
REGISTRY_ACTIONS = ("list", "register", "promote", "rollback")


def cli_action(args, settings) -> int:
    from pigment.services.store.db import make_sessionmaker

    registry = Registry(make_sessionmaker(settings.database_url))
    words = list(args.components)
    need = {"list": 0, "register": 2, "promote": 1, "rollback": 1}[args.action]
    if len(words) < need:
        raise InvalidInput({"register": "usage: pigment models register KIND PATH [--version V] [--parent P]",
                            "promote": "usage: pigment models promote VERSION",
                            "rollback": "usage: pigment models rollback KIND"}[args.action])
    notes = getattr(args, "notes", "") or ""
    if args.action == "list":
        rows = registry.list(words[0] if words else None)
        for r in rows:
            print(f"{r.version:32s} {r.kind:12s} {r.status:10s} {r.sha256[:12]} parent={r.parent or '-'} "
                  f"metrics={json.dumps(r.metrics, sort_keys=True)} {r.path}")
        if not rows:
            print("no model versions registered")
    elif args.action == "register":
        row = registry.register(words[0], words[1], version=args.version, parent=getattr(args, "parent", None),
                                notes=notes)
        print(f"registered {row.version} ({row.kind}, sha256 {row.sha256[:12]}...)")
    elif args.action == "promote":
        row = registry.promote(words[0], notes=notes)
        print(f"{row.version} is now the active {row.kind}")
    else:
        rejected, restored = registry.rollback(words[0], notes=notes)
        print(f"rejected {rejected.version}; active {words[0]}: {restored.version if restored else 'none (preset)'}")
    return 0
