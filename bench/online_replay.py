"""Offline replay of bench/online_personalization.py: the same users, rounds and answers, no rendering.

    python bench/online_replay.py [--users-seeds 5] [--out F.json]

**Offline numbers, toy world only.** The renderer and the probe are replaced by the keywords themselves
(an image "shows" exactly its keywords; an attribute without a keyword shows nothing and misses), and
the keyword LLM by the history's most frequent value per attribute (ties to the most recent): the
history-only predictor that scores like the LLM on held-out windows (bench/RESULTS.md, Feedback loop).
Everything between the keywords and the next round's keywords is the serving code itself
(``models/personalize.py``: signal weights, feedback evidence, keyword choice, exploration variants),
so settings and mechanisms can be compared in seconds; the full bench is the measurement.
``--seeds`` replays the answers (random picks, rating noise) under several seeds to show the spread.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from pigment.models import personalize as pz
from pigment.models.preference import KeywordVocabulary
from pigment.models.tiny import DEFAULT_PREFERENCE_CONFIG
from pigment.training import toy_world as tw

OPEN = ("colour", "background", "size")
VIEW_STEP_MS, ROUND_STEP_MS = 60_000, 3_600_000


def llm_guess(window_items) -> list[str]:
    """Each attribute's most frequent value in the history, ties to the most recent."""
    out = []
    for attr in tw.KEYWORD_ORDER:
        if attr == "shape":
            continue
        values = [it.attributes[attr] for it in window_items]
        counts = Counter(values)
        best = max(counts.values())
        value = next(v for v in reversed(values) if counts[v] == best)
        out.append(tw.keyword(attr, value))
    return out


def shows(keywords: list[str], vocab) -> dict[str, str]:
    return {vocab.attribute_of[k]: k for k in keywords if k in vocab.attribute_of}


def simulate(world, users, vocab, cfg, rounds: int, noise: float, drift_at: int | None, seed: int,
             candidates: int = 4, rating_noise: float = 0.5) -> list[float]:
    table = {**pz.DEFAULT_SIGNAL_WEIGHTS, **(cfg.get("signal_weights") or {})}
    seqs = world.sequences()
    per_round = [[] for _ in range(rounds + 1)]
    for u in users:
        window = [world.item_by_id[i] for i in seqs[u.user_id][: tw.WINDOW]]
        history, nxt = window[:-1], window[-1]
        target = tw.caption(nxt.attributes, keep={"shape"})
        weighted = [(it.caption, w) for it, w in zip(history, [table["view"]] * len(history))]
        hist = pz.history_evidence(weighted, vocab)
        llm = llm_guess(history)
        rows: list[pz.FeedbackRow] = []
        for r in range(rounds + 1):
            t = 10**6 if (drift_at is not None and r >= drift_at) else 5
            taste = {a: tw.keyword(a, fav) for a, (fav, _) in u.taste_at(t).items() if a in OPEN}
            ev = pz.feedback_evidence(rows, table, float(cfg["feedback_evidence_cap"]), 0.0, 0,
                                      float(cfg["feedback_round_decay"]), float(cfg.get("feedback_change_drop", 0.0)),
                                      pz.prior_scores(llm, hist))
            fast = cfg.get("feedback_explore_decay", 0.0)
            ex = (pz.feedback_evidence(rows, table, float(cfg["feedback_evidence_cap"]), 0.0, 0, fast,
                                       float(cfg.get("feedback_change_drop", 0.0)), pz.prior_scores(llm, hist))
                  if fast else None)
            choice = pz.choose_keywords(llm, vocab, target, hist, ev.scores, 4, ev.prior_scale, ev.reset, ex,
                                        ev.rounds_seen, ev.change_round)
            shown = [choice.keywords] + [choice.variants[(k - 1) % len(choice.variants)][1] if choice.variants
                                         else choice.keywords for k in range(1, candidates)]
            per_round[r].append(all(shows(shown[0], vocab).get(a) == taste[a] for a in OPEN))
            rng = np.random.default_rng([seed, r, int(u.user_id.split("-")[-1])])
            scores = [sum(shows(kws, vocab).get(a) == taste[a] for a in OPEN) + 1 for kws in shown]
            best = max(range(len(shown)), key=lambda i: (scores[i], -i))
            pick = int(rng.integers(len(shown))) if rng.random() < noise else best
            ts = 1_800_000_000_000 + r * ROUND_STEP_MS
            gid = [f"{u.user_id}-r{r}-c{k}" for k in range(len(shown))]
            rows.append(pz.FeedbackRow(f"{gid[pick]}-pick", gid[pick], "pick", 1.0, ts, shown[pick],
                                       [kws for k, kws in enumerate(shown) if k != pick]))
            for k, (kws, s) in enumerate(zip(shown, scores)):
                rating = int(np.clip(np.rint(1 + 4 * s / 4 + rng.normal(0, rating_noise)), 1, 5))
                rows.append(pz.FeedbackRow(f"{gid[k]}-rate", gid[k], "rating", float(rating), ts + 1 + k, kws))
    return [float(np.mean(x)) for x in per_round]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--drift-at", type=int, default=2)
    p.add_argument("--drift-rounds", type=int, default=4)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--set", action="append", default=[], help="preference setting override, KEY=JSON")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = dict(DEFAULT_PREFERENCE_CONFIG)
    for kv in args.set:
        k, v = kv.split("=", 1)
        cfg[k] = json.loads(v)
    world = tw.ToyWorld(seed=0)
    vocab = KeywordVocabulary(tw.keywords_table())
    held = [u for u in world.users if u.user_id in world.test_user_ids]
    drifting = [u for u in held if u.kind == "drift"]
    out = {"label": "OFFLINE replay (no rendering; keywords read as shown; toy world)", "settings": args.set,
           "seeds": {}}
    for seed in range(args.seeds):
        clean = simulate(world, held, vocab, cfg, args.rounds, 0.0, None, seed)
        noisy = simulate(world, held, vocab, cfg, args.rounds, args.noise, None, seed)
        drift = simulate(world, drifting, vocab, cfg, args.drift_rounds, 0.0, args.drift_at, seed)
        out["seeds"][seed] = {"joint": clean, "noise": noisy, "drift": drift}
        print(f"seed {seed}: joint {fmt(clean)} | noise {fmt(noisy)} | drift ({len(drifting)}) {fmt(drift)}")
    last = [s["noise"][-1] for s in out["seeds"].values()]
    rec = [s["drift"][args.drift_at + 2] for s in out["seeds"].values() if len(s["drift"]) > args.drift_at + 2]
    print(f"noise round {args.rounds}: mean {np.mean(last):.3f} min {min(last):.3f}; "
          f"drift round {args.drift_at + 2}: mean {np.mean(rec):.3f} min {min(rec):.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


def fmt(xs) -> str:
    return " ".join(f"{x:.3f}" for x in xs)


if __name__ == "__main__":
    sys.exit(main())
