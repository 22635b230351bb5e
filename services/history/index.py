"""The item index: a FAISS index of item embeddings, derived from SQL.

SQL (``items``) is the source of truth; this index is a cache of it that can
always be rebuilt. The contract (DESIGN.md, "Storage"):

* **IDs** are ``Item.pk``. Updates remove then add; tombstoned items
  (``deleted``) are removed with ``remove_ids``, so they are really gone.
* **Single writer**: an exclusive ``fcntl`` lock on ``<dir>/index.lock``. A
  second writer gets ``FailedPrecondition`` naming the holder.
* **Atomic save**: the index goes to a temp file, is fsynced and renamed to a
  fresh name; then ``manifest.json`` is written the same way and the directory
  fsynced. The manifest is the commit point: a crash anywhere leaves either the
  old or the new (index, manifest) pair. It records the SQL high-water mark (the
  largest ``change_seq`` applied), the embedding model and its hash, dim,
  index kind and ntotal.
* **Catch-up**: ``open()`` applies every row with ``change_seq`` above the mark,
  so rows committed after the last save (or before a crash) are never lost.
  Applying a row is idempotent (remove, then add its current state).
* **Rebuild**: a missing, truncated, corrupt or foreign (other model / dim /
  kind) index is rebuilt from SQL, with the reason logged.
* **Tenant isolation inside the search**: a FAISS ``IDSelector`` (a bitmap
  over pks of public items plus that tenant's items, kept in memory) is passed
  in the search parameters, so other tenants' items are never candidates; the
  user's exclude list is a second selector combined with it.

Ordering assumption: writers allocate ``change_seq`` from the ``items`` counter
under a row lock held until commit (``store.db.next_counter``), so sequence
numbers become visible in increasing order and a reader never skips one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import faiss
import numpy as np
from pigment.services.common.errors import FailedPrecondition, InvalidInput, ModelNotReady
from pigment.services.store.tables import Item
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LOCK_FILE = "index.lock"
MANIFEST_FORMAT = 1
MAX_K = 1000
PAGE_ROWS = 10_000

FLAT, IVF = "flat", "ivf"
_AFTER_ALL_PKS = 2**31 - 1  # above any Item.pk (INTEGER in SQL); must fit the column type on PostgreSQL


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class IndexConfig:
    """How the item index is built and searched."""

    kind: str = "auto"
    """``auto`` (flat below ``flat_threshold`` items, IVF above), ``flat`` or ``ivf``."""
    flat_threshold: int = 50_000
    """Catalog size from which ``auto`` builds an IVF index instead of exact search."""
    nlist: int | None = None
    """IVF lists; default about sqrt(n) (at most n/39, so k-means has enough points)."""
    nprobe: int = 2
    """IVF lists scanned per query: the recall/latency knob. 2 gives recall@10 1.0 at 1M
    clustered vectors on 2 CPUs (bench/RESULTS.md); raise it for less clustered catalogs."""
    ivf_codec: str = "Flat"
    """How IVF stores vectors: ``Flat`` (float32), ``SQfp16`` or ``SQ8``."""
    train_points_per_list: int = 64
    """k-means sample size per list (n is subsampled to nlist * this)."""
    kmeans_iters: int = 10
    regrow_factor: float = 4.0
    """Retrain an IVF index once it holds this many times the vectors it was trained on."""
    use_gpu: bool = False
    """Train the IVF coarse quantizer on GPU 0 (needs faiss-gpu); raises if absent."""
    threads: int | None = None
    """FAISS OpenMP threads for this process; None leaves FAISS's default."""
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.kind not in ("auto", FLAT, IVF):
            raise InvalidInput(f"index kind={self.kind!r}: allowed 'auto', 'flat', 'ivf'")
        if self.ivf_codec not in ("Flat", "SQfp16", "SQ8"):
            raise InvalidInput(f"ivf_codec={self.ivf_codec!r}: allowed 'Flat', 'SQfp16', 'SQ8'")
        if self.nprobe < 1 or self.flat_threshold < 1:
            raise InvalidInput("nprobe and flat_threshold must be >= 1")


# --------------------------------------------------------------------------- factory
# The benchmark (bench/retrieval.py) builds through these functions, so it
# measures exactly what production runs.


def choose_kind(n: int, config: IndexConfig) -> str:
    if config.kind != "auto":
        return config.kind
    return IVF if n >= config.flat_threshold else FLAT


def default_nlist(n: int, config: IndexConfig) -> int:
    if config.nlist:
        return config.nlist
    return max(1, min(round(math.sqrt(n)), n // 39))


def check_gpu(config: IndexConfig) -> None:
    """Raise ModelNotReady if a GPU was asked for but this FAISS build or host has none."""
    if not config.use_gpu:
        return
    if not hasattr(faiss, "StandardGpuResources"):
        raise ModelNotReady(
            "use_gpu=True but the installed faiss has no GPU support (install faiss-gpu)"
        )
    if faiss.get_num_gpus() < 1:
        raise ModelNotReady("use_gpu=True but faiss sees no GPU (faiss.get_num_gpus() == 0)")


def new_index(kind: str, dim: int, n: int, config: IndexConfig) -> faiss.Index:
    """An empty index of ``kind`` for about ``n`` vectors; ids are external (Item.pk)."""
    if kind == FLAT:
        return faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    nlist = default_nlist(n, config)
    index = faiss.index_factory(dim, f"IVF{nlist},{config.ivf_codec}", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.spherical = True  # unit vectors: centroids on the sphere suit inner product
    ivf.cp.niter = config.kmeans_iters
    ivf.cp.max_points_per_centroid = config.train_points_per_list
    ivf.cp.seed = config.seed
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # remove_ids in O(removed), not O(ntotal)
    ivf.nprobe = config.nprobe
    return index


def train_index(index: faiss.Index, vectors: np.ndarray, config: IndexConfig) -> None:
    """Train an IVF index on a seeded subsample (no-op for flat)."""
    if index.is_trained:
        return
    ivf = faiss.extract_index_ivf(index)
    want = ivf.nlist * config.train_points_per_list
    if len(vectors) > want:
        rows = np.random.default_rng(config.seed).choice(len(vectors), want, replace=False)
        vectors = vectors[np.sort(rows)]
    gpu_keepalive = _gpu_clustering_index(ivf, config)
    index.train(np.ascontiguousarray(vectors, dtype=np.float32))
    ivf.clustering_index = None
    del gpu_keepalive


def _gpu_clustering_index(ivf: Any, config: IndexConfig) -> Any:
    if not config.use_gpu:
        return None
    check_gpu(config)
    res = faiss.StandardGpuResources()
    ivf.clustering_index = faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatIP(ivf.d))
    return res, ivf.clustering_index


def build_index(
    vectors: np.ndarray, ids: np.ndarray, config: IndexConfig, kind: str | None = None
) -> faiss.Index:
    """Choose the kind from the size (unless given), train and add ``vectors`` under ``ids``."""
    n, dim = vectors.shape
    index = new_index(kind or choose_kind(n, config), dim, n, config)
    train_index(index, vectors, config)
    for start in range(0, n, 100_000):
        stop = start + 100_000
        index.add_with_ids(
            np.ascontiguousarray(vectors[start:stop], dtype=np.float32),
            np.ascontiguousarray(ids[start:stop], dtype=np.int64),
        )
    return index


def index_kind(index: faiss.Index) -> str:
    return FLAT if isinstance(index, faiss.IndexIDMap) else IVF


def index_nbytes(index: faiss.Index) -> int:
    """Approximate memory held by the index: codes + ids (+ centroids)."""
    if index_kind(index) == FLAT:
        return index.ntotal * (index.d * 4 + 8)
    ivf = faiss.extract_index_ivf(index)
    return index.ntotal * (ivf.code_size + 8 + 16) + ivf.nlist * ivf.d * 4


def search_parameters(index: faiss.Index, nprobe: int, sel: Any = None) -> faiss.SearchParameters:
    if index_kind(index) == FLAT:
        return faiss.SearchParameters(sel=sel)
    return faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)


# --------------------------------------------------------------------------- SQL


@dataclass
class ItemRow:
    pk: int
    tenant: str | None
    embedding: bytes | None
    embedding_model: str | None
    deleted: bool
    change_seq: int


def changed_items_since(
    session: Session, mark: int, after_pk: int = -1, limit: int = PAGE_ROWS
) -> list[ItemRow]:
    """Items with ``(change_seq, pk) > (mark, after_pk)``, in that order (keyset paging)."""
    cols = (
        Item.pk,
        Item.tenant,
        Item.embedding,
        Item.embedding_model,
        Item.deleted,
        Item.change_seq,
    )
    after = or_(Item.change_seq > mark, and_(Item.change_seq == mark, Item.pk > after_pk))
    stmt = select(*cols).where(after).order_by(Item.change_seq, Item.pk).limit(limit)
    return [ItemRow(*row) for row in session.execute(stmt)]


def max_change_seq(session: Session) -> int:
    return int(session.execute(select(func.max(Item.change_seq))).scalar() or 0)


def _live_rows(session: Session, embedding_model: str) -> Iterator[ItemRow]:
    """Every indexable item (not deleted, embedded by ``embedding_model``), by pk."""
    cols = (
        Item.pk,
        Item.tenant,
        Item.embedding,
        Item.embedding_model,
        Item.deleted,
        Item.change_seq,
    )
    after = -1
    while True:
        stmt = (
            select(*cols)
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


# --------------------------------------------------------------------------- manifest & files


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
    trained_on: int
    nlist: int | None = None
    saved_at: float = field(default_factory=time.time)
    format: int = MANIFEST_FORMAT


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write via ``<path>.tmp``, fsync it, rename over ``path``, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class _WriterLock:
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


class _RWLock:
    """Many searches at once; mutations alone."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def index_ids(index: faiss.Index) -> np.ndarray:
    """The external ids (pks) stored in ``index``."""
    if index_kind(index) == FLAT:
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    invlists = faiss.extract_index_ivf(index).invlists
    parts = [
        faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
        for i in range(invlists.nlist)
        if invlists.list_size(i)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


# --------------------------------------------------------------------------- the index


class ItemIndex:
    """Item embeddings of one embedding model, searchable by inner product, kept in step with SQL.

    Use :meth:`open`; then :meth:`sync` after SQL writes, :meth:`search`,
    :meth:`save` now and then, :meth:`close` at shutdown.
    """

    def __init__(
        self,
        directory: Path,
        session_factory: Callable[[], Session],
        embedding_model: str,
        dim: int,
        config: IndexConfig,
        model_hash: str | None,
        lock: _WriterLock | None,
    ) -> None:
        self.directory = directory
        self.embedding_model = embedding_model
        self.model_hash = model_hash
        self.dim = dim
        self.config = config
        self._session_factory = session_factory
        self._lock = lock
        self.read_only = lock is None
        self._index: faiss.Index = new_index(FLAT, dim, 0, config)
        self._vis = Visibility()
        self._mark = (0, -1)  # (change_seq, pk) of the last applied row
        self._trained_on = 0
        self._dirty = False
        self._rw = _RWLock()
        self._mutex = threading.Lock()  # one mutation (sync / rebuild / save) at a time

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        session_factory: Callable[[], Session],
        embedding_model: str,
        dim: int,
        *,
        config: IndexConfig | None = None,
        model_hash: str | None = None,
        read_only: bool = False,
    ) -> ItemIndex:
        """Load the saved index (or rebuild it from SQL, logging why), then catch up with SQL.

        ``read_only`` skips the writer lock and never saves (for extra replicas).
        """
        config = config or IndexConfig()
        check_gpu(config)
        if config.threads:
            faiss.omp_set_num_threads(config.threads)
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        lock = None if read_only else _WriterLock(path)
        try:
            self = cls(path, session_factory, embedding_model, dim, config, model_hash, lock)
            reason = self._load()
            if reason is not None:
                log.warning("rebuilding item index %s from SQL: %s", path, reason)
                self.rebuild()
            self.sync()
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return self

    def close(self) -> None:
        """Save if anything changed since the last save, and release the writer lock."""
        if self._lock is None:
            return
        try:
            if self._dirty:
                self.save()
        finally:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def kind(self) -> str:
        return index_kind(self._index)

    @property
    def high_water_mark(self) -> int:
        return self._mark[0]

    def stats(self) -> dict[str, Any]:
        nlist = None if self.kind == FLAT else faiss.extract_index_ivf(self._index).nlist
        return {
            "kind": self.kind,
            "ntotal": self.ntotal,
            "nlist": nlist,
            "nprobe": self.config.nprobe,
            "high_water_mark": self.high_water_mark,
            "embedding_model": self.embedding_model,
            "dim": self.dim,
            "dirty": self._dirty,
            "gpu": "trains the IVF quantizer; search runs on CPU" if self.config.use_gpu else "off",
        }

    # ---------------------------------------------------------------- search

    def search(
        self,
        vectors: Any,
        k: int,
        tenant: str | None = None,
        exclude_pks: Sequence[int] | np.ndarray = (),
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items by inner product for each query row: ``(pks, scores)``, both (n, k).

        Only public items and items of ``tenant`` are candidates, minus
        ``exclude_pks``; both filters run inside FAISS. Missing results are pk -1.
        Pass L2-normalised queries to get cosine scores.
        """
        queries = self._check_queries(vectors)
        if not 1 <= k <= MAX_K:
            raise InvalidInput(f"k={k} is out of range: allowed 1..{MAX_K}")
        try:
            exclude = np.unique(np.asarray(list(exclude_pks), dtype=np.int64))
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"exclude_pks must be integer item pks: {exc}") from None
        with self._rw.read():
            sel, _keepalive = self._selector(tenant, exclude)
            params = search_parameters(self._index, self.config.nprobe, sel)
            scores, pks = self._index.search(queries, k, params=params)
        return pks, scores

    def _check_queries(self, vectors: Any) -> np.ndarray:
        try:
            x = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(
                f"query vectors must be a numeric (n, {self.dim}) array: {exc}"
            ) from None
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InvalidInput(
                f"query vectors have shape {tuple(np.shape(vectors))}; the item index for "
                f"{self.embedding_model!r} expects ({self.dim},) or (n, {self.dim})"
            )
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if len(bad):
            raise InvalidInput(
                f"query vectors contain NaN or infinite values (rows {bad[:10].tolist()})"
            )
        return np.ascontiguousarray(x)

    def _selector(self, tenant: str | None, exclude: np.ndarray) -> tuple[Any, list[Any]]:
        """The IDSelector for this search, and every object FAISS points into (keep them alive)."""
        keep: list[Any] = []
        selectors: list[Any] = []
        if self._vis.visible_count(tenant) < self._index.ntotal:  # some items must stay hidden
            bitmap = self._vis.bitmap(tenant)
            selectors.append(faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)))
            keep.append(bitmap)
        if len(exclude):
            batch = faiss.IDSelectorBatch(len(exclude), faiss.swig_ptr(exclude))
            selectors.append(faiss.IDSelectorNot(batch))
            keep += [exclude, batch]
        keep += selectors
        if len(selectors) == 2:
            selectors = [faiss.IDSelectorAnd(selectors[0], selectors[1])]
            keep += selectors
        return (selectors[0] if selectors else None), keep

    # ---------------------------------------------------------------- catch-up

    def sync(self) -> int:
        """Apply every SQL change after the high-water mark; returns how many rows were applied.

        Rebuilds when the catalog has outgrown (or shrunk below) the index kind.
        """
        with self._mutex:
            applied = 0
            with self._session_factory() as session:
                while rows := changed_items_since(session, *self._mark):
                    self._apply(rows)
                    applied += len(rows)
            if reason := self._rebuild_reason():
                log.info("rebuilding item index %s: %s", self.directory, reason)
                self._rebuild_locked()
        if applied:
            log.debug("item index applied %d changes, mark=%d", applied, self.high_water_mark)
        return applied

    def _apply(self, rows: list[ItemRow]) -> None:
        pks = np.array([r.pk for r in rows], dtype=np.int64)
        adds = [(r, v) for r in rows if (v := self._vector(r)) is not None]
        with self._rw.write():
            self._remove(pks)
            for r in rows:
                self._vis.clear(r.pk)
            if adds:
                vectors = np.stack([v for _, v in adds])
                ids = np.array([r.pk for r, _ in adds], dtype=np.int64)
                self._index.add_with_ids(vectors, ids)
                for r, _ in adds:
                    self._vis.set(r.pk, r.tenant)
            self._mark = (rows[-1].change_seq, rows[-1].pk)
            self._dirty = True

    def _remove(self, pks: np.ndarray) -> None:
        if self.kind == FLAT:  # IndexIDMap tests membership per stored id: use a hash set
            self._index.remove_ids(faiss.IDSelectorBatch(len(pks), faiss.swig_ptr(pks)))
        else:  # IVF with a hashtable direct map removes exactly these ids
            self._index.remove_ids(faiss.IDSelectorArray(len(pks), faiss.swig_ptr(pks)))

    def _vector(self, row: ItemRow) -> np.ndarray | None:
        """The row's embedding if it belongs here; None if deleted, another model's, or bad."""
        if row.deleted or row.embedding is None or row.embedding_model != self.embedding_model:
            return None
        vec = np.frombuffer(row.embedding, dtype=np.float32)
        if vec.size != self.dim or not np.isfinite(vec).all():
            log.error(
                "item pk=%d: %s embedding has %d values (want %d) or is not finite; skipped",
                row.pk,
                self.embedding_model,
                vec.size,
                self.dim,
            )
            return None
        return vec

    # ---------------------------------------------------------------- rebuild

    def rebuild(self) -> None:
        """Rebuild the whole index from SQL (and save it, unless read-only)."""
        with self._mutex:
            self._rebuild_locked()

    def _rebuild_locked(self) -> None:
        started = time.perf_counter()
        with self._session_factory() as session:
            # The mark is read first: rows changed while we read are re-applied by catch-up.
            mark = max_change_seq(session)
            pks, tenants, vectors = self._read_live(session)
        kind = self._desired_kind(len(pks), None)
        index = build_index(vectors, pks, self.config, kind=kind)
        vis = Visibility()
        vis.set_many(pks, tenants)
        with self._rw.write():
            self._index, self._vis, self._mark = index, vis, (mark, _AFTER_ALL_PKS)
            self._trained_on = len(pks)
            self._dirty = True
        log.info(
            "item index %s rebuilt: %s, %d items, mark=%d, %.1fs",
            self.directory,
            kind,
            len(pks),
            mark,
            time.perf_counter() - started,
        )
        if not self.read_only:
            self._save_locked()

    def _read_live(self, session: Session) -> tuple[np.ndarray, list[str | None], np.ndarray]:
        pks: list[int] = []
        tenants: list[str | None] = []
        chunks: list[np.ndarray] = []
        for row in _live_rows(session, self.embedding_model):
            vec = self._vector(row)
            if vec is not None:
                pks.append(row.pk)
                tenants.append(row.tenant)
                chunks.append(vec)
        vectors = np.stack(chunks) if chunks else np.empty((0, self.dim), np.float32)
        return np.array(pks, dtype=np.int64), tenants, vectors

    def _desired_kind(self, n: int, current: str | None) -> str:
        if self.config.kind == FLAT or n < 39:  # IVF needs points to train on
            return FLAT
        if self.config.kind == IVF:
            return IVF
        if current == IVF:  # hysteresis: keep IVF until the catalog halves below the threshold
            return IVF if n >= self.config.flat_threshold // 2 else FLAT
        return IVF if n >= self.config.flat_threshold else FLAT

    def _rebuild_reason(self) -> str | None:
        want = self._desired_kind(self.ntotal, self.kind)
        if want != self.kind:
            return f"{self.ntotal} items call for a {want} index, not {self.kind}"
        if self.kind == IVF and self.ntotal > self.config.regrow_factor * max(self._trained_on, 1):
            return f"IVF trained on {self._trained_on} items now holds {self.ntotal}: retraining"
        return None

    # ---------------------------------------------------------------- persistence

    def save(self) -> None:
        """Write index and manifest atomically (searches continue meanwhile)."""
        if self.read_only:
            raise FailedPrecondition("this item index was opened read-only and cannot save")
        if self._lock is None:
            raise FailedPrecondition("this item index is closed; open it again to save")
        with self._mutex:
            self._save_locked()

    def _save_locked(self) -> None:
        name = f"items-{secrets.token_hex(6)}.faiss"
        path = self.directory / name
        with self._rw.read():
            _write_atomic(path, lambda tmp: faiss.write_index(self._index, str(tmp)))
            manifest = Manifest(
                embedding_model=self.embedding_model,
                model_hash=self.model_hash,
                dim=self.dim,
                index_type=self.kind,
                ntotal=self.ntotal,
                high_water_mark=self._mark[0],
                high_water_pk=self._mark[1],
                index_file=name,
                index_bytes=path.stat().st_size,
                trained_on=self._trained_on,
            )
        text = json.dumps(asdict(manifest), indent=2)
        _write_atomic(self.directory / MANIFEST, lambda tmp: tmp.write_text(text))
        self._dirty = False
        for stale in self.directory.glob("items-*.faiss*"):
            if stale.name != name:
                stale.unlink(missing_ok=True)

    def _load(self) -> str | None:
        """Load the saved index; return why it cannot be used (then we rebuild), or None."""
        manifest_path = self.directory / MANIFEST
        if not manifest_path.exists():
            return "no manifest (first start, or the index was deleted)"
        try:
            m = Manifest(**json.loads(manifest_path.read_text()))
        except (ValueError, TypeError) as exc:
            return f"manifest unreadable: {exc}"
        if m.format != MANIFEST_FORMAT:
            return f"manifest format {m.format}, this code writes {MANIFEST_FORMAT}"
        built = (m.embedding_model, m.model_hash, m.dim)
        wanted = (self.embedding_model, self.model_hash, self.dim)
        if built != wanted:
            return f"index built for (model, hash, dim)={built}, configured {wanted}"
        index, reason = self._read_index_file(m)
        if index is None:
            return reason
        with self._session_factory() as session:
            vis, orphans = _visibility_of(session, index_ids(index))
        self._index, self._vis, self._trained_on = index, vis, m.trained_on
        self._mark = (m.high_water_mark, m.high_water_pk)
        if len(orphans):  # rows deleted outright (not tombstoned) leave no change to catch up on
            log.warning(
                "item index: removing %d vectors with no live item row in SQL", len(orphans)
            )
            self._remove(orphans)
            self._dirty = True
        log.info(
            "item index %s loaded: %s, %d items, mark=%d",
            self.directory,
            m.index_type,
            self.ntotal,
            m.high_water_mark,
        )
        return None

    def _read_index_file(self, m: Manifest) -> tuple[faiss.Index | None, str]:
        path = self.directory / m.index_file
        if not path.exists():
            return None, f"index file {m.index_file} is missing"
        size = path.stat().st_size
        if size != m.index_bytes:
            return None, (
                f"index file {m.index_file} has {size} bytes, "
                f"the manifest says {m.index_bytes} (truncated?)"
            )
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            return None, f"index file {m.index_file} unreadable: {str(exc).splitlines()[0]}"
        if index.d != m.dim or index.ntotal != m.ntotal or index_kind(index) != m.index_type:
            return None, (
                f"index file holds {index_kind(index)} d={index.d} ntotal={index.ntotal}, "
                f"manifest says {m.index_type} d={m.dim} ntotal={m.ntotal}"
            )
        return index, ""


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
