"""Index kinds behind one interface: config, construction, search parameters.

Four kinds, chosen by catalog size and by what a recall measurement on the
catalog shows (``index_tuning``):

* ``flat``: exact inner-product search (``IndexIDMap(IndexFlatIP)``).
* ``ivf``: inverted lists, the search effort is ``nprobe``.
* ``ivfpq``: the same lists scanned as PQ fast-scan codes, the best
  ``rerank * k`` re-ranked exactly (:class:`~index_pq.RerankedIVF`); effort ``nprobe``.
* ``hnsw``: a graph (:class:`GraphIndex`), the search effort is ``efSearch``.
  FAISS cannot remove vectors from an HNSW graph, so removed ids are hidden by
  a bitmap inside the search at once, updated vectors live in a small exact
  side index, and a compaction (rebuild) removes them physically after a
  bounded number of changes (``IndexConfig.compact_after``).

The benchmark (bench/retrieval.py) builds through these functions, so it
measures exactly what production runs.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
from pigment.services.common.errors import InvalidInput, ModelNotReady
from pigment.services.history.index_pq import RerankedIVF

FLAT, IVF, IVFPQ, HNSW = "flat", "ivf", "ivfpq", "hnsw"
KINDS = (FLAT, IVF, IVFPQ, HNSW)
ADD_CHUNK = 100_000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexConfig:
    """How the item index is built, searched and tuned."""

    kind: str = "auto"
    """``auto`` (flat below ``flat_threshold``; above, the first of IVF, IVF-PQ re-ranked and HNSW
    whose measured recall meets the target within its scan bound / the build budget), or a fixed
    ``flat``, ``ivf``, ``ivfpq`` or ``hnsw``."""
    flat_threshold: int = 50_000
    """Catalog size from which ``auto`` builds an approximate index instead of exact search."""
    target_recall: float = 0.95
    """Recall@10 the tuner must reach on the catalog's own sample (settings: retrieval_target_recall)."""
    tune_margin: float = 0.01
    """The tuner aims this far above ``target_recall`` (about 2 standard errors of a 200-query
    sample), so that recall on queries outside the sample still meets the target."""
    nlist: int | None = None
    """IVF lists; default about sqrt(n) (at most n/39, so k-means has enough points)."""
    nprobe: int | None = None
    """IVF lists scanned per query; None: the smallest meeting ``target_recall`` (tuned)."""
    ef_search: int | None = None
    """HNSW candidate list per query; None: the smallest meeting ``target_recall`` (tuned)."""
    max_scan: int = 6_000
    """``auto`` keeps IVF only if nprobe * (vectors per list) stays within this (about 2 ms at
    512-d on 2 cores); beyond it IVF-PQ, then HNSW, are tried."""
    max_scan_codes: int = 60_000
    """The same bound for ``ivfpq``, counted in PQ codes (64 B at 512-d, ~1/30 the cost of a
    float vector) plus the ``rerank * k`` exact scores."""
    rerank: int = 30
    """``ivfpq`` re-ranks this many candidates per result exactly (k=10: 300 float vectors)."""
    build_budget_s: float = 1200.0
    """``auto`` skips HNSW when a timed build of ``hnsw_probe`` items projects the full graph past
    what is left of this budget (issue 22: build under 20 min); the best measured index stays."""
    hnsw_probe: int = 20_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    """40 left clusters of 50 unlinked at 200k-1M (bench/RESULTS.md: efSearch 658 for 0.95 at
    200k, 0.61 at 1M); 80 gave 0.989 at efSearch 64 at 200k (issue 22). Build time ~2x."""
    filtered_exact_below: float = 0.05
    """A filter (tenant, seen items) leaving fewer than this fraction of the catalog visible is
    searched exactly over the visible items: a graph or a few IVF lists hold too few of them."""
    compact_after: int = 10_000
    """HNSW: hidden (removed or superseded) + side-index vectors that trigger a compaction."""
    compact_max_age_s: float = 24 * 3600.0
    """HNSW: a compaction also runs at the first sync after the oldest hidden vector is this old."""
    background_maintenance: bool = True
    """``ItemIndex.sync`` hands rebuilds (retraining, compaction) and recall re-measurements to a
    background thread instead of running them inside the upsert that triggered them."""
    recall_sample: int = 200
    """Catalog items held out as queries when measuring recall."""
    remeasure_fraction: float = 0.1
    """Re-measure recall (and re-tune) once this fraction of the catalog changed since the last."""
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
        if self.kind not in ("auto", *KINDS):
            raise InvalidInput(
                f"index kind={self.kind!r}: allowed 'auto', 'flat', 'ivf', 'ivfpq', 'hnsw'"
            )
        if self.ivf_codec not in ("Flat", "SQfp16", "SQ8"):
            raise InvalidInput(f"ivf_codec={self.ivf_codec!r}: allowed 'Flat', 'SQfp16', 'SQ8'")
        if (self.nprobe is not None and self.nprobe < 1) or self.flat_threshold < 1:
            raise InvalidInput("nprobe and flat_threshold must be >= 1")
        if not 0.0 < self.target_recall <= 1.0:
            raise InvalidInput(f"target_recall={self.target_recall}: allowed (0, 1]")
        if self.compact_after < 1 or self.recall_sample < 1 or self.rerank < 1:
            raise InvalidInput("compact_after, recall_sample and rerank must be >= 1")


def size_kind(n: int, config: IndexConfig) -> str:
    """The kind by size alone (``auto`` above the threshold starts with IVF, the cheap build)."""
    if config.kind != "auto":
        return config.kind
    return IVF if n >= config.flat_threshold else FLAT


choose_kind = size_kind  # the name bench scripts used


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


# --------------------------------------------------------------------------- HNSW


def _grown(bits: np.ndarray, pk: int) -> np.ndarray:
    if pk < len(bits):
        return bits
    out = np.zeros(max(pk + 1, 2 * len(bits)), dtype=bool)
    out[: len(bits)] = bits
    return out


class GraphIndex:
    """An HNSW graph plus what makes removal honest: a bitmap of hidden graph ids and an exact
    side index for vectors whose id the graph already holds (updates).

    Quacks like the FAISS indexes ItemIndex uses (``ntotal``, ``d``, ``add_with_ids``,
    ``remove_ids``, ``search``); ``ntotal`` counts live vectors only.
    """

    def __init__(self, d: int, m: int = 32, ef_construction: int = 40) -> None:
        hnsw = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = ef_construction
        self.graph = faiss.IndexIDMap(hnsw)
        self.side = faiss.IndexIDMap(faiss.IndexFlatIP(d))
        self.d = d
        self.in_graph = np.zeros(1024, dtype=bool)
        self.hidden = np.zeros(1024, dtype=bool)
        self.n_hidden = 0
        self.hidden_since: float | None = None  # time of the oldest hidden vector
        self.is_trained = True
        self._hidden_bits: np.ndarray | None = None  # packed ~hidden, cached between changes

    @property
    def ntotal(self) -> int:
        return int(self.graph.ntotal) - self.n_hidden + int(self.side.ntotal)

    @property
    def pending(self) -> int:
        """Vectors a compaction would clean up: hidden in the graph, or kept in the side index."""
        return self.n_hidden + int(self.side.ntotal)

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids):
            self.in_graph = _grown(self.in_graph, int(ids.max()))
            self.hidden = _grown(self.hidden, int(ids.max()))
        fresh = ~self.in_graph[ids]
        if fresh.any():
            self.graph.add_with_ids(
                np.ascontiguousarray(x[fresh]), np.ascontiguousarray(ids[fresh])
            )
            self.in_graph[ids[fresh]] = True
        if (~fresh).any():  # the graph holds an old vector under this id: it stays hidden
            self.side.add_with_ids(
                np.ascontiguousarray(x[~fresh]), np.ascontiguousarray(ids[~fresh])
            )

    def remove_ids(self, sel: Any, ids: np.ndarray | None = None) -> int:
        """Remove ``ids`` (the selector is accepted for FAISS's signature; ids are what counts)."""
        if ids is None:
            raise InvalidInput("GraphIndex.remove_ids needs the id array")
        ids = np.asarray(ids, dtype=np.int64)
        removed = int(self.side.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))))
        ids = ids[ids < len(self.in_graph)]
        newly = ids[self.in_graph[ids] & ~self.hidden[ids]]
        if len(newly):
            self.hidden[newly] = True
            self._hidden_bits = None
            self.n_hidden += len(np.unique(newly))
            self.hidden_since = self.hidden_since or time.time()
        return removed + len(newly)

    def search(
        self,
        x: np.ndarray,
        k: int,
        params: Any = None,
        ef_search: int = 64,
        sel: Any = None,
        exact: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over live vectors; ``exact`` scans the stored vectors instead of the graph
        (for selective filters, which strand a graph search among hidden nodes)."""
        keep: list[Any] = []
        graph_sel: Any = None
        if self.n_hidden:
            if self._hidden_bits is None:
                self._hidden_bits = np.packbits(~self.hidden, bitorder="little")
            bitmap = self._hidden_bits
            graph_sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
            keep += [bitmap, graph_sel]
        if sel is not None:
            graph_sel = sel if graph_sel is None else faiss.IDSelectorAnd(sel, graph_sel)
            keep.append(graph_sel)
        if exact:
            storage = faiss.downcast_index(self.graph.index).storage
            id_map = faiss.vector_to_array(self.graph.id_map)
            translated = (
                faiss.IDSelectorTranslated(self.graph.id_map, graph_sel) if graph_sel else None
            )
            scores, rows = storage.search(x, k, params=faiss.SearchParameters(sel=translated))
            ids = np.where(rows >= 0, id_map[np.maximum(rows, 0)], -1)
        else:
            # efSearch below k would return fewer than k candidates.
            gp = faiss.SearchParametersHNSW(sel=graph_sel, efSearch=max(ef_search, k))
            scores, ids = self.graph.search(x, k, params=gp)
        if not self.side.ntotal:
            return scores, ids
        s2, i2 = self.side.search(x, k, params=faiss.SearchParameters(sel=sel))
        scores, ids = np.hstack([scores, s2]), np.hstack([ids, i2])
        scores = np.where(ids < 0, -np.inf, scores)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        ids = np.take_along_axis(ids, order, axis=1)
        scores = np.take_along_axis(scores, order, axis=1)
        return np.where(ids < 0, -3.4028235e38, scores).astype(np.float32), ids

    def ids(self) -> np.ndarray:
        graph_ids = faiss.vector_to_array(self.graph.id_map).astype(np.int64)
        live = graph_ids[~self.hidden[graph_ids]]
        return np.concatenate([live, faiss.vector_to_array(self.side.id_map).astype(np.int64)])

    def nbytes(self) -> int:
        n = int(self.graph.ntotal)
        m = faiss.downcast_index(self.graph.index).hnsw.nb_neighbors(0)
        return n * (self.d * 4 + 8 + m * 4 * 1.1) + int(self.side.ntotal) * (self.d * 4 + 8)

    # persistence: one .npz of FAISS's own serialisation (no pickle)
    def write(self, path: str) -> None:
        with open(path, "wb") as f:
            np.savez(
                f,
                graph=faiss.serialize_index(self.graph),
                side=faiss.serialize_index(self.side),
                hidden=np.flatnonzero(self.hidden).astype(np.int64),
                hidden_since=np.array([self.hidden_since or 0.0]),
            )

    @classmethod
    def read(cls, path: str) -> GraphIndex:
        with open(path, "rb") as f:
            data = np.load(io.BytesIO(f.read()), allow_pickle=False)
        self = cls.__new__(cls)
        self.graph = faiss.deserialize_index(data["graph"])
        self.side = faiss.deserialize_index(data["side"])
        self.d, self.is_trained = self.graph.d, True
        graph_ids = faiss.vector_to_array(self.graph.id_map).astype(np.int64)
        top = int(max(graph_ids.max(initial=0), data["hidden"].max(initial=0))) + 1
        self.in_graph = np.zeros(max(1024, top), dtype=bool)
        self.in_graph[graph_ids] = True
        self.hidden = np.zeros_like(self.in_graph)
        self.hidden[data["hidden"]] = True
        self.n_hidden = int(self.hidden.sum())
        self.hidden_since = float(data["hidden_since"][0]) or None
        self._hidden_bits = None
        return self


# --------------------------------------------------------------------------- construction


def new_index(kind: str, dim: int, n: int, config: IndexConfig) -> Any:
    """An empty index of ``kind`` for about ``n`` vectors; ids are external (Item.pk)."""
    if kind == FLAT:
        return faiss.IndexIDMap(faiss.IndexFlatIP(dim))
    if kind == HNSW:
        return GraphIndex(dim, config.hnsw_m, config.hnsw_ef_construction)
    if kind == IVFPQ:  # the float half is a plain IVF-Flat (its vectors re-rank exactly)
        return RerankedIVF(new_ivf(dim, n, config, "Flat"), config.rerank)
    return new_ivf(dim, n, config, config.ivf_codec)


def new_ivf(dim: int, n: int, config: IndexConfig, codec: str) -> Any:
    nlist = default_nlist(n, config)
    index = faiss.index_factory(dim, f"IVF{nlist},{codec}", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.spherical = True  # unit vectors: centroids on the sphere suit inner product
    ivf.cp.niter = config.kmeans_iters
    ivf.cp.max_points_per_centroid = config.train_points_per_list
    ivf.cp.seed = config.seed
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # remove_ids in O(removed), not O(ntotal)
    ivf.nprobe = config.nprobe or 1
    return index


def train_index(
    index: Any, vectors: np.ndarray, config: IndexConfig, rows: np.ndarray | None = None
) -> None:
    """Train an IVF index on a seeded subsample of ``rows`` (default all; no-op for flat, HNSW)."""
    if index.is_trained:
        return
    ivf = faiss.extract_index_ivf(index.exact if isinstance(index, RerankedIVF) else index)
    rows = train_rows(len(vectors), ivf.nlist, config, rows)
    gpu_keepalive = _gpu_clustering_index(ivf, config)
    index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
    ivf.clustering_index = None
    del gpu_keepalive


def train_rows(
    n: int, nlist: int, config: IndexConfig, rows: np.ndarray | None = None
) -> np.ndarray:
    """A seeded subsample of ``rows`` (default all n), ``train_points_per_list`` per list."""
    rows = np.arange(n) if rows is None else rows
    want = nlist * config.train_points_per_list
    if len(rows) > want:
        rows = np.sort(np.random.default_rng(config.seed).choice(rows, want, replace=False))
    return rows


def add_pq(
    ivf: Any, vectors: np.ndarray, ids: np.ndarray, config: IndexConfig, rows: np.ndarray
) -> RerankedIVF:
    """An ``ivfpq`` index from an IVF-Flat already built over ``vectors[rows]`` (no new k-means)."""
    train = train_rows(len(vectors), int(faiss.extract_index_ivf(ivf).nlist), config, rows)
    index = RerankedIVF.from_ivf(ivf, vectors[train], config.rerank)
    for start in range(0, len(rows), ADD_CHUNK):
        chunk = rows[start : start + ADD_CHUNK]
        index.pq.add_with_ids(
            np.ascontiguousarray(vectors[chunk], dtype=np.float32),
            np.ascontiguousarray(ids[chunk], dtype=np.int64),
        )
    return index


def _gpu_clustering_index(ivf: Any, config: IndexConfig) -> Any:
    if not config.use_gpu:
        return None
    check_gpu(config)
    res = faiss.StandardGpuResources()
    ivf.clustering_index = faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatIP(ivf.d))
    return res, ivf.clustering_index


def build_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    config: IndexConfig,
    kind: str | None = None,
    rows: np.ndarray | None = None,
) -> Any:
    """Build ``kind`` (default: by size), train it and add ``vectors[rows]`` under ``ids[rows]``
    (all rows by default; gathered a chunk at a time, never copied whole)."""
    rows = np.arange(len(vectors)) if rows is None else rows
    n, dim = len(rows), vectors.shape[1]
    index = new_index(kind or size_kind(n, config), dim, n, config)
    train_index(index, vectors, config, rows)
    t0 = time.perf_counter()
    for start in range(0, n, ADD_CHUNK):
        chunk = rows[start : start + ADD_CHUNK]
        index.add_with_ids(
            np.ascontiguousarray(vectors[chunk], dtype=np.float32),
            np.ascontiguousarray(ids[chunk], dtype=np.int64),
        )
        if n > ADD_CHUNK:  # large builds (an HNSW graph at 1M: minutes) say how far they are
            log.info("index build (%s): %d/%d vectors added, %.0f s", index_kind(index), start + len(chunk), n,
                     time.perf_counter() - t0)
    return index


# --------------------------------------------------------------------------- inspection & search


def index_kind(index: Any) -> str:
    if isinstance(index, GraphIndex):
        return HNSW
    if isinstance(index, RerankedIVF):
        return IVFPQ
    return FLAT if isinstance(index, faiss.IndexIDMap) else IVF


def index_nbytes(index: Any) -> int:
    """Approximate memory held by the index: vectors/codes + ids (+ centroids or graph links)."""
    kind = index_kind(index)
    if kind in (HNSW, IVFPQ):
        return int(index.nbytes())
    if kind == FLAT:
        return index.ntotal * (index.d * 4 + 8)
    ivf = faiss.extract_index_ivf(index)
    return index.ntotal * (ivf.code_size + 8 + 16) + ivf.nlist * ivf.d * 4


def index_ids(index: Any) -> np.ndarray:
    """The external ids (pks) of the live vectors in ``index``."""
    kind = index_kind(index)
    if kind == HNSW:
        return index.ids()
    if kind == FLAT:
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    if kind == IVFPQ:
        return index_ids(index.exact)
    invlists = faiss.extract_index_ivf(index).invlists
    parts = [
        faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
        for i in range(invlists.nlist)
        if invlists.list_size(i)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def remove_ids(index: Any, pks: np.ndarray) -> None:
    kind = index_kind(index)
    if kind == HNSW:
        index.remove_ids(None, pks)
    elif kind == IVFPQ:
        index.remove_ids(pks)
    elif kind == FLAT:  # IndexIDMap tests membership per stored id: use a hash set
        index.remove_ids(faiss.IDSelectorBatch(len(pks), faiss.swig_ptr(pks)))
    else:  # IVF with a hashtable direct map removes exactly these ids
        index.remove_ids(faiss.IDSelectorArray(len(pks), faiss.swig_ptr(pks)))


def effort_name(kind: str) -> str | None:
    return {IVF: "nprobe", IVFPQ: "nprobe", HNSW: "ef_search"}.get(kind)


def max_effort(index: Any) -> int:
    kind = index_kind(index)
    if kind == IVF:
        return int(faiss.extract_index_ivf(index).nlist)
    if kind == IVFPQ:
        return index.nlist
    return 1024 if kind == HNSW else 1


def search_parameters(index: Any, effort: int | None, sel: Any = None) -> faiss.SearchParameters:
    """FAISS search parameters for flat and IVF (``effort`` = nprobe)."""
    if index_kind(index) == IVF:
        return faiss.SearchParametersIVF(sel=sel, nprobe=int(effort or 1))
    return faiss.SearchParameters(sel=sel)


def search(
    index: Any, x: np.ndarray, k: int, effort: int | None, sel: Any = None, exact: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)`` of the top ``k`` for each row, any kind, with an optional IDSelector.

    ``exact`` searches every (selected) vector: IVF probes all lists, HNSW scans its storage.
    """
    kind = index_kind(index)
    if kind == HNSW:
        return index.search(x, k, ef_search=int(effort or 64), sel=sel, exact=exact)
    if kind == IVFPQ:
        return index.search(x, k, nprobe=int(effort or 1), sel=sel, exact=exact)
    if exact and kind == IVF:
        effort = max_effort(index)
    return index.search(x, k, params=search_parameters(index, effort, sel))


def write_index(index: Any, path: str) -> None:
    if index_kind(index) in (HNSW, IVFPQ):
        index.write(path)
    else:
        faiss.write_index(index, path)


def read_index(path: str, kind: str) -> Any:
    if kind == HNSW:
        return GraphIndex.read(path)
    return RerankedIVF.read(path) if kind == IVFPQ else faiss.read_index(path)


def nlist_of(index: Any) -> int | None:
    kind = index_kind(index)
    if kind == IVFPQ:
        return index.nlist
    return int(faiss.extract_index_ivf(index).nlist) if kind == IVF else None
