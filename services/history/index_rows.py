"""Item rows as the index reads them from SQL, and who may see which indexed pk."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from pigment.services.store.tables import Item
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

PAGE_ROWS = 10_000


# --------------------------------------------------------------------------- SQL


@dataclass
class ItemRow:
    pk: int
    tenant: str | None
    embedding: bytes | None
    embedding_model: str | None
    deleted: bool
    change_seq: int


ITEM_ROW_COLUMNS = (Item.pk, Item.tenant, Item.embedding, Item.embedding_model, Item.deleted, Item.change_seq)


def changed_items_since(
    session: Session, mark: int, after_pk: int = -1, limit: int = PAGE_ROWS
) -> list[ItemRow]:
    """Items with ``(change_seq, pk) > (mark, after_pk)``, in that order (keyset paging)."""
    after = or_(Item.change_seq > mark, and_(Item.change_seq == mark, Item.pk > after_pk))
    stmt = select(*ITEM_ROW_COLUMNS).where(after).order_by(Item.change_seq, Item.pk).limit(limit)
    return [ItemRow(*row) for row in session.execute(stmt)]


def max_change_seq(session: Session) -> int:
    return int(session.execute(select(func.max(Item.change_seq))).scalar() or 0)


def _live_rows(session: Session, embedding_model: str) -> Iterator[ItemRow]:
    """Every indexable item (not deleted, embedded by ``embedding_model``), by pk."""
    after = -1
    while True:
        stmt = (
            select(*ITEM_ROW_COLUMNS)
            .where(
                Item.pk > after, Item.deleted.is_(False), Item.embedding_model == embedding_model
            )
            .order_by(Item.pk)
            .limit(PAGE_ROWS)
        )
        rows = [ItemRow(*row) for row in session.execute(stmt)]
        if not rows:
            return
        yield from rows
        after = rows[-1].pk


# --------------------------------------------------------------------------- visibility


class Visibility:
    """Who may see which indexed pk: public (code 0) or one tenant (code >= 1); -1 = nobody.

    Selectors are bitmaps over pk (``IDSelectorBitmap``: bit ``pk`` of byte
    ``pk >> 3``), cached per tenant and dropped on any change.
    """

    def __init__(self) -> None:
        self.codes = np.full(1024, -1, dtype=np.int32)
        self.tenant_codes: dict[str, int] = {}
        self._counts: dict[int, int] = {}
        self._bitmaps: dict[str | None, np.ndarray] = {}

    def _code(self, tenant: str | None) -> int:
        return (
            0
            if tenant is None
            else self.tenant_codes.setdefault(tenant, len(self.tenant_codes) + 1)
        )

    def _grow(self, pk: int) -> None:
        if pk >= len(self.codes):
            grown = np.full(max(pk + 1, 2 * len(self.codes)), -1, dtype=np.int32)
            grown[: len(self.codes)] = self.codes
            self.codes = grown

    def set(self, pk: int, tenant: str | None) -> None:
        self._grow(pk)
        code = self._code(tenant)
        self._count(int(self.codes[pk]), -1)
        self.codes[pk] = code
        self._count(code, +1)
        self._bitmaps.clear()

    def set_many(self, pks: np.ndarray, tenants: Sequence[str | None]) -> None:
        if len(pks):
            self._grow(int(pks.max()))
            self.codes[pks] = np.array([self._code(t) for t in tenants], dtype=np.int32)
        counts = np.bincount(self.codes[self.codes >= 0])
        self._counts = {code: int(c) for code, c in enumerate(counts) if c}
        self._bitmaps.clear()

    def clear(self, pk: int) -> None:
        if pk < len(self.codes) and self.codes[pk] != -1:
            self._count(int(self.codes[pk]), -1)
            self.codes[pk] = -1
            self._bitmaps.clear()

    def _count(self, code: int, delta: int) -> None:
        if code != -1:
            self._counts[code] = self._counts.get(code, 0) + delta

    def visible_count(self, tenant: str | None) -> int:
        code = self.tenant_codes.get(tenant, -2) if tenant is not None else -2
        return self._counts.get(0, 0) + self._counts.get(code, 0)

    def bitmap(self, tenant: str | None) -> np.ndarray:
        cached = self._bitmaps.get(tenant)
        if cached is None:
            allowed = self.codes == 0
            code = self.tenant_codes.get(tenant) if tenant is not None else None
            if code is not None:
                allowed |= self.codes == code
            cached = self._bitmaps[tenant] = np.packbits(allowed, bitorder="little")
        return cached



def _visibility_of(session: Session, pks: np.ndarray) -> tuple[Visibility, np.ndarray]:
    """Tenants of the indexed ``pks`` from SQL, and the pks without a live row (orphans)."""
    vis = Visibility()
    if not len(pks):
        return vis, pks
    present = np.zeros(int(pks.max()) + 1, dtype=bool)
    present[pks] = True
    found_pks: list[int] = []
    tenants: list[str | None] = []
    stmt = select(Item.pk, Item.tenant).where(Item.deleted.is_(False), Item.pk <= int(pks.max()))
    for pk, tenant in session.execute(stmt.execution_options(yield_per=PAGE_ROWS)):
        if present[pk]:
            found_pks.append(pk)
            tenants.append(tenant)
    found = np.array(found_pks, dtype=np.int64)
    vis.set_many(found, tenants)
    present[found] = False
    return vis, np.flatnonzero(present).astype(np.int64)
