"""Recall measured on the catalog itself, and the search effort tuned to a target.

Nobody can know in advance whether a catalog is clustered like the index's
lists or spread like many small clusters (bench/RESULTS.md: IVF at nprobe 2
gives recall@10 1.000 on one and 0.078 on the other). So at build, and after
large changes, a sample of catalog items is held out as queries, their exact
neighbours are found by brute force, and the smallest search effort (nprobe
or efSearch) whose recall@10 meets the target is chosen; the measurement is
kept in the manifest and reported by ``pigment index stats``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np
from pigment.services.history.index_factory import (
    FLAT,
    HNSW,
    IVF,
    IVFPQ,
    IndexConfig,
    add_pq,
    build_index,
    effort_name,
    index_kind,
    max_effort,
    search,
)
from pigment.services.history.index_pq import one_thread

log = logging.getLogger(__name__)

K = 10
LATENCY_QUERIES = 100


@dataclass
class RecallReport:
    kind: str
    effort_name: str | None
    effort: int | None
    recall_at_10: float
    p50_ms: float
    """Batch-1 search latency at ``effort`` over the sample (this process, this load)."""
    sample: int
    ntotal: int
    target: float
    meets_target: bool
    tuned: bool
    """True: ``effort`` chosen by the tuner; False: fixed in the config."""
    curve: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    measured_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Sample:
    """Held-out catalog items as queries, and their exact top-K neighbours (themselves excluded)."""

    queries: np.ndarray
    pks: np.ndarray
    truth: np.ndarray
    rows: np.ndarray
    """Their rows in the catalog arrays: a build leaves them out until it has been measured."""


def draw_sample(
    vectors: np.ndarray, pks: np.ndarray, size: int, seed: int, held_out: bool = True
) -> Sample | None:
    """``size`` catalog items (at most a tenth of the catalog) as queries, with exact neighbours.

    ``held_out``: the neighbours come from the catalog without the sample (which a build
    leaves out until measured); else from the whole catalog, each query without itself.
    """
    n = len(pks)
    size = min(size, n // 10)
    if size < 1:
        return None
    rows = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    queries = np.ascontiguousarray(vectors[rows], dtype=np.float32)
    k = min(K + (size if held_out else 1), n)
    _, idx = faiss.knn(queries, np.ascontiguousarray(vectors), k, metric=faiss.METRIC_INNER_PRODUCT)
    found = pks[idx]
    if held_out:
        found = np.where(np.isin(found, pks[rows]), pks[rows][:, None], found)  # drop: as "self"
    truth = _drop_self(found, pks[rows], min(K, n - size if held_out else n - 1))
    return Sample(queries, pks[rows], truth, rows)


def _drop_self(found: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(found), k), -1, dtype=np.int64)
    for i, row in enumerate(found):
        rest = row[row != own[i]]
        out[i, : min(k, len(rest))] = rest[:k]
    return out


def recall_at(index: Any, sample: Sample, effort: int | None) -> float:
    k = sample.truth.shape[1]
    _, found = search(index, sample.queries, k + 1, effort)
    found = _drop_self(found, sample.pks, k)
    hits = sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found, sample.truth))
    return hits / max(1, int((sample.truth >= 0).sum()))


def p50_ms(index: Any, sample: Sample, effort: int | None) -> float:
    """Batch-1 latency as ItemIndex serves it: on one OpenMP thread (1M manifold, same index,
    same minute on a busy host: 1.5 ms on one thread, 27 ms on two, mostly barrier waits)."""
    times = []
    with one_thread():
        for q in sample.queries[:LATENCY_QUERIES]:
            t0 = time.perf_counter()
            search(index, q[None], K, effort)
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000) if times else 0.0


def _smallest_effort(
    index: Any, sample: Sample, target: float, lo: int, hi: int
) -> tuple[int, float, list[dict[str, float]]]:
    """Doubling from ``lo``, then bisection: the smallest effort with recall >= target (or ``hi``)."""
    curve: list[dict[str, float]] = []

    def measure(effort: int) -> float:
        r = recall_at(index, sample, effort)
        curve.append({"effort": effort, "recall_at_10": r})
        return r

    below, effort = lo - 1, lo
    while True:
        r = measure(effort)
        if r >= target or effort >= hi:
            break
        below, effort = effort, min(2 * effort, hi)
    best, best_r = effort, r
    if r >= target:
        left, right = below + 1, effort  # recall grows with effort: bisect (below, effort]
        while left < right:
            mid = (left + right) // 2
            r_mid = measure(mid)
            if r_mid >= target:
                right, best, best_r = mid, mid, r_mid
            else:
                left = mid + 1
    curve.sort(key=lambda c: c["effort"])
    return best, best_r, curve


def scan_bound(kind: str, config: IndexConfig) -> int | None:
    """Vectors (IVF) or PQ codes (IVF-PQ) one query may scan before another kind is cheaper."""
    return {IVF: config.max_scan, IVFPQ: config.max_scan_codes}.get(kind)


def tune(
    index: Any, sample: Sample | None, config: IndexConfig, bounded: bool = False
) -> RecallReport | None:
    """Measure recall@10 on ``sample`` and choose the search effort (unless the config fixes it).

    ``bounded`` (IVF, IVF-PQ) stops the search for an effort once a query would scan more than
    ``scan_bound`` per query: ``auto`` then tries the next kind instead of hopeless nprobes.
    """
    if sample is None:
        return None
    started = time.perf_counter()
    kind = index_kind(index)
    fixed = {IVF: config.nprobe, IVFPQ: config.nprobe, HNSW: config.ef_search}.get(kind)
    curve: list[dict[str, float]] = []
    if kind == FLAT:
        effort, recall = None, recall_at(index, sample, None)
    elif fixed is not None:
        effort = min(fixed, max_effort(index))
        recall = recall_at(index, sample, effort)
    else:
        lo, hi = (K if kind == HNSW else 1), max_effort(index)
        bound = scan_bound(kind, config) if bounded else None
        if bound is not None:
            per_list = max(1.0, index.ntotal / hi)
            hi = max(1, min(hi, int(2 * bound / per_list)))  # one doubling past the bound
        aim = min(1.0, config.target_recall + config.tune_margin)
        effort, recall, curve = _smallest_effort(index, sample, aim, lo, hi)
    return RecallReport(
        kind=kind,
        effort_name=effort_name(kind),
        effort=effort,
        recall_at_10=recall,
        p50_ms=p50_ms(index, sample, effort),
        sample=len(sample.pks),
        ntotal=int(index.ntotal),
        target=config.target_recall,
        meets_target=recall >= config.target_recall,
        tuned=kind != FLAT and fixed is None,
        curve=curve,
        seconds=time.perf_counter() - started,
    )


def cheap_enough(report: RecallReport | None, index: Any, config: IndexConfig) -> bool:
    """Meets the target, and (IVF, IVF-PQ) within its kind's ``scan_bound`` per query."""
    if report is None or not report.meets_target:
        return False
    bound = scan_bound(report.kind, config)
    if bound is None:
        return True
    per_list = report.ntotal / max_effort(index)  # max_effort of IVF = nlist
    return (report.effort or 1) * per_list <= bound


def _rank(report: RecallReport | None, index: Any, config: IndexConfig) -> tuple:
    """Higher is better: within bound, meets the target, then faster (if met) or higher recall."""
    if report is None:
        return (False, False, -1.0)
    met = report.meets_target
    return (
        cheap_enough(report, index, config),
        met,
        -report.p50_ms if met else report.recall_at_10,
    )


def warn_if_below(report: RecallReport | None, where: str) -> None:
    if report is not None and not report.meets_target:
        log.warning(
            "RECALL BELOW TARGET: item index %s (%s, %s=%s) measured recall@10 %.3f on %d "
            "held-out catalog items, target %.2f: results miss true neighbours; raise the "
            "search effort or use another index kind (pigment index stats)",
            where,
            report.kind,
            report.effort_name,
            report.effort,
            report.recall_at_10,
            report.sample,
            report.target,
        )


@dataclass
class Attempt:
    kind: str
    build_s: float
    report: RecallReport | None
    skipped: str | None = None
    """Why this kind was not built (``report`` is None then)."""


def project_hnsw_build_s(
    vectors: np.ndarray, pks: np.ndarray, rows: np.ndarray, config: IndexConfig
) -> float:
    """Seconds a full HNSW build of ``rows`` would take, from a timed build of ``hnsw_probe``
    random rows (graph insertion costs about log n each: scaled by n log n)."""
    m = min(config.hnsw_probe, len(rows))
    probe = np.sort(np.random.default_rng(config.seed).choice(rows, m, replace=False))
    t0 = time.perf_counter()
    build_index(vectors, pks, config, kind=HNSW, rows=probe)
    spent = time.perf_counter() - t0
    n = len(rows)
    return spent * (n / m) * np.log(max(n, 2)) / np.log(max(m, 2))


def build_tuned(
    vectors: np.ndarray, pks: np.ndarray, config: IndexConfig, kind: str, sample: Sample | None
) -> tuple[Any, RecallReport | None, list[Attempt]]:
    """Build ``kind`` and tune it. Under ``auto`` an IVF that misses the target within its scan
    bound gets PQ fast-scan codes on the same lists (``ivfpq``, no second k-means); if that
    misses too, HNSW is built when a timed probe projects it within ``build_budget_s``; the best
    measured index is kept. What ItemIndex and the benchmark both run.

    The sample's items are held out of the build until it has been measured: a query already
    in a graph leads the search straight to its own neighbourhood, which overstates recall
    (0.95 measured that way was 0.89 on outside queries, 100k manifold data).
    """
    started = time.perf_counter()
    attempts: list[Attempt] = []
    rest = np.arange(len(pks)) if sample is None else np.setdiff1d(np.arange(len(pks)), sample.rows)

    def attempt(kind: str, bounded: bool) -> tuple[Any, RecallReport | None]:
        t0 = time.perf_counter()
        index = build_index(vectors, pks, config, kind=kind, rows=rest)
        return index, measured(kind, index, time.perf_counter() - t0, bounded)

    def measured(kind: str, index: Any, built_s: float, bounded: bool) -> RecallReport | None:
        report = tune(index, sample, config, bounded)
        attempts.append(Attempt(kind, built_s, report))
        return report

    auto = config.kind == "auto"
    index, report = attempt(kind, auto)
    if auto and kind == IVF and sample is not None and not cheap_enough(report, index, config):
        index, report = _beyond_ivf(
            vectors, pks, config, sample, rest, index, report, attempts, started
        )
    if sample is not None:  # measured: now the held-out items join the catalog
        index.add_with_ids(vectors[sample.rows], pks[sample.rows])
        report.ntotal = int(index.ntotal)
    return index, report, attempts


def _beyond_ivf(
    vectors: np.ndarray,
    pks: np.ndarray,
    config: IndexConfig,
    sample: Sample,
    rest: np.ndarray,
    ivf: Any,
    ivf_report: RecallReport,
    attempts: list[Attempt],
    started: float,
) -> tuple[Any, RecallReport]:
    """IVF missed: try IVF-PQ on its lists, then (budget allowing) HNSW; keep the best."""
    log.info(
        "IVF reaches recall@10 %.3f at nprobe %s (target %.2f within max_scan %d): trying IVF-PQ",
        ivf_report.recall_at_10,
        ivf_report.effort,
        config.target_recall,
        config.max_scan,
    )
    t0 = time.perf_counter()
    pq = add_pq(ivf, vectors, pks, config, rest)
    built = attempts[-1].build_s + time.perf_counter() - t0
    pq_report = tune(pq, sample, config, bounded=True)
    attempts.append(Attempt(IVFPQ, built, pq_report))
    candidates = [(ivf, ivf_report), (pq, pq_report)]
    best, best_report = max(candidates, key=lambda c: _rank(c[1], c[0], config))
    if cheap_enough(best_report, best, config):
        return best, best_report
    left = config.build_budget_s - (time.perf_counter() - started)
    projected = project_hnsw_build_s(vectors, pks, rest, config)
    if projected > left:
        why = f"projected build {projected:.0f}s > {left:.0f}s left of build_budget_s"
        log.warning("item index: not building HNSW (%s); keeping %s", why, best_report.kind)
        attempts.append(Attempt(HNSW, 0.0, None, skipped=why))
        return best, best_report
    best_kind, best_rank = best_report.kind, _rank(best_report, best, config)
    del ivf, pq, best, candidates  # never two catalog-sized indexes in memory at once
    t0 = time.perf_counter()
    graph = build_index(vectors, pks, config, kind=HNSW, rows=rest)
    graph_report = tune(graph, sample, config)
    attempts.append(Attempt(HNSW, time.perf_counter() - t0, graph_report))
    if _rank(graph_report, graph, config) >= best_rank:
        return graph, graph_report
    del graph  # rare: the graph measured worse; rebuild the best (same seed, same index)
    index = build_index(vectors, pks, config, kind=IVF, rows=rest)
    if best_kind == IVFPQ:
        index = add_pq(index, vectors, pks, config, rest)
    return index, tune(index, sample, config, bounded=True)
