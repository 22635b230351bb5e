"""History core: users, items, interactions and catalog search. No grpc, no torch at import."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Sequence

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from pigment.services.common.errors import InvalidInput, NotFound
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


def _record(item: Item) -> ItemRecord:
    return ItemRecord(item.item_id, item.caption, None, item.image_uri, item.tenant, dict(item.attributes or {}))


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

    def log_interactions(self, user_id: str, interactions: Sequence[InteractionRecord], create_user: bool = False,
                         tenant: str | None = None) -> int:
        _check_id("user_id", user_id)
        if not interactions and not create_user:
            raise InvalidInput("interactions must not be empty (or set create_user to only create the user)")
        with transaction(self.sessions) as s:
            if s.get(User, user_id) is None:
                if not create_user:
                    raise NotFound(f"user {user_id!r} not found (set create_user to create it)")
                s.add(User(user_id=user_id, tenant=tenant or None))
                s.flush()
            ids = {i.item_id for i in interactions}
            pks = dict(s.execute(select(Item.item_id, Item.pk).where(Item.item_id.in_(ids), Item.deleted.is_(False))).all())
            missing = sorted(ids - pks.keys())
            if missing:
                raise NotFound(f"unknown item ids: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
            now = datetime.now(timezone.utc)
            for i in interactions:
                ts = datetime.fromtimestamp(i.timestamp_ms / 1000, timezone.utc) if i.timestamp_ms else now
                s.add(Interaction(user_id=user_id, item_pk=pks[i.item_id], kind=i.kind or "view", value=i.value, ts=ts))
        return len(interactions)

    def get_history(self, user_id: str, limit: int = 20) -> list[HistoryEntry]:
        """The ``limit`` most recent interactions, oldest first. Unknown user -> NotFound."""
        _check_id("user_id", user_id)
        if limit < 1 or limit > 10_000:
            raise InvalidInput(f"limit={limit} is out of range: allowed 1..10000")
        with transaction(self.sessions) as s:
            if s.get(User, user_id) is None:
                raise NotFound(f"user {user_id!r} not found")
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

    def delete_user(self, user_id: str) -> tuple[int, int]:
        """GDPR deletion: interactions, the user's private items (and their vectors), the user row."""
        with transaction(self.sessions) as s:
            user = s.get(User, user_id)
            if user is None:
                raise NotFound(f"user {user_id!r} not found")
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

    def upsert_items(self, items: Sequence[ItemRecord], embed: bool = True) -> int:
        for it in items:
            _check_id("item_id", it.item_id)
        vectors = self._embed(items) if embed and self.embedder is not None else None
        with transaction(self.sessions) as s:
            last = next_counter(s, "items", by=len(items))
            existing = {i.item_id: i for i in s.scalars(select(Item).where(Item.item_id.in_([r.item_id for r in items])))}
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
               k: int = 10, user_id: str | None = None, include_seen: bool = False) -> list[tuple[ItemRecord, float]]:
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
        tenant, exclude = None, []
        if user_id:
            with transaction(self.sessions) as s:
                user = s.get(User, user_id)
                if user is None:
                    raise NotFound(f"user {user_id!r} not found")
                tenant = user.tenant
                if not include_seen:
                    exclude = list(s.scalars(select(Interaction.item_pk).where(Interaction.user_id == user_id).distinct()))
        pks, scores = self.index.search(query, k, tenant=tenant, exclude_pks=exclude)
        pks, scores = list(pks[0]), list(scores[0])
        with transaction(self.sessions) as s:
            rows = {i.pk: i for i in s.scalars(select(Item).where(Item.pk.in_([int(p) for p in pks if p >= 0])))}
        return [(_record(rows[int(p)]), float(sc)) for p, sc in zip(pks, scores) if int(p) in rows]
