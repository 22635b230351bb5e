"""History core: users, items, interactions and catalog search. No grpc, no torch at import."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
from pigment.services.common import limits as lim
from pigment.services.common.errors import (
    AlreadyExists,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Violation,
    check_range,
)
from pigment.services.common.ids import check_id, check_key, check_tenant, show
from pigment.services.store.db import next_counter, transaction
from pigment.services.store.tables import (
    Feedback,
    Generation,
    Interaction,
    InteractionBatch,
    Item,
    Job,
    JobUser,
    ReferenceImage,
    RenderRequest,
    User,
)
from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("pigment.history")


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
    timestamp_ms: int | None = None  # None: the time it is logged (0 is 1970-01-01)


@dataclass
class HistoryEntry:
    item: ItemRecord
    interaction: InteractionRecord


@dataclass
class HistoryPage:
    entries: list[HistoryEntry]  # oldest first within the page
    next_page_token: str  # "" when there are no older entries
    total: int  # the user's interactions in all pages


@dataclass
class LogResult:
    logged: int
    duplicate: bool = False  # the batch_id was already applied with the same content


MAX_PAGE_SIZE = 10_000
PAGE_TOKEN_RE = re.compile(r"\A(\d{1,20})\.(\d{1,19})\Z")  # "<ts in microseconds>.<interaction id>"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def item_key(item_id: str) -> str:
    """The storage key of an item's image: a hash, so no caller string ever becomes a path."""
    return f"items/{hashlib.sha256(item_id.encode()).hexdigest()[:40]}.png"


def _check_interaction(n: int, i: InteractionRecord) -> None:
    where = f"interactions[{n}]"
    check_id(f"{where}.item_id", i.item_id)
    if i.kind:
        lim.check_kind(f"{where}.kind", i.kind)
    lim.check_finite(f"{where}.value", i.value)
    if i.timestamp_ms is not None and not 0 <= i.timestamp_ms <= lim.MAX_TIMESTAMP_MS:
        allowed = f"allowed unset (now) or 0 to {lim.MAX_TIMESTAMP_MS} (milliseconds since 1970, up to the year 9999)"
        raise InvalidInput(f"{where}.timestamp_ms={i.timestamp_ms} is out of range: {allowed}", reason="OUT_OF_RANGE",
                           field=f"{where}.timestamp_ms", allowed=allowed)


def _micros(ts: datetime) -> int:
    """Microseconds since 1970 (naive datetimes, as SQLite returns them, are UTC)."""
    return (ts.replace(tzinfo=ts.tzinfo or UTC) - EPOCH) // timedelta(microseconds=1)


def _batch_hash(interactions: Sequence[InteractionRecord], tenant: str | None) -> str:
    rows = [[i.item_id, i.kind or "view", i.value, i.timestamp_ms] for i in interactions]
    return hashlib.sha256(json.dumps([tenant, rows]).encode()).hexdigest()


def _replayed(done: InteractionBatch, content: str) -> LogResult:
    if done.content_hash != content:
        raise AlreadyExists(f"batch_id {done.batch_id} was already used with different interactions",
                            reason="IDEMPOTENCY_KEY_REUSED", field="batch_id")
    return LogResult(done.logged, duplicate=True)


def _visible_user(s: Session, user_id: str, principal) -> User:
    """The user row, or NotFound when it is absent or of a tenant the principal may not see (same answer:
    another tenant's users do not exist for the caller). ``principal`` None: a trusted internal caller."""
    user = s.get(User, user_id)
    if user is None or (principal is not None and not principal.sees(user.tenant)):
        raise NotFound(f"user {user_id} not found", reason="USER_NOT_FOUND")
    return user


def _record(item: Item) -> ItemRecord:
    return ItemRecord(item.item_id, item.caption, None, item.image_uri, item.tenant, dict(item.attributes or {}))


def _caller_tenant(principal, tenant: str | None, what: str, required: bool = False) -> str | None:
    """The tenant a write gets: a tenant-bound caller's own (a different one is refused); else as given."""
    if principal is None or principal.tenant is None:
        return tenant
    if required and not tenant:
        raise PermissionDenied(f"{what} is empty (the public catalog): a key of tenant {principal.tenant} "
                               f"writes only its own items: set tenant={principal.tenant}")
    if tenant and tenant != principal.tenant:
        raise PermissionDenied(f"{what}={tenant} is not the caller's tenant {principal.tenant}")
    return principal.tenant


class HistoryCore:
    """``embedder`` (optional) has ``embed_images``, ``embed_texts``, ``model_id``;
    ``index`` (optional) has ``sync()`` and ``search(vectors, k, tenant, exclude_pks)``."""

    def __init__(self, sessions: sessionmaker[Session], storage, embedder_factory: Callable | None = None,
                 index_factory: Callable | None = None, limits: lim.InputLimits | None = None):
        self.sessions = sessions
        self.limits = limits or lim.InputLimits()
        # Called with the user id after a GDPR deletion commits (e.g. to drop cached preferences).
        self.on_delete_user: list[Callable[[str], None]] = []
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
        check_id("user_id", user_id)
        tenant = check_tenant("tenant", tenant)
        with transaction(self.sessions) as s:
            if s.get(User, user_id) is None:
                s.add(User(user_id=user_id, tenant=tenant or None))

    def user_exists(self, user_id: str) -> bool:
        check_id("user_id", user_id)
        with transaction(self.sessions) as s:
            return s.get(User, user_id) is not None

    def check_user(self, user_id: str, principal) -> None:
        """NotFound unless the user exists in a tenant ``principal`` may act on."""
        check_id("user_id", user_id)
        with transaction(self.sessions) as s:
            _visible_user(s, user_id, principal)

    def log_interactions(self, user_id: str, interactions: Sequence[InteractionRecord], create_user: bool = False,
                         tenant: str | None = None, principal=None, batch_id: str = "") -> LogResult:
        """All or nothing: one bad row refuses the batch, and the error names every bad row.

        ``batch_id`` (optional): the batch is applied once; the same id with the same content again is a
        duplicate (nothing logged), with different content ALREADY_EXISTS. ``principal`` tenant-bound: a new
        user gets its tenant (``tenant`` must be empty or the same), an existing one must be of it, and only
        public items and the tenant's own can be logged."""
        check_id("user_id", user_id)
        tenant = check_tenant("tenant", tenant)
        if batch_id:
            check_key("batch_id", batch_id)
        if not interactions and not create_user:
            raise InvalidInput("interactions must not be empty (or set create_user to only create the user)",
                               reason="MISSING_FIELD", field="interactions", allowed="at least one interaction")
        if len(interactions) > lim.MAX_INTERACTIONS:
            raise InvalidInput(f"{len(interactions)} interactions in one call: allowed at most {lim.MAX_INTERACTIONS}",
                               reason="TOO_MANY", field="interactions", allowed=f"at most {lim.MAX_INTERACTIONS}")
        for n, i in enumerate(interactions):
            _check_interaction(n, i)
        tenant = _caller_tenant(principal, tenant, "tenant")
        content = _batch_hash(interactions, tenant) if batch_id else ""
        try:
            return self._log(user_id, interactions, create_user, tenant, principal, batch_id, content)
        except IntegrityError:  # a concurrent call with the same batch_id won: compare with what it stored
            if not batch_id:
                raise
            with transaction(self.sessions) as s:
                done = s.get(InteractionBatch, (user_id, batch_id))
            if done is None:
                raise
            return _replayed(done, content)

    def _log(self, user_id, interactions, create_user, tenant, principal, batch_id, content) -> LogResult:
        with transaction(self.sessions) as s:
            existing = s.get(User, user_id)
            if existing is None:
                if not create_user:
                    raise NotFound(f"user {user_id} not found (set create_user to create it)", reason="USER_NOT_FOUND")
                s.add(User(user_id=user_id, tenant=tenant or None))
                s.flush()
            elif principal is not None and not principal.sees(existing.tenant):
                if create_user:  # ids are global: the id is taken, but by whom is not told
                    raise PermissionDenied(f"user_id {user_id} is not available: choose another id",
                                           reason="USER_ID_TAKEN", field="user_id")
                raise NotFound(f"user {user_id} not found (set create_user to create it)", reason="USER_NOT_FOUND")
            if batch_id and (done := s.get(InteractionBatch, (user_id, batch_id))) is not None:
                return _replayed(done, content)
            ids = {i.item_id for i in interactions}
            visible = Item.deleted.is_(False)
            if principal is not None and principal.tenant is not None:
                visible = visible & (Item.tenant.is_(None) | (Item.tenant == principal.tenant))
            pks = dict(s.execute(select(Item.item_id, Item.pk).where(Item.item_id.in_(ids), visible)).all())
            missing = sorted(ids - pks.keys())
            if missing:
                rows = [Violation(f"interactions[{n}].item_id", f"item {i.item_id} not found")
                        for n, i in enumerate(interactions) if i.item_id not in pks]
                raise NotFound(f"{len(rows)} interactions name unknown items ({', '.join(missing[:10])}"
                               + (" ..." if len(missing) > 10 else "") + "): nothing was logged",
                               reason="ITEM_NOT_FOUND", violations=rows)
            now = datetime.now(UTC)
            for i in interactions:
                ts = now if i.timestamp_ms is None else EPOCH + timedelta(milliseconds=i.timestamp_ms)
                s.add(Interaction(user_id=user_id, item_pk=pks[i.item_id], kind=i.kind or "view", value=i.value, ts=ts))
            if batch_id:
                s.add(InteractionBatch(user_id=user_id, batch_id=batch_id, content_hash=content,
                                       logged=len(interactions)))
        return LogResult(len(interactions))

    def get_history(self, user_id: str, limit: int = 20, principal=None) -> list[HistoryEntry]:
        """The ``limit`` most recent interactions, oldest first. Unknown user -> NotFound."""
        return self.history_page(user_id, limit, "", principal, count=False).entries

    def history_page(self, user_id: str, page_size: int = 20, page_token: str = "", principal=None,
                     count: bool = True) -> HistoryPage:
        """One page of the user's history, newest page first (oldest first within it), and the total.

        The token is a keyset cursor (the page's oldest entry), so pages stay exact while new interactions
        arrive: they appear only on a new first page."""
        check_id("user_id", user_id)
        check_range("page_size", page_size, 1, MAX_PAGE_SIZE)
        cursor = PAGE_TOKEN_RE.match(page_token) if page_token else None
        if page_token and cursor is None:
            raise InvalidInput(f"page_token={show(page_token)} is not one this server issued: pass a previous "
                               "next_page_token, or \"\" for the newest page", reason="INVALID_PAGE_TOKEN",
                               field="page_token", allowed="a previous next_page_token or empty")
        visible = (Interaction.user_id == user_id) & Item.deleted.is_(False)
        query = select(Interaction, Item).join(Item, Item.pk == Interaction.item_pk).where(visible)
        if cursor is not None:
            ts, pk = EPOCH + timedelta(microseconds=int(cursor[1])), int(cursor[2])
            query = query.where(or_(Interaction.ts < ts, and_(Interaction.ts == ts, Interaction.id < pk)))
        with transaction(self.sessions) as s:
            _visible_user(s, user_id, principal)
            rows = s.execute(query.order_by(Interaction.ts.desc(), Interaction.id.desc()).limit(page_size + 1)).all()
            total = s.scalar(select(func.count()).select_from(Interaction).join(Item, Item.pk == Interaction.item_pk)
                             .where(visible)) if count else 0
        more, rows = len(rows) > page_size, rows[:page_size]
        token = f"{_micros(rows[-1][0].ts)}.{rows[-1][0].id}" if more else ""
        entries = [HistoryEntry(_record(item), InteractionRecord(item.item_id, inter.kind, inter.value,
                                                                 _micros(inter.ts) // 1000))
                   for inter, item in reversed(rows)]
        return HistoryPage(entries, token, total or 0)

    def reference_image_uri(self, item_id: str, user_id: str) -> str:
        """The stored image of an item the user may use as a reference: the public catalog's or the user's
        tenant's. Another tenant's item is NotFound, the same answer as an absent one."""
        check_id("item_id", item_id)
        with transaction(self.sessions) as s:
            user = _visible_user(s, user_id, None)
            item = s.scalar(select(Item).where(Item.item_id == item_id, Item.deleted.is_(False)))
            if item is None or (item.tenant is not None and item.tenant != user.tenant):
                raise NotFound(f"reference item {item_id!r} not found")
            if not item.image_uri:
                raise InvalidInput(f"reference item {item_id!r} has no image")
            return item.image_uri

    def claim_reference(self, digest: str, user_id: str, image_uri: str) -> None:
        """Record that the user (and its tenant) uploaded the reference image ``digest``; before the bytes are
        stored, so no stored reference is ever without an owner DeleteUser can find."""
        try:
            with transaction(self.sessions) as s:
                user = _visible_user(s, user_id, None)
                if s.get(ReferenceImage, (digest, user_id)) is None:
                    s.add(ReferenceImage(digest=digest, user_id=user_id, tenant=user.tenant, image_uri=image_uri))
        except IntegrityError:  # the same user's concurrent request with the same image claimed it first
            with transaction(self.sessions) as s:
                if s.get(ReferenceImage, (digest, user_id)) is None:
                    raise

    def reference_uri(self, digest: str, user_id: str) -> str:
        """The stored reference image ``digest`` if the user or a user of its tenant uploaded it; another
        tenant's (or an unknown one) is NotFound, as if absent."""
        with transaction(self.sessions) as s:
            user = _visible_user(s, user_id, None)
            mine = ReferenceImage.user_id == user_id
            if user.tenant:  # a tenant's users share; users of no tenant share nothing
                mine = or_(mine, ReferenceImage.tenant == user.tenant)
            uri = s.scalar(select(ReferenceImage.image_uri).where(ReferenceImage.digest == digest, mine).limit(1))
        if uri is None:
            raise NotFound(f"reference image {show(digest)} not found")
        return uri

    def delete_user(self, user_id: str, principal=None) -> tuple[int, int]:
        """GDPR deletion, everywhere pigment keeps something of the user: interactions, render requests and
        their generations (rows and stored PNGs), the raw reference images it uploaded (unless another user's
        row names the same content), feedback (so no later training round sees the user), batch
        job results (and the id in the job's parameters), the private items of a tenant the user was the last
        of (rows tombstoned, vectors removed from the index), and cached preferences (``on_delete_user``).
        A caller needs the admin scope, and the user must be of its tenant."""
        check_id("user_id", user_id)
        if principal is not None:
            principal.require_admin("DeleteUser")
        with transaction(self.sessions) as s:
            user = _visible_user(s, user_id, principal)
            n_inter = s.execute(delete(Interaction).where(Interaction.user_id == user_id)).rowcount
            s.execute(delete(InteractionBatch).where(InteractionBatch.user_id == user_id))
            gens = select(Generation.generation_id).where(Generation.user_id == user_id)
            # A retrieved result points at the catalog item's image, which is not the user's to delete.
            uris = list(s.scalars(select(Generation.storage_uri).where(
                Generation.user_id == user_id, Generation.retrieved_item_id.is_(None),
                Generation.storage_uri.is_not(None))))
            for cond in s.scalars(select(RenderRequest.conditioning).where(RenderRequest.user_id == user_id)):
                edit = (cond or {}).get("edit") or {}  # an EditImage request's stored source and mask
                uris += [edit[k] for k in ("source_uri", "mask_uri") if edit.get(k)]
            # Raw-byte references: the user's rows go, and each file once no other user's row names it.
            refs = dict(s.execute(select(ReferenceImage.digest, ReferenceImage.image_uri).where(
                ReferenceImage.user_id == user_id)).all())
            shared = set(s.scalars(select(ReferenceImage.digest).where(
                ReferenceImage.digest.in_(list(refs)), ReferenceImage.user_id != user_id))) if refs else set()
            uris += [uri for digest, uri in refs.items() if digest not in shared]
            s.execute(delete(ReferenceImage).where(ReferenceImage.user_id == user_id))
            s.execute(delete(Feedback).where(or_(Feedback.user_id == user_id, Feedback.generation_id.in_(gens))),
                      execution_options={"synchronize_session": False})
            s.execute(delete(Generation).where(or_(Generation.user_id == user_id, Generation.request_id.in_(
                select(RenderRequest.request_id).where(RenderRequest.user_id == user_id)))),
                execution_options={"synchronize_session": False})
            s.execute(delete(RenderRequest).where(RenderRequest.user_id == user_id))
            job_ids = list(s.scalars(select(JobUser.job_id).where(JobUser.user_id == user_id)))
            s.execute(delete(JobUser).where(JobUser.user_id == user_id))
            for job in s.scalars(select(Job).where(Job.job_id.in_(job_ids))):
                if user_id in (job.params or {}).get("user_ids", []):
                    job.params = {**job.params, "user_ids": [u for u in job.params["user_ids"] if u != user_id]}
            n_items = 0
            if user.tenant:
                others = s.scalar(select(func.count()).select_from(User).where(User.tenant == user.tenant, User.user_id != user_id))
                if not others:  # last user of a private tenant: its items go too
                    for item in s.scalars(select(Item).where(Item.tenant == user.tenant, Item.deleted.is_(False))):
                        if item.image_uri:
                            uris.append(item.image_uri)
                        self._tombstone(s, item)
                        n_items += 1
            s.delete(user)
        for uri in uris:
            self._delete_file(uri)
        if n_items and self.index is not None:
            self.index.sync()
        for hook in self.on_delete_user:
            hook(user_id)
        return n_inter, n_items

    def _delete_file(self, uri: str) -> None:
        try:
            self.storage.delete(uri)
        except InvalidInput:  # a URI outside our storage (a row from before image_uri was read-only): not ours
            log.warning("not deleting %s: outside the image storage", show(uri))

    # -- items ------------------------------------------------------------------
    @staticmethod
    def _tombstone(s: Session, item: Item) -> None:
        item.deleted, item.embedding, item.caption, item.image_uri = True, None, "", None
        item.change_seq = next_counter(s, "items")

    def _check_items(self, items: Sequence[ItemRecord]) -> list[ItemRecord]:
        """Every field checked before anything is stored; images come back as checked PNG bytes."""
        if len(items) > lim.MAX_ITEMS:
            raise InvalidInput(f"{len(items)} items in one call: allowed at most {lim.MAX_ITEMS}")
        seen: set[str] = set()
        out = []
        for n, it in enumerate(items):
            where = f"items[{n}]"
            check_id(f"{where}.item_id", it.item_id)
            if it.item_id in seen:
                raise InvalidInput(f"{where}.item_id={show(it.item_id)} appears more than once in this call",
                                   reason="DUPLICATE_ID", field=f"{where}.item_id", allowed="each item_id once per call")
            seen.add(it.item_id)
            if it.image_uri:
                raise InvalidInput(f"{where}.image_uri is read-only (the server stores images itself): "
                                   "send the image bytes in image_png")
            lim.check_text(f"{where}.caption", it.caption, self.limits.max_caption_chars)
            png = lim.check_image(f"{where}.image_png", it.image_png, self.limits) if it.image_png else None
            out.append(ItemRecord(it.item_id, it.caption, png, None, check_tenant(f"{where}.tenant", it.tenant),
                                  lim.check_attributes(f"{where}.attributes", dict(it.attributes or {}))))
        return out

    def upsert_items(self, items: Sequence[ItemRecord], embed: bool = True, principal=None) -> int:
        """``principal`` tenant-bound: every item must name its tenant (the public catalog is written by operator
        keys, tenant "*"), and an item id owned by another tenant or the catalog cannot be taken over."""
        items = self._check_items(items)
        if not items:
            return 0
        if principal is not None and principal.tenant is not None:
            for it in items:
                _caller_tenant(principal, it.tenant, f"item {it.item_id!r}: tenant", required=True)
        vectors = self._embed(items) if embed and self.embedder is not None else None
        with transaction(self.sessions) as s:
            last = next_counter(s, "items", by=len(items))
            existing = {i.item_id: i for i in s.scalars(select(Item).where(Item.item_id.in_([r.item_id for r in items])))}
            if principal is not None and principal.tenant is not None:
                taken = sorted(i for i, row in existing.items() if row.tenant != principal.tenant and not row.deleted)
                if taken:
                    raise PermissionDenied(f"item ids {', '.join(taken[:5])} belong to the public catalog or another tenant: "
                                           "choose other ids")
            for n, rec in enumerate(items):
                row = existing.get(rec.item_id) or Item(item_id=rec.item_id)
                row.caption, row.tenant, row.attributes, row.deleted = rec.caption, rec.tenant or None, rec.attributes, False
                if rec.image_png:
                    row.image_uri = self.storage.put(item_key(rec.item_id), rec.image_png)
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
            raise InvalidInput(f"k={k} is out of range: allowed 1..1000", reason="OUT_OF_RANGE", field="k",
                               allowed="allowed 1..1000")
        if self.index is None:
            raise InvalidInput("search needs an item index, which this deployment has not configured")
        if vector is not None:
            query = np.asarray(vector, dtype=np.float32)[None]  # the index checks its size and finiteness
        elif image_png:
            query = self.embedder.embed_images([lim.check_image("image_png", image_png, self.limits)])
        elif text:
            query = self.embedder.embed_texts([lim.check_text("text", text, lim.MAX_QUERY_CHARS)])
        else:
            raise InvalidInput("query must set one of text, image_png or vector")
        tenant, exclude = (principal.tenant if principal is not None else None), []
        if user_id:
            check_id("user_id", user_id)
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
