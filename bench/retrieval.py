"""Item-retrieval benchmark: the production index factory on a clustered synthetic catalog.

    python bench/retrieval.py --n 1000000 --out retrieval-1m.json
    python bench/retrieval.py --n 100000 --out retrieval-100k.json     # quick

Data: ``dim``-d unit vectors from a mixture of ``clusters`` clusters on the
sphere (centres uniform on the sphere; each vector = centre + isotropic
Gaussian noise scaled so its cosine to its own centre is about 0.7, measured and
reported). Queries are held-out vectors drawn the same way. The index is built
by ``pigment.services.history.index.build_index`` (what ItemIndex runs);
recall@10 is against exact search, and a plain numpy brute force runs in the
same process for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import faiss
import numpy as np
from pigment.services.history.index import (
    IndexConfig,
    build_index,
    choose_kind,
    default_nlist,
    index_nbytes,
    search_parameters,
)

K = 10


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_data(n: int, nq: int, dim: int, clusters: int, cos: float, seed: int):
    """Catalog, held-out queries, and the measured mean cosine of a vector to its centre."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # |noise|^2 ~ sigma^2 * dim, so cos = 1 / sqrt(1 + sigma^2 dim) on average.
    sigma = np.sqrt((1.0 / cos**2 - 1.0) / dim)
    out = np.empty((n + nq, dim), dtype=np.float32)
    cos_sum = 0.0
    for start in range(0, n + nq, 100_000):
        m = min(100_000, n + nq - start)
        labels = rng.integers(0, clusters, m)
        x = centres[labels] + sigma * rng.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        cos_sum += float(np.einsum("ij,ij->", x, centres[labels]))
        out[start : start + m] = x
    return out[:n], out[n:], cos_sum / (n + nq)


def percentiles(times_s: list[float]) -> tuple[float, float]:
    ms = np.asarray(times_s) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def time_batches(index, queries: np.ndarray, batch: int, params, repeats: int) -> list[float]:
    times = []
    for i in range(repeats):
        start = (i * batch) % (len(queries) - batch + 1)
        q = queries[start : start + batch]
        t0 = time.perf_counter()
        index.search(q, K, params=params)
        times.append(time.perf_counter() - t0)
    return times


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f) & set(t)) for f, t in zip(found, truth))
    return hits / truth.size


def bruteforce_p50(xb: np.ndarray, queries: np.ndarray, repeats: int) -> float:
    times = []
    for q in queries[:repeats]:
        t0 = time.perf_counter()
        scores = xb @ q
        top = np.argpartition(-scores, K)[:K]
        top[np.argsort(-scores[top])]
        times.append(time.perf_counter() - t0)
    return percentiles(times)[0]


def exact_neighbours(xb: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return faiss.knn(queries, xb, K, metric=faiss.METRIC_INNER_PRODUCT)[1]  # no copy of xb


def selector_overhead(index, queries, nprobe: int, n: int, repeats: int) -> float:
    """p50 at batch 1 with a tenant bitmap (90% of items visible), as ItemIndex.search passes it."""
    allowed = np.random.default_rng(0).random(n) < 0.9
    bitmap = np.packbits(allowed, bitorder="little")
    sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
    params = search_parameters(index, nprobe, sel)
    return percentiles(time_batches(index, queries, 1, params, repeats))[0]


def run(args: argparse.Namespace) -> dict:
    faiss.omp_set_num_threads(args.threads)
    load_before = os.getloadavg()
    config = IndexConfig(nlist=args.nlist, ivf_codec=args.codec, flat_threshold=args.flat_threshold)
    t0 = time.perf_counter()
    xb, xq, mean_cos = make_data(args.n, args.nq, args.dim, args.clusters, 0.7, args.seed)
    print(f"data {time.perf_counter() - t0:.1f}s, mean cos to centre {mean_cos:.3f}", flush=True)

    rss0 = rss_mb()
    t0 = time.perf_counter()
    index = build_index(xb, np.arange(args.n, dtype=np.int64), config)
    build_s = time.perf_counter() - t0
    kind = choose_kind(args.n, config)
    memory_mb = index_nbytes(index) / 2**20
    print(
        f"build {kind} {build_s:.1f}s, index {memory_mb:.0f} MB (rss +{rss_mb() - rss0:.0f} MB)",
        flush=True,
    )

    t0 = time.perf_counter()
    truth = exact_neighbours(xb, xq)
    exact_s = time.perf_counter() - t0
    brute_ms = bruteforce_p50(xb, xq, args.brute_repeats)
    print(f"ground truth {exact_s:.1f}s; numpy brute force p50 {brute_ms:.2f} ms", flush=True)

    nlist = default_nlist(args.n, config)
    wanted = sorted({*args.nprobes, args.nprobe})
    nprobes = [p for p in wanted if p <= nlist] if kind == "ivf" else [1]
    curve = []
    for nprobe in nprobes:
        params = search_parameters(index, nprobe)
        found = index.search(xq, K, params=params)[1]
        p50, p99 = percentiles(time_batches(index, xq, 1, params, args.lat_repeats))
        p50_64, _ = percentiles(time_batches(index, xq, 64, params, args.batch_repeats))
        point = {
            "nprobe": nprobe,
            "recall_at_10": recall(found, truth),
            "p50_ms_batch1": p50,
            "p99_ms_batch1": p99,
            "p50_ms_batch64": p50_64,
        }
        curve.append(point)
        print(json.dumps(point), flush=True)

    # Headline: the production nprobe (IndexConfig default unless --nprobe); the curve shows the rest.
    chosen = next((c for c in curve if c["nprobe"] == args.nprobe), curve[0])
    smallest = next((c["nprobe"] for c in curve if c["recall_at_10"] >= args.target_recall), None)
    return {
        "n": args.n,
        "dim": args.dim,
        "clusters": args.clusters,
        "index": f"IVF{default_nlist(args.n, config)},{args.codec}"
        if kind == "ivf"
        else "IDMap,FlatIP",
        "nprobe": chosen["nprobe"],
        "smallest_nprobe_meeting_target_recall": smallest,
        "threads": args.threads,
        "build_s": build_s,
        "memory_mb": memory_mb,
        "rss_growth_mb": rss_mb() - rss0,
        "recall_at_10": chosen["recall_at_10"],
        "p50_ms_batch1": chosen["p50_ms_batch1"],
        "p99_ms_batch1": chosen["p99_ms_batch1"],
        "p50_ms_batch64": chosen["p50_ms_batch64"],
        "p50_ms_batch1_tenant_selector": selector_overhead(
            index, xq, chosen["nprobe"], args.n, args.lat_repeats
        ),
        "bruteforce_p50_ms_batch1": brute_ms,
        "exact_faiss_ground_truth_s": exact_s,
        "mean_cos_to_centre": mean_cos,
        "curve": curve,
        "queries": args.nq,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "faiss": faiss.__version__,
        "simd": faiss.get_compile_options(),
        "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]],
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=100_000, help="catalog size")
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--nq", type=int, default=1000, help="held-out queries for recall")
    p.add_argument("--codec", default="Flat", choices=["Flat", "SQfp16", "SQ8"])
    p.add_argument("--nlist", type=int, default=None, help="default: the production rule")
    p.add_argument("--flat-threshold", type=int, default=IndexConfig.flat_threshold)
    p.add_argument(
        "--nprobes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8, 16, 32]
    )
    p.add_argument("--nprobe", type=int, default=IndexConfig.nprobe, help="headline nprobe")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lat-repeats", type=int, default=500)
    p.add_argument("--batch-repeats", type=int, default=30)
    p.add_argument("--brute-repeats", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
