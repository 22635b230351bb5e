"""IVF-PQ fast-scan for candidates, re-ranked exactly: the ``ivfpq`` index kind.

An IVF-Flat scans 2 KB per 512-d vector; on catalogs whose neighbours spread
over many lists (bench/RESULTS.md, ``manifold``: nprobe 64 of 1,789 lists for
recall 0.95 at 200k) that is several ms per query. PQ fast-scan codes (4 bits
per 4 dimensions: 64 B at 512-d) make the same scan ~30x cheaper; their
approximate scores pick ``rerank * k`` candidates, which are scored exactly
with the float vectors of an IVF-Flat on the same lists (found by id through
its hashtable direct map). So memory is the IVF-Flat's plus the codes.

Both halves share the IVF-Flat's centroids: the PQ half can be added to an
IVF-Flat already built (``from_ivf``) without a second k-means, which is how
``index_tuning.build_tuned`` tries it after IVF-Flat misses its scan bound.
Removal removes from both at once (deletion is deletion).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import faiss
import numpy as np

PQ_DIMS_PER_CODE = 4
"""512-d -> PQ128x4fs (64 B): at 200k manifold vectors it lost nothing after re-ranking 30 * k
candidates; PQ64x4fs (2 dims per bit) capped recall at 0.79 (bench/RESULTS.md)."""


@contextmanager
def one_thread() -> Iterator[None]:
    """FAISS on this thread only, for work too small to share: PQ training runs one tiny k-means
    per sub-quantizer, and with OpenMP threads each iteration waits at barriers (on a busy host
    106 s instead of 2.8 s, 16k x 512-d); a batch-1 search likewise. OpenMP keeps the thread
    count per calling thread, so other threads' searches are unaffected."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class RerankedIVF:
    """Quacks like the FAISS indexes ItemIndex uses (``ntotal``, ``d``, ``is_trained``,
    ``train``, ``add_with_ids``, ``remove_ids``, ``search``)."""

    def __init__(self, exact: Any, rerank: int, pq: Any = None) -> None:
        self.exact = exact  # IndexIVFFlat with a hashtable direct map: floats by id
        self.rerank = rerank
        self.pq = pq
        self.d = int(exact.d)

    @classmethod
    def from_ivf(
        cls, exact: Any, train_x: np.ndarray, rerank: int, vectors: Any = None, ids: Any = None
    ) -> RerankedIVF:
        """Add a PQ half to a trained (possibly filled) IVF-Flat: PQ trained on ``train_x``,
        codes added for ``vectors``/``ids`` (those already in ``exact``)."""
        self = cls(exact, rerank)
        self.pq = self._new_pq()
        with one_thread():
            self.pq.train(np.ascontiguousarray(train_x, dtype=np.float32))
        if vectors is not None:
            self.pq.add_with_ids(vectors, ids)
        return self

    def _new_pq(self) -> Any:
        ivf = faiss.extract_index_ivf(self.exact)
        quantizer = faiss.IndexFlatIP(self.d)
        quantizer.add(ivf.quantizer.reconstruct_n(0, ivf.nlist))  # the same lists as ``exact``
        m = max(1, self.d // PQ_DIMS_PER_CODE)
        while self.d % m:
            m -= 1
        pq = faiss.IndexIVFPQFastScan(
            quantizer, self.d, ivf.nlist, m, 4, faiss.METRIC_INNER_PRODUCT
        )
        pq.by_residual = True
        pq.own_fields = True
        quantizer.this.disown()  # owned by ``pq`` now
        return pq

    # ---------------------------------------------------------------- the index interface

    @property
    def ntotal(self) -> int:
        return int(self.exact.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.exact.is_trained) and self.pq is not None and bool(self.pq.is_trained)

    @property
    def nlist(self) -> int:
        return int(faiss.extract_index_ivf(self.exact).nlist)

    def train(self, x: np.ndarray) -> None:
        """k-means for the lists (unless trained), then the PQ codebooks on the same sample."""
        if not self.exact.is_trained:
            self.exact.train(x)
        self.pq = self._new_pq()
        with one_thread():
            self.pq.train(x)

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.exact.add_with_ids(x, ids)
        self.pq.add_with_ids(x, ids)

    def remove_ids(self, ids: np.ndarray) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        removed = self.exact.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids)))
        # Fast-scan lists have no hashtable: a scan of every id, so a hashed selector.
        self.pq.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids)))
        return int(removed)

    def search(
        self, x: np.ndarray, k: int, nprobe: int, sel: Any = None, exact: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by exact inner product among the PQ half's ``rerank * k`` best candidates;
        ``exact`` scans every (selected) float vector instead."""
        if exact:
            params = faiss.SearchParametersIVF(sel=sel, nprobe=self.nlist)
            return self.exact.search(x, k, params=params)
        wide = min(self.rerank * k, max(k, self.ntotal))
        _, cand = self.pq.search(x, wide, params=faiss.SearchParametersIVF(sel=sel, nprobe=nprobe))
        scores = np.full((len(x), k), -3.4028235e38, dtype=np.float32)
        ids = np.full((len(x), k), -1, dtype=np.int64)
        for i, row in enumerate(cand):
            row = row[row >= 0]
            if not len(row):
                continue
            exact_scores = self.exact.reconstruct_batch(row) @ x[i]
            top = np.lexsort((row, -exact_scores))[:k]  # ties by id: the same order at any nprobe
            scores[i, : len(top)] = exact_scores[top]
            ids[i, : len(top)] = row[top]
        return scores, ids

    def nbytes(self) -> int:
        ivf = faiss.extract_index_ivf(self.exact)
        flat = self.ntotal * (ivf.code_size + 8 + 16) + ivf.nlist * self.d * 4
        return int(flat + self.ntotal * (self.pq.code_size + 8) + ivf.nlist * self.d * 4)

    # persistence: one .npz of FAISS's own serialisation (no pickle)
    def write(self, path: str) -> None:
        with open(path, "wb") as f:
            np.savez(
                f,
                exact=faiss.serialize_index(self.exact),
                pq=faiss.serialize_index(self.pq),
                rerank=np.array([self.rerank]),
            )

    @classmethod
    def read(cls, path: str) -> RerankedIVF:
        with open(path, "rb") as f:
            data = np.load(io.BytesIO(f.read()), allow_pickle=False)
        exact = faiss.deserialize_index(data["exact"])
        return cls(exact, int(data["rerank"][0]), faiss.deserialize_index(data["pq"]))
