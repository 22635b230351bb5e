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
    IndexConfig,
    build_index,
    effort_name,
    index_kind,
    max_effort,
    search,
)

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
    times = []
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


def tune(
    index: Any, sample: Sample | None, config: IndexConfig, max_scan: int | None = None
) -> RecallReport | None:
    """Measure recall@10 on ``sample`` and choose the search effort (unless the config fixes it).

    ``max_scan`` (IVF) stops the search for an effort once it would scan more vectors per query
    than that: ``auto`` then tries HNSW instead of measuring hopeless nprobes.
    """
    if sample is None:
        return None
    started = time.perf_counter()
    kind = index_kind(index)
    fixed = {IVF: config.nprobe, HNSW: config.ef_search}.get(kind)
    curve: list[dict[str, float]] = []
    if kind == FLAT:
        effort, recall = None, recall_at(index, sample, None)
    elif fixed is not None:
        effort = min(fixed, max_effort(index))
        recall = recall_at(index, sample, effort)
    else:
        lo, hi = (1 if kind == IVF else K), max_effort(index)
        if kind == IVF and max_scan is not None:
            per_list = max(1.0, index.ntotal / hi)
            hi = max(1, min(hi, int(2 * max_scan / per_list)))  # one doubling past the bound
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


def ivf_is_enough(report: RecallReport, index: Any, config: IndexConfig) -> bool:
    """IVF meets the target scanning at most ``max_scan`` vectors per query."""
    if report.kind != IVF or not report.meets_target:
        return False
    per_list = report.ntotal / max_effort(index)  # max_effort of IVF = nlist
    return (report.effort or 1) * per_list <= config.max_scan


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


def build_tuned(
    vectors: np.ndarray, pks: np.ndarray, config: IndexConfig, kind: str, sample: Sample | None
) -> tuple[Any, RecallReport | None, list[Attempt]]:
    """Build ``kind`` and tune it; under ``auto``, an IVF that misses the target within
    ``max_scan`` is replaced by HNSW when that measures better. What ItemIndex and the
    benchmark both run.

    The sample's items are held out of the build until it has been measured: a query already
    in a graph leads the search straight to its own neighbourhood, which overstates recall
    (0.95 measured that way was 0.89 on outside queries, 100k manifold data).
    """
    attempts: list[Attempt] = []
    rest = None if sample is None else np.setdiff1d(np.arange(len(pks)), sample.rows)

    def attempt(kind: str, max_scan: int | None) -> tuple[Any, RecallReport | None]:
        t0 = time.perf_counter()
        index = build_index(vectors, pks, config, kind=kind, rows=rest)
        built = time.perf_counter() - t0
        report = tune(index, sample, config, max_scan)
        attempts.append(Attempt(kind, built, report))
        return index, report

    auto = config.kind == "auto"
    index, report = attempt(kind, config.max_scan if auto else None)
    if auto and kind == IVF and report is not None and not ivf_is_enough(report, index, config):
        log.info(
            "IVF reaches recall@10 %.3f at nprobe %s (target %.2f within max_scan %d): trying HNSW",
            report.recall_at_10,
            report.effort,
            config.target_recall,
            config.max_scan,
        )
        del index  # never two catalog-sized indexes in memory at once
        graph, graph_report = attempt(HNSW, None)
        if graph_report is not None and (
            graph_report.meets_target or graph_report.recall_at_10 > report.recall_at_10
        ):
            index, report = graph, graph_report
        else:  # rare: the graph measured worse; rebuild the IVF (same seed, same index)
            del graph
            index, report = attempt(IVF, config.max_scan)
    if sample is not None:  # measured: now the held-out items join the catalog
        index.add_with_ids(vectors[sample.rows], pks[sample.rows])
        report.ntotal = int(index.ntotal)
    return index, report, attempts
