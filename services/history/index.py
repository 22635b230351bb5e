"""The item index: a FAISS index of item embeddings, derived from SQL.

SQL (``items``) is the source of truth; this index is a cache of it that can
always be rebuilt. The contract (DESIGN.md, "Storage"):

* **IDs** are ``Item.pk``. Updates remove then add; tombstoned items
  (``deleted``) are removed, so they are really gone: flat, IVF and IVF-PQ drop
  the vectors at once; HNSW (which cannot remove from its graph) hides them inside
  the search at once and drops them at the next compaction, at most
  ``IndexConfig.compact_after`` hidden vectors (or ``compact_max_age_s``) later.
* **Single writer**: an exclusive ``fcntl`` lock on ``<dir>/index.lock``. A
  second writer gets ``FailedPrecondition`` naming the holder.
* **Atomic save**: the index goes to a temp file, is fsynced and renamed to a
  fresh name; then ``manifest.json`` is written the same way and the directory
  fsynced. The manifest is the commit point: a crash anywhere leaves either the
  old or the new (index, manifest) pair. It records the SQL high-water mark (the
  largest ``change_seq`` applied), the embedding model and its hash, dim,
  index kind, ntotal, the index file's **sha256**, the tuned search effort and
  the last recall measurement.
* **Catch-up**: ``open()`` applies every row with ``change_seq`` above the mark,
  so rows committed after the last save (or before a crash) are never lost.
  Applying a row is idempotent (remove, then add its current state).
* **Rebuild**: a missing, truncated, corrupt (sha256 mismatch) or foreign (other
  model / dim / format) index is rebuilt from SQL at open, with the reason logged.
  Rebuilds that ``sync`` finds due (growth, kind change, HNSW compaction) and
  recall re-measurements run on a maintenance thread (``index_maintenance``):
  built without locks, caught up with SQL from their snapshot's mark under the
  mutex, then swapped in; the upsert that triggered them does not wait.
* **Recall on the catalog** (``index_tuning``): at build and after
  ``remeasure_fraction`` of the catalog changed, held-out items are searched and
  compared with brute force; the smallest effort meeting ``target_recall`` is
  served, and a catalog below target is flagged (log + ``stats()``).
* **Tenant isolation inside the search**: a FAISS ``IDSelector`` (a bitmap
  over pks of public items plus that tenant's items, kept in memory) is passed
  in the search parameters, so other tenants' items are never candidates; the
  user's exclude list is a second selector combined with it. Every kind
  (flat, IVF, IVF-PQ, HNSW) takes the same selectors.

Ordering assumption: writers allocate ``change_seq`` from the ``items`` counter
under a row lock held until commit (``store.db.next_counter``), so sequence
numbers become visible in increasing order and a reader never skips one.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self

import faiss
import numpy as np
from pigment.models.loader import (
    sha256_file,  # one file hash for weights and the index (torch-free)
)
from pigment.services.common.errors import FailedPrecondition, InvalidInput
from pigment.services.history.index_factory import (  # noqa: F401  (re-exported)
    FLAT,
    HNSW,
    IVF,
    IVFPQ,
    IndexConfig,
    build_index,
    check_gpu,
    choose_kind,
    default_nlist,
    effort_name,
    index_ids,
    index_kind,
    index_nbytes,
    new_index,
    nlist_of,
    read_index,
    remove_ids,
    search_parameters,
    write_index,
)
from pigment.services.history.index_factory import search as index_search
from pigment.services.history.index_files import (
    MANIFEST,
    MANIFEST_FORMAT,
    Manifest,
    WriterLock,
    write_atomic,
)
from pigment.services.history.index_maintenance import Maintenance
from pigment.services.history.index_pq import one_thread
from pigment.services.history.index_rows import (  # noqa: F401  (re-exported)
    PAGE_ROWS,
    ItemRow,
    Visibility,
    _live_rows,
    _visibility_of,
    changed_items_since,
    max_change_seq,
)
from pigment.services.history.index_tuning import (
    RecallReport,
    Sample,
    build_tuned,
    cheap_enough,
    draw_sample,
    tune,
    warn_if_below,
)
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

MAX_K = 1000
# Above any Item.pk (INTEGER in SQL); must fit the column type on PostgreSQL.
_AFTER_ALL_PKS = 2**31 - 1


# --------------------------------------------------------------------------- locks


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


# --------------------------------------------------------------------------- the index


@dataclass
class _Built:
    """An index built from SQL, not yet serving."""

    index: Any
    vis: Visibility
    mark: tuple[int, int]
    trained_on: int
    report: RecallReport | None
    started: float


class ItemIndex:
    """Item embeddings of one embedding model, searchable by inner product, kept in step with SQL.

    Use :meth:`open`; then :meth:`sync` after SQL writes, :meth:`search`,
    :meth:`save` now and then, :meth:`close` at shutdown (it saves).
    """

    def __init__(
        self,
        directory: Path,
        session_factory: Callable[[], Session],
        embedding_model: str,
        dim: int,
        config: IndexConfig,
        model_hash: str | None,
        lock: WriterLock | None,
    ) -> None:
        self.directory = directory
        self.embedding_model = embedding_model
        self.model_hash = model_hash
        self.dim = dim
        self.config = config
        self._session_factory = session_factory
        self._lock = lock
        self.read_only = lock is None
        self._index: Any = new_index(FLAT, dim, 0, config)
        self._vis = Visibility()
        self._mark = (0, -1)  # (change_seq, pk) of the last applied row
        self._trained_on = 0
        self._effort: int | None = None  # nprobe / efSearch served
        self._report: RecallReport | None = None
        self._changed_since_measure = 0
        self._sha256: str | None = None
        self._dirty = False
        self._rw = _RWLock()
        self._mutex = threading.Lock()  # one mutation (sync / rebuild / save) at a time
        self._maintenance = Maintenance(self._maintain)
        self._rebuild_wanted: str | None = None

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
        lock = None if read_only else WriterLock(path)
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
        """Save if anything changed since the last save, and release the writer lock.

        The stack calls this when the server stops, so manifest and SQL agree after a clean stop.
        """
        self._maintenance.stop()
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

    @property
    def search_effort(self) -> int | None:
        """nprobe (IVF) or efSearch (HNSW) being served; None for flat."""
        return self._effort

    @property
    def recall_report(self) -> RecallReport | None:
        """The last recall measurement on the catalog (None: nothing measured yet)."""
        return self._report

    def measured_recall(self) -> float | None:
        """Recall@10 of the serving parameters on held-out catalog items (for a metric gauge)."""
        return None if self._report is None else self._report.recall_at_10

    @property
    def recall_below_target(self) -> bool:
        return self._report is not None and not self._report.meets_target

    def stats(self) -> dict[str, Any]:
        nlist = nlist_of(self._index)
        pending = self._index.pending if self.kind == HNSW else 0
        return {
            "kind": self.kind,
            "ntotal": self.ntotal,
            "nlist": nlist,
            "search_effort": {"name": effort_name(self.kind), "value": self._effort},
            "target_recall": self.config.target_recall,
            "recall_at_10": self.measured_recall(),
            "recall_below_target": self.recall_below_target,
            "recall": self._report.as_dict() if self._report is not None else None,
            "changed_since_measure": self._changed_since_measure,
            "pending_compaction": pending,
            "compact_after": self.config.compact_after if self.kind == HNSW else None,
            "memory_bytes": index_nbytes(self._index),
            "high_water_mark": self.high_water_mark,
            "embedding_model": self.embedding_model,
            "dim": self.dim,
            "index_sha256": self._sha256,
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
            visible = self._vis.visible_count(tenant) - len(exclude)
            exact = sel is not None and visible < self.config.filtered_exact_below * self.ntotal
            if len(queries) == 1:  # too small to share between threads (index_pq.one_thread)
                with one_thread():
                    scores, pks = index_search(self._index, queries, k, self._effort, sel, exact)
            else:
                scores, pks = index_search(self._index, queries, k, self._effort, sel, exact)
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

        A rebuild (the catalog outgrew or shrank below the index kind; an HNSW graph is due for
        compaction) or a recall re-measurement after large changes is handed to the maintenance
        thread (``IndexConfig.background_maintenance``, the default): the caller (an upsert, a
        GDPR delete) never waits for it. Removals are applied here, at once, whatever the kind.
        """
        with self._mutex:
            applied = 0
            with self._session_factory() as session:
                while rows := changed_items_since(session, *self._mark):
                    self._apply(rows)
                    applied += len(rows)
            self._changed_since_measure += applied
            reason = self._rebuild_reason()
            due = reason is not None or self._remeasure_due()
            if due and self.config.background_maintenance and not self.read_only:
                self._maintenance.request(reason or "recall re-measurement")
            elif reason:
                log.info("rebuilding item index %s: %s", self.directory, reason)
                self._rebuild_locked()
            elif due:
                self._remeasure_locked()
        if applied:
            log.debug("item index applied %d changes, mark=%d", applied, self.high_water_mark)
        return applied

    def _apply(self, rows: list[ItemRow]) -> None:
        with self._rw.write():
            self._apply_to(self._index, self._vis, rows)
            self._mark = (rows[-1].change_seq, rows[-1].pk)
            self._dirty = True

    def _apply_to(self, index: Any, vis: Visibility, rows: list[ItemRow]) -> None:
        pks = np.array([r.pk for r in rows], dtype=np.int64)
        adds = [(r, v) for r in rows if (v := self._vector(r)) is not None]
        remove_ids(index, pks)
        for r in rows:
            vis.clear(r.pk)
        if adds:
            vectors = np.stack([v for _, v in adds])
            ids = np.array([r.pk for r, _ in adds], dtype=np.int64)
            index.add_with_ids(vectors, ids)
            for r, _ in adds:
                vis.set(r.pk, r.tenant)

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

    # ---------------------------------------------------------------- rebuild & tuning

    def rebuild(self) -> None:
        """Rebuild the whole index from SQL, measure and tune it (and save, unless read-only)."""
        with self._mutex:
            self._rebuild_locked()

    def measure(self) -> RecallReport | None:
        """Measure recall on the catalog now and re-tune the search effort (``pigment index measure``)."""
        with self._mutex:
            self._remeasure_locked()
        return self._report

    def _rebuild_locked(self) -> None:
        self._install(self._build_from_sql())

    def _build_from_sql(self) -> _Built:
        """A new index of SQL's live items, measured and tuned; touches nothing being served,
        so the maintenance thread runs it without any lock."""
        started = time.perf_counter()
        with self._session_factory() as session:
            # The mark is read first: rows changed while we read are re-applied by catch-up.
            mark = max_change_seq(session)
            pks, tenants, vectors = self._read_live(session)
        kind = self._desired_kind(len(pks), None)
        sample = draw_sample(vectors, pks, self.config.recall_sample, self.config.seed)
        index, report, _ = build_tuned(vectors, pks, self.config, kind, sample)
        vis = Visibility()
        vis.set_many(pks, tenants)
        return _Built(index, vis, (mark, _AFTER_ALL_PKS), len(pks), report, started)

    def _install(self, built: _Built) -> None:
        """Serve ``built`` (caller holds the mutex) after catching it up with SQL: a row changed
        since its snapshot (a GDPR delete among them) is applied before it serves a search."""
        with self._session_factory() as session:
            while rows := changed_items_since(session, *built.mark):
                self._apply_to(built.index, built.vis, rows)
                built.mark = (rows[-1].change_seq, rows[-1].pk)
        with self._rw.write():
            self._index, self._vis, self._mark = built.index, built.vis, built.mark
            self._trained_on = built.trained_on
            self._set_report(built.report)
            self._dirty = True
        log.info(
            "item index %s rebuilt: %s, %d items, mark=%d, %.1fs, %s",
            self.directory,
            self.kind,
            self.ntotal,
            built.mark[0],
            time.perf_counter() - built.started,
            _describe(built.report),
        )
        warn_if_below(built.report, str(self.directory))
        if not self.read_only:
            self._save_locked()

    def _maintain(self, why: str) -> None:
        """The maintenance thread's work: a rebuild built off every lock (syncs and searches go
        on meanwhile), installed under the mutex; or a re-measurement."""
        with self._mutex:
            reason = self._rebuild_reason()
            if reason is None and not self._remeasure_due():
                return  # a rebuild in between already did it
            kind = self.kind
        if reason is None and kind != HNSW:  # HNSW is re-measured by a rebuild
            sample = self._remeasure_sample()  # reads SQL: no lock held
            with self._mutex:
                self._remeasure_locked(rebuild_in_place=False, sample=sample)
                reason, self._rebuild_wanted = self._rebuild_wanted, None
            if reason is None:
                return
        reason = reason or "HNSW recall re-measurement"
        log.info("rebuilding item index %s in the background: %s", self.directory, reason)
        built = self._build_from_sql()
        with self._mutex:
            self._install(built)

    def wait_for_maintenance(self, timeout: float | None = None) -> bool:
        """Block until no rebuild or re-measurement is pending or running (tests, ``pigment``
        CLI); False if ``timeout`` passed first."""
        return self._maintenance.wait_idle(timeout)

    def _set_report(self, report: RecallReport | None) -> None:
        self._report = report
        self._effort = report.effort if report is not None else None
        self._changed_since_measure = 0

    def _remeasure_due(self) -> bool:
        if self.kind == FLAT:  # exact: nothing to tune
            return False
        base = self._report.ntotal if self._report is not None else 0
        return self._changed_since_measure > self.config.remeasure_fraction * max(base, 1)

    def _remeasure_locked(
        self, rebuild_in_place: bool = True, sample: Sample | None = None
    ) -> None:
        """Measure on SQL's live vectors (the truth), re-tune the effort; auto may switch kind.

        HNSW is rebuilt instead: its sample must be held out of the graph to be measured
        honestly. IVF is measured in place (a query's own vector sits in one of its lists,
        which changes little).
        """
        if self.kind == HNSW:
            log.info("item index %s: re-measuring HNSW recall by a rebuild", self.directory)
            self._rebuild_later_or_now("HNSW recall re-measurement", rebuild_in_place)
            return
        sample = sample or self._remeasure_sample()
        with self._rw.read():
            report = tune(self._index, sample, self.config)
        if (
            self.config.kind == "auto"
            and report is not None
            and report.kind in (IVF, IVFPQ)
            and not cheap_enough(report, self._index, self.config)
        ):
            log.info(
                "item index %s: %s no longer meets the target cheaply: rebuilding",
                self.directory,
                report.kind,
            )
            self._rebuild_later_or_now(f"{report.kind} misses the target cheaply", rebuild_in_place)
            return
        with self._rw.write():
            self._set_report(report)
            self._dirty = True
        log.info("item index %s re-measured: %s", self.directory, _describe(report))
        warn_if_below(report, str(self.directory))

    def _remeasure_sample(self) -> Sample | None:
        """Catalog items from SQL (the truth) as queries, with exact neighbours."""
        with self._session_factory() as session:
            pks, _, vectors = self._read_live(session)
        return draw_sample(
            vectors, pks, self.config.recall_sample, self.config.seed + 1, held_out=False
        )

    def _rebuild_later_or_now(self, reason: str, now: bool) -> None:
        if now:
            self._rebuild_locked()
        else:  # the maintenance thread builds it once it has let go of the mutex
            self._rebuild_wanted = reason

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
        """By size and config; ``auto`` above the threshold starts at IVF (measurement may pick HNSW)."""
        if self.config.kind == HNSW:
            return HNSW
        if self.config.kind == FLAT or n < 39:  # IVF needs points to train on
            return FLAT
        if self.config.kind in (IVF, IVFPQ):
            return self.config.kind
        # Hysteresis: keep the kind until the catalog halves below the threshold.
        if current in (IVF, IVFPQ, HNSW):
            return current if n >= self.config.flat_threshold // 2 else FLAT
        return IVF if n >= self.config.flat_threshold else FLAT

    def _rebuild_reason(self) -> str | None:
        want = self._desired_kind(self.ntotal, self.kind)
        if want != self.kind:
            return f"{self.ntotal} items call for a {want} index, not {self.kind}"
        grown = self.ntotal > self.config.regrow_factor * max(self._trained_on, 1)
        if self.kind in (IVF, IVFPQ) and grown:
            return f"{self.kind} trained on {self._trained_on} items now holds {self.ntotal}: retraining"
        if self.kind == HNSW:
            pending, since = self._index.pending, self._index.hidden_since
            if pending >= self.config.compact_after:
                return f"compaction: {pending} hidden or superseded HNSW vectors (bound {self.config.compact_after})"
            if since is not None and time.time() - since > self.config.compact_max_age_s:
                return f"compaction: hidden HNSW vectors older than {self.config.compact_max_age_s:.0f}s"
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
            write_atomic(path, lambda tmp: write_index(self._index, str(tmp)))
            digest = sha256_file(path)
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
                index_sha256=digest,
                trained_on=self._trained_on,
                nlist=nlist_of(self._index),
                search_effort=self._effort,
                recall=self._report.as_dict() if self._report is not None else None,
            )
        text = json.dumps(asdict(manifest), indent=2)
        write_atomic(self.directory / MANIFEST, lambda tmp: tmp.write_text(text))
        self._sha256 = digest
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
            raw = json.loads(manifest_path.read_text())
            if raw.get("format") != MANIFEST_FORMAT:
                return f"manifest format {raw.get('format')}, this code writes {MANIFEST_FORMAT}"
            m = Manifest(**raw)
        except (ValueError, TypeError, AttributeError) as exc:
            return f"manifest unreadable: {exc}"
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
        self._sha256 = m.index_sha256
        self._report = RecallReport(**m.recall) if m.recall else None
        self._effort = m.search_effort
        if len(orphans):  # rows deleted outright (not tombstoned) leave no change to catch up on
            log.warning(
                "item index: removing %d vectors with no live item row in SQL", len(orphans)
            )
            remove_ids(self._index, orphans)
            self._dirty = True
        log.info(
            "item index %s loaded: %s, %d items, mark=%d, %s",
            self.directory,
            m.index_type,
            self.ntotal,
            m.high_water_mark,
            _describe(self._report),
        )
        warn_if_below(self._report, str(self.directory))
        return None

    def _read_index_file(self, m: Manifest) -> tuple[Any, str]:
        path = self.directory / m.index_file
        if not path.exists():
            return None, f"index file {m.index_file} is missing"
        size = path.stat().st_size
        if size != m.index_bytes:
            return None, (
                f"index file {m.index_file} has {size} bytes, "
                f"the manifest says {m.index_bytes} (truncated?)"
            )
        digest = sha256_file(path)
        if digest != m.index_sha256:
            # Loud: same size, other bytes means corruption in place (disk, copy, tampering).
            log.error(
                "item index file %s is CORRUPT: sha256 %s, the manifest says %s; "
                "it will not be served (rebuilding from SQL)",
                path,
                digest,
                m.index_sha256,
            )
            return None, f"index file {m.index_file} fails its sha256 check (corrupt in place)"
        try:
            index = read_index(str(path), m.index_type)
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            return None, f"index file {m.index_file} unreadable: {str(exc).splitlines()[0]}"
        if index.d != m.dim or index.ntotal != m.ntotal or index_kind(index) != m.index_type:
            return None, (
                f"index file holds {index_kind(index)} d={index.d} ntotal={index.ntotal}, "
                f"manifest says {m.index_type} d={m.dim} ntotal={m.ntotal}"
            )
        return index, ""


def _describe(report: RecallReport | None) -> str:
    if report is None:
        return "recall not measured (empty catalog)"
    return (
        f"recall@10 {report.recall_at_10:.3f} at {report.effort_name or 'exact'}="
        f"{report.effort} on {report.sample} held-out items (target {report.target:.2f}), "
        f"p50 {report.p50_ms:.2f} ms"
    )
