"""Checks the scale plan (docs/SCALE.md) by simulation: 10M users, 100M items, 1M generations a day.

The render pool is an M/G/c queue: Poisson arrivals at the busiest hour's rate,
service times drawn around the per-image GPU cost (lognormal, coefficient of
variation ``cv``), c GPUs serving in FIFO order, as the Celery render queue with
prefetch 1 does. The simulation is exact for that model (each arrival takes the
earliest free GPU); Erlang C (M/M/c) is printed beside it as an analytic check.
It finds the fewest GPUs that keep the p99 queue wait under the SLO at the
utilization ceiling, then adds the plan's headroom (one zone lost), and derives
the broker, SQL, storage and index sizes that follow from the same traffic.

    python bench/capacity.py --out bench/out/capacity.json            # the plan's numbers
    python bench/capacity.py --gpu-seconds-per-image 2.0              # SDXL-class images
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

DAY_S = 86_400


@dataclass
class Plan:
    """The scale plan's inputs and its claimed GPU count (docs/SCALE.md states the same numbers)."""

    users: int = 10_000_000
    items: int = 100_000_000
    generations_per_day: int = 1_000_000  # images
    peak_to_mean: float = 3.0  # busiest hour / the day's mean rate
    retrieve_fraction: float = 0.0  # requests GILL answers from the catalog (no GPU); 0 = plan for the worst
    gpu_seconds_per_image: float = 0.5  # SD1.5 512x512, 25 steps, fp16, batched, H100/H200-class (assumed)
    service_cv: float = 0.3
    slo_p99_wait_s: float = 2.0
    max_utilization: float = 0.75
    zones: int = 3  # GPUs spread over zones; the plan survives losing one
    steps_per_image: int = 25
    progress_writes_per_image: int = 5  # throttled step updates (one per 5 steps), see docs/SCALE.md
    png_bytes: int = 400_000  # a 512x512 PNG
    embedding_dim: int = 512
    pq_bytes: int = 64  # IVF-PQ code size per vector (PQ64)
    index_shards: int = 4
    planned_gpus: int = 36  # the plan's render GPU count (including zone headroom)


def simulate(rate: float, mean_s: float, cv: float, servers: int, n: int, seed: int = 0) -> dict:
    """FIFO M/G/c: waits of ``n`` Poisson arrivals at ``rate``/s on ``servers`` with lognormal service times."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    sigma = math.sqrt(math.log(1 + cv * cv))
    service = rng.lognormal(math.log(mean_s) - sigma * sigma / 2, sigma, n)
    free = [0.0] * servers
    waits = np.empty(n)
    for i in range(n):
        earliest = heapq.heappop(free)
        start = max(arrivals[i], earliest)
        waits[i] = start - arrivals[i]
        heapq.heappush(free, start + service[i])
    warm = n // 10  # drop the empty-system start
    w = waits[warm:]
    return {"servers": servers, "utilization": round(rate * mean_s / servers, 3),
            "wait_p50_s": round(float(np.percentile(w, 50)), 3), "wait_p95_s": round(float(np.percentile(w, 95)), 3),
            "wait_p99_s": round(float(np.percentile(w, 99)), 3), "waited_fraction": round(float((w > 1e-9).mean()), 3),
            "erlang_c_wait_probability": round(erlang_c(rate * mean_s, servers), 3)}


def erlang_c(load: float, servers: int) -> float:
    """P(wait > 0) in M/M/c with offered load ``load`` Erlangs (1 when unstable)."""
    if load >= servers:
        return 1.0
    term, total = 1.0, 1.0
    for k in range(1, servers):
        term *= load / k
        total += term
    last = term * load / servers
    top = last * servers / (servers - load)
    return top / (total + top)


def required_gpus(plan: Plan, n: int, seed: int = 0) -> tuple[int, dict]:
    rate = peak_rate(plan)
    c = max(1, math.ceil(rate * plan.gpu_seconds_per_image / plan.max_utilization))
    while True:
        result = simulate(rate, plan.gpu_seconds_per_image, plan.service_cv, c, n, seed)
        if result["wait_p99_s"] <= plan.slo_p99_wait_s:
            return c, result
        c += 1


def peak_rate(plan: Plan) -> float:
    return plan.generations_per_day / DAY_S * plan.peak_to_mean * (1 - plan.retrieve_fraction)


def with_zone_headroom(gpus: int, zones: int) -> int:
    """Enough GPUs that losing one zone still leaves ``gpus``."""
    return math.ceil(gpus * zones / (zones - 1)) if zones > 1 else gpus


def check_plan(plan: Plan, n: int = 60_000, seed: int = 0) -> dict:
    rate = peak_rate(plan)
    need, at_need = required_gpus(plan, n, seed)
    with_headroom = with_zone_headroom(need, plan.zones)
    one_zone_down = plan.planned_gpus - math.ceil(plan.planned_gpus / plan.zones)
    degraded = simulate(rate, plan.gpu_seconds_per_image, plan.service_cv, one_zone_down, n, seed)
    writes = plan.generations_per_day / DAY_S * plan.peak_to_mean
    return {
        "plan": asdict(plan),
        "peak_generations_per_s": round(rate, 2),
        "offered_load_erlangs": round(rate * plan.gpu_seconds_per_image, 2),
        "gpus_required": need, "at_required": at_need,
        "gpus_with_zone_headroom": with_headroom,
        "planned_gpus_one_zone_down": degraded,
        "plan_meets_slo": plan.planned_gpus >= with_headroom and degraded["wait_p99_s"] <= plan.slo_p99_wait_s,
        "broker_messages_per_s_peak": round(writes * 3, 1),  # publish + deliver + ack per render task
        "sql_writes_per_s_peak": round(writes * (4 + plan.progress_writes_per_image), 1),
        "sql_writes_per_s_peak_unthrottled_progress": round(writes * (4 + plan.steps_per_image), 1),
        "image_storage_tb_per_day": round(plan.generations_per_day * plan.png_bytes / 1e12, 2),
        "index_flat_gb": round(plan.items * plan.embedding_dim * 4 / 1e9, 1),
        "index_ivfpq_gb": round(plan.items * (plan.pq_bytes + 8) / 1e9, 1),  # codes + 64-bit ids
        "index_ivfpq_gb_per_shard": round(plan.items * (plan.pq_bytes + 8) / 1e9 / plan.index_shards, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Plan()
    for name, value in asdict(defaults).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    ap.add_argument("--arrivals", type=int, default=60_000, help="simulated arrivals per configuration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = vars(ap.parse_args(argv))
    n, seed, out = args.pop("arrivals"), args.pop("seed"), args.pop("out")
    report = check_plan(Plan(**args), n, seed)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
