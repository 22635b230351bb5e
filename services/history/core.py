"""History core: users, items, interactions and catalog search. No grpc, no torch at import."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Sequence

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from pigment.services.common.errors import InvalidInput, NotFound, PermissionDenied
from pigment.services.store.db import next_counter, transaction
from pigment.services.store.tables import Interaction, Item, User

MAX_ID_LEN = 128


@dataclass
class ItemRecord:
    item_id: str
    caption: str = ""
    image_png: bytes | None = None
    image_uri: str | None = None
    tenant: str | None = None
    attributes: dict = field(default_factory=dict)


@dataclass
class InteractionRecord:
    item_id: str
    kind: str = "view"
    value: float = 1.0
    timestamp_ms: int = 0


@dataclass
class HistoryEntry:
    item: ItemRecord
    interaction: InteractionRecord


def _check_id(field_name: str, value: str) -> None:
    if not value or len(value) > MAX_ID_LEN:
        raise InvalidInput(f"{field_name} must be 1..{MAX_ID_LEN} characters, got {len(value or '')}")


def _visible_user(s: Session, user_id: str, principal) -> User:
    """The user row, or NotFound when it is absent or of a tenant the principal may not see (same answer:
    another tenant's users do not exist for the caller). ``principal`` None: a trusted internal caller."""
    user = s.get(User, user_id)
    if user is None or (principal is not None and not principal.sees(user.tenant)):
        raise NotFound(f"user {user_id!r} not found")
    return user


def _record(item: Item) -> ItemRecord:
    return ItemRecord(item.item_id, item.caption, None, item.image_uri, item.tenant, dict(item.attributes or {}))


def _caller_tenant(principal, tenant: str | None, what: str, required: bool = False) -> str | None:
    """The tenant a write gets: a tenant-bound caller's own (a different one is refused); else as given."""
    if principal is None or principal.tenant is None:
        return tenant
    if required and not tenant:
        raise PermissionDenied(f"{what} is empty (the public catalog): a key of tenant {principal.tenant!r} "
                               f"writes only its own items: set tenant={principal.tenant!r}")
    if tenant and tenant != principal.tenant:
        raise PermissionDenied(f"{what}={tenant!r} is not the caller's tenant {principal.tenant!r}")
    return principal.tenant


class HistoryCore:
    """``embedder`` (optional) has ``embed_images``, ``embed_texts``, ``model_id``;
    ``index`` (optional) has ``sync()`` and ``search(vectors, k, tenant, exclude_pks)``."""

    def __init__(self, sessions: sessionmaker[Session], storage, embedder_factory: Callable | None = None,
                 index_factory: Callable | None = None):
        self.sessions = sessions
        self.storage = storage
        self._embedder_factory = embedder_factory
        self._index_factory = index_factory
        self._embedder = None
        self._index = None

    # -- lazily built heavy parts ---------------------------------------------
    @property
    def embedder(self):
        if self._embedder is None and self._embedder_factory is not None:
            self._embedder = self._embedder_factory()
        return self._embedder

    @property
    def index(self):
        if self._index is None and self._index_factory is not None:
            self._index = self._index_factory(self.embedder)
        return self._index

    # -- users & interactions -------------------------------------------------
    def ensure_user(self, user_id: str, tenant: str | None = None) -> None:
        _check_id("user_id", user_id)
        with transaction(self.sessions) as s:
            if s.get(User, user_id) is None:
                s.add(User(user_id=user_id, tenant=tenant or None))

    def user_exists(self, user_id: str) -> bool:
        with transaction(self.sessions) as s:
            return s.get(User, user_id) is not None

    def check_user(self, user_id: str, principal) -> None:
        """NotFound unless the user exists in a tenant ``principal`` may act on."""
        _check_id("user_id", user_id)
        with transaction(self.sessions) as s:
            _visible_user(s, user_id, principal)

    def log_interactions(self, user_id: str, interactions: Sequence[InteractionRecord], create_user: bool = False,
                         tenant: str | None = None, principal=None) -> int:
        """``principal`` tenant-bound: a new user gets its tenant (``tenant`` must be empty or the same), an
        existing one must be of it, and only public items and the tenant's own can be logged."""
        _check_id("user_id", user_id)
        if not interactions and not create_user:
            raise InvalidInput("interactions must not be empty (or set create_user to only create the user)")
        tenant = _caller_tenant(principal, tenant, "tenant")
        with transaction(self.sessions) as s:
            existing = s.get(User, user_id)
            if existing is None:
                if not create_user:
                    raise NotFound(f"user {user_id!r} not found (set create_user to create it)")
                s.add(User(user_id=user_id, tenant=tenant or None))
                s.flush()
            elif principal is not None and not principal.sees(existing.tenant):
                if create_user:  # ids are global: the id is taken, but by whom is not told
                    raise PermissionDenied(f"user_id {user_id!r} is not available: choose another id")
                raise NotFound(f"user {user_id!r} not found (set create_user to create it)")
            ids = {i.item_id for i in interactions}
            visible = Item.deleted.is_(False)
            if principal is not None and principal.tenant is not None:
                visible = visible & (Item.tenant.is_(None) | (Item.tenant == principal.tenant))
            pks = dict(s.execute(select(Item.item_id, Item.pk).where(Item.item_id.in_(ids), visible)).all())
            missing = sorted(ids - pks.keys())
            if missing:
                raise NotFound(f"unknown item ids: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
            now = datetime.now(timezone.utc)
            for i in interactions:
                ts = datetime.fromtimestamp(i.timestamp_ms / 1000, timezone.utc) if i.timestamp_ms else now
                s.add(Interaction(user_id=user_id, item_pk=pks[i.item_id], kind=i.kind or "view", value=i.value, ts=ts))
        return len(interactions)

    def get_history(self, user_id: str, limit: int = 20, principal=None) -> list[HistoryEntry]:
        """The ``limit`` most recent interactions, oldest first. Unknown user -> NotFound."""
        _check_id("user_id", user_id)
        if limit < 1 or limit > 10_000:
            raise InvalidInput(f"limit={limit} is out of range: allowed 1..10000")
        with transaction(self.sessions) as s:
            _visible_user(s, user_id, principal)
            rows = s.execute(
                select(Interaction, Item).join(Item, Item.pk == Interaction.item_pk)
                .where(Interaction.user_id == user_id, Item.deleted.is_(False))
                .order_by(Interaction.ts.desc(), Interaction.id.desc()).limit(limit)
            ).all()
        return [
            HistoryEntry(_record(item), InteractionRecord(item.item_id, inter.kind, inter.value,
                                                          int(inter.ts.replace(tzinfo=inter.ts.tzinfo or timezone.utc).timestamp() * 1000)))
            for inter, item in reversed(rows)
        ]

    def delete_user(self, user_id: str, principal=None) -> tuple[int, int]:
        """GDPR deletion: interactions, the user's private items (and their vectors), the user row.
        A caller needs the admin scope, and the user must be of its tenant."""
        if principal is not None:
            principal.require_admin("DeleteUser")
        with transaction(self.sessions) as s:
            user = _visible_user(s, user_id, principal)
            n_inter = s.execute(delete(Interaction).where(Interaction.user_id == user_id)).rowcount
            n_items = 0
            if user.tenant:
                others = s.scalar(select(func.count()).select_from(User).where(User.tenant == user.tenant, User.user_id != user_id))
                if not others:  # last user of a private tenant: its items go too
                    for item in s.scalars(select(Item).where(Item.tenant == user.tenant, Item.deleted.is_(False))):
                        self._tombstone(s, item)
                        n_items += 1
            s.delete(user)
        if n_items and self.index is not None:
            self.index.sync()
        return n_inter, n_items

    # -- items ------------------------------------------------------------------
    @staticmethod
    def _tombstone(s: Session, item: Item) -> None:
        item.deleted, item.embedding, item.caption, item.image_uri = True, None, "", None
        item.change_seq = next_counter(s, "items")

    def upsert_items(self, items: Sequence[ItemRecord], embed: bool = True, principal=None) -> int:
        """``principal`` tenant-bound: every item must name its tenant (the public catalog is written by operator
        keys, tenant "*"), and an item id owned by another tenant or the catalog cannot be taken over."""
        for it in items:
            _check_id("item_id", it.item_id)
            if principal is not None and principal.tenant is not None:
                _caller_tenant(principal, it.tenant, f"item {it.item_id!r}: tenant", required=True)
        vectors = self._embed(items) if embed and self.embedder is not None else None
        with transaction(self.sessions) as s:
            last = next_counter(s, "items", by=len(items))
            existing = {i.item_id: i for i in s.scalars(select(Item).where(Item.item_id.in_([r.item_id for r in items])))}
            if principal is not None and principal.tenant is not None:
                taken = sorted(i for i, row in existing.items() if row.tenant != principal.tenant and not row.deleted)
                if taken:
                    raise PermissionDenied(f"item ids {taken[:5]} belong to the public catalog or another tenant: "
                                           "choose other ids")
            for n, rec in enumerate(items):
                row = existing.get(rec.item_id) or Item(item_id=rec.item_id)
                row.caption, row.tenant, row.attributes, row.deleted = rec.caption, rec.tenant or None, rec.attributes, False
                if rec.image_png:
                    row.image_uri = self.storage.put(f"items/{rec.item_id}.png", rec.image_png)
                elif rec.image_uri:
                    row.image_uri = rec.image_uri
                if vectors is not None:
                    row.embedding, row.embedding_model = vectors[n].tobytes(), self.embedder.model_id
                row.change_seq = last - len(items) + n + 1
                s.add(row)
        if self.index is not None:
            self.index.sync()
        return len(items)

    def _embed(self, items: Sequence[ItemRecord]) -> np.ndarray:
        """Image embedding where there is an image, else the caption's text embedding (same space)."""
        out = np.zeros((len(items), self.embedder.dim), dtype=np.float32)
        with_img = [n for n, r in enumerate(items) if r.image_png]
        text_only = [n for n, r in enumerate(items) if not r.image_png]
        if with_img:
            out[with_img] = self.embedder.embed_images([items[n].image_png for n in with_img])
        if text_only:
            out[text_only] = self.embedder.embed_texts([items[n].caption for n in text_only])
        return out

    def search(self, *, text: str | None = None, image_png: bytes | None = None, vector: Sequence[float] | None = None,
               k: int = 10, user_id: str | None = None, include_seen: bool = False,
               principal=None) -> list[tuple[ItemRecord, float]]:
        """Public items plus the user's tenant's (or, without a user, the caller's tenant's)."""
        if not 1 <= k <= 1000:
            raise InvalidInput(f"k={k} is out of range: allowed 1..1000")
        if self.index is None:
            raise InvalidInput("search needs an item index, which this deployment has not configured")
        if vector is not None:
            query = np.asarray(vector, dtype=np.float32)[None]
        elif image_png:
            query = self.embedder.embed_images([image_png])
        elif text:
            query = self.embedder.embed_texts([text])
        else:
            raise InvalidInput("query must set one of text, image_png or vector")
        tenant, exclude = (principal.tenant if principal is not None else None), []
        if user_id:
            with transaction(self.sessions) as s:
                user = _visible_user(s, user_id, principal)
                tenant = user.tenant
                if not include_seen:
                    exclude = list(s.scalars(select(Interaction.item_pk).where(Interaction.user_id == user_id).distinct()))
        pks, scores = self.index.search(query, k, tenant=tenant, exclude_pks=exclude)
        pks, scores = list(pks[0]), list(scores[0])
        with transaction(self.sessions) as s:
            rows = {i.pk: i for i in s.scalars(select(Item).where(Item.pk.in_([int(p) for p in pks if p >= 0])))}
        return [(_record(rows[int(p)]), float(sc)) for p, sc in zip(pks, scores) if int(p) in rows]
