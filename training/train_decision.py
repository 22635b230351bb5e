"""`pigment train decision --out DIR`: the GILL-style retrieve-or-generate head.

GILL trains a dropout + linear classifier on the LLM's [IMG] state with 911
human judgements of "the retrieved image is better" vs "the generated one is".
pigment has no such judgements yet, so the labels here come from the toy world
(``training/toy_world.py``), and they **use the users' latent taste**. That is
allowed for this head only because it is a policy-learning label standing in
for human judgement ("would this user be served by the catalog's best item?");
the head's *inputs* never see the taste, only what the gateway sees at request
time:

* the request: a content prompt ("a star", the target item's shape; empty for
  ``--no-prompt-fraction`` of samples) and keywords (the mode of each open
  attribute over the five history captions, which is what the toy keyword LLM
  learns to write; attributes the prompt names are dropped, as the
  preference validator does);
* the query vector built exactly as the gateway builds it
  (``decision.build_query``) and the cosine scores of the best unseen catalog
  items (``decision.features``).

Label "retrieve" when the best catalog candidate has the requested shape and the
user's favourite value for every open attribute the user cares about (taste
strength >= ``--min-strength``) at the time of the target; else "generate". The
catalog is a random ``--catalog-fraction`` of the world's items, so many tastes
have no matching item and the head must tell the cases apart from the scores.

Train on the train windows of training users; report macro F1 (as GILL does) on
the windows of held-out users (the world's ``test-users`` split), beside the
best fixed threshold on the best cosine (tuned on train) for comparison.
Once logged feedback says which users clicked retrieved vs generated results,
those labels should replace these (not done yet).

Outputs under ``--out``: ``decision_head/{config.json,model.safetensors}``,
``manifest.json`` (sha256 per file; the gateway refuses a mismatch) and
``metrics.json``. Point ``PIGMENT_DECISION_HEAD`` at ``--out`` and set
``PIGMENT_RETRIEVAL_POLICY=learned``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pigment.services.gateway.decision import (
    SCALAR_FEATURES,
    TOP_FEATURES,
    DecisionHead,
    build_query,
    features,
    query_text,
)
from pigment.training.toy_world import KEYWORD_ORDER, WINDOW, ToyWorld, keyword, parse_caption
from tqdm import tqdm


@dataclass
class DecisionTrainConfig:
    out: str = "runs/decision"
    preset: str = "models/presets/toy"
    world_seed: int = 0
    n_users: int = 400
    n_items: int = 1296
    catalog_fraction: float = 0.25
    min_strength: float = 0.5
    no_prompt_fraction: float = 0.2
    cold_fraction: float = (
        0.1  # windows served as a user without history (prompt only, no keywords)
    )
    history_weight: float = 0.3  # must match Settings.retrieval_history_weight
    query_features: bool = True  # also feed the query vector (ties the head to this CLIP)
    hidden: int = 16  # 0 = GILL's dropout + linear
    dropout: float = 0.1
    steps: int = 400
    lr: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0
    max_samples: int = 0  # 0 = every training window
    progress: bool = True


# --------------------------------------------------------------------------- data


def _request(
    world: ToyWorld, sample, rng: np.random.Generator, cfg: DecisionTrainConfig
) -> tuple[str, list[str], bool]:
    """(prompt, keywords, cold) as a client and the keyword LLM would give them for this window;
    ``cold``: served as a new user (no history, so no keywords and no history embedding)."""
    target = world.item_by_id[sample.target]
    cold = bool(rng.random() < cfg.cold_fraction)
    prompt = (
        f"a {target.attributes['shape']}" if cold or rng.random() >= cfg.no_prompt_fraction else ""
    )
    if cold:
        return prompt, [], True
    named = set(parse_caption(prompt))
    history = [world.item_by_id[i].attributes for i in sample.history]
    return (
        prompt,
        [
            keyword(a, Counter(h[a] for h in history).most_common(1)[0][0])
            for a in KEYWORD_ORDER
            if a not in named
        ],
        False,
    )


def _label(user, sample, world: ToyWorld, prompt: str, best_item, min_strength: float) -> int:
    """1 = the catalog's best item serves this user (requested content + favourite open attributes)."""
    if best_item is None:
        return 0
    taste = user.taste_at(sample.start + WINDOW - 1)
    named = parse_caption(prompt)
    target = world.item_by_id[sample.target].attributes
    for attr, value in best_item.attributes.items():
        if attr in named:
            if value != target[attr]:
                return 0
        elif taste[attr][1] >= min_strength and value != taste[attr][0]:
            return 0
    return 1


def build_dataset(
    world: ToyWorld,
    embedder,
    cfg: DecisionTrainConfig,
    split_names: tuple[str, ...],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels and best cosines for every window of ``split_names``."""
    item_vecs = embedder.embed_images([it.image for it in world.items])
    row_of = {it.item_id: n for n, it in enumerate(world.items)}
    in_catalog = rng.random(len(world.items)) < cfg.catalog_fraction
    catalog = np.flatnonzero(in_catalog)
    samples = [s for name in split_names for s in world.samples(name)]
    if cfg.max_samples and len(samples) > cfg.max_samples:
        samples = [
            samples[i] for i in sorted(rng.choice(len(samples), cfg.max_samples, replace=False))
        ]
    requests = [_request(world, s, rng, cfg) for s in samples]
    texts = sorted({query_text(p, kw) for p, kw, _ in requests} - {""})
    text_vec = dict(zip(texts, embedder.embed_texts(texts))) if texts else {}
    users = {u.user_id: u for u in world.users}
    xs, ys, best = [], [], []
    for s, (prompt, kws, cold) in zip(samples, requests):
        hist = None if cold else item_vecs[[row_of[i] for i in s.history]]
        query, agreement = build_query(
            text_vec.get(query_text(prompt, kws)), hist, cfg.history_weight
        )
        seen = set() if cold else {row_of[i] for i in s.history}
        cand = np.array([c for c in catalog if c not in seen], dtype=np.int64)
        scores = item_vecs[cand] @ query
        order = np.argsort(-scores)[:TOP_FEATURES]
        top = [float(scores[o]) for o in order]
        best_item = world.items[cand[order[0]]] if len(order) else None
        xs.append(
            features(top, agreement, not cold, len(kws), query if cfg.query_features else None)
        )
        ys.append(_label(users[s.user_id], s, world, prompt, best_item, cfg.min_strength))
        best.append(top[0] if top else -1.0)
    return np.stack(xs), np.asarray(ys, dtype=np.float32), np.asarray(best, dtype=np.float32)


# --------------------------------------------------------------------------- metrics


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean of the F1 of class 1 (retrieve) and class 0 (generate)."""
    f1s = []
    for cls in (1, 0):
        tp = float(np.sum((y_pred == cls) & (y_true == cls)))
        fp = float(np.sum((y_pred == cls) & (y_true != cls)))
        fn = float(np.sum((y_pred != cls) & (y_true == cls)))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return float(np.mean(f1s))


def best_threshold(best: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The cosine threshold with the highest macro F1 on (best, y)."""
    grid = np.unique(np.round(best, 3))
    scored = [(macro_f1(y, (best >= t).astype(np.float32)), float(t)) for t in grid]
    f1, thr = max(scored) if scored else (0.0, 0.5)
    return thr, f1


# --------------------------------------------------------------------------- training


def fit_head(
    x: np.ndarray, y: np.ndarray, cfg: DecisionTrainConfig
) -> tuple[dict[str, np.ndarray], list[float]]:
    """Standardise, then train (dropout -> [linear -> ReLU] -> linear) with class-balanced BCE."""
    import torch

    torch.manual_seed(cfg.seed)
    mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-3)
    xt = torch.from_numpy((x - mean) / std).float()
    yt = torch.from_numpy(y).float()
    layers: list[torch.nn.Module] = [torch.nn.Dropout(cfg.dropout)]
    if cfg.hidden:
        layers += [torch.nn.Linear(x.shape[1], cfg.hidden), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(cfg.hidden or x.shape[1], 1))
    net = torch.nn.Sequential(*layers)
    pos = float(yt.mean().clamp(1e-3, 1 - 1e-3))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((1 - pos) / pos))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    threads = torch.get_num_threads()
    # A few thousand rows x ~70 features: more threads only spin-wait on a busy CPU.
    torch.set_num_threads(1)
    try:
        for _ in tqdm(range(cfg.steps), desc="decision head", disable=not cfg.progress):
            loss = loss_fn(net(xt).squeeze(-1), yt)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    weights = {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}
    if cfg.hidden:
        weights |= {
            "w1": linears[0].weight.detach().numpy(),
            "b1": linears[0].bias.detach().numpy(),
        }
    weights |= {"w2": linears[-1].weight.detach().numpy(), "b2": linears[-1].bias.detach().numpy()}
    return weights, losses


def train_decision(cfg: DecisionTrainConfig) -> dict:
    from pigment.models.clip_embedder import ClipEmbedder

    started = time.time()
    world = ToyWorld(seed=cfg.world_seed, n_items=cfg.n_items, n_users=cfg.n_users)
    embedder = ClipEmbedder(cfg.preset)
    x_train, y_train, best_train = build_dataset(
        world, embedder, cfg, ("train",), np.random.default_rng([cfg.seed, 1])
    )
    x_test, y_test, best_test = build_dataset(
        world, embedder, cfg, ("test-users",), np.random.default_rng([cfg.seed, 1])
    )
    weights, losses = fit_head(x_train, y_train, cfg)
    head = DecisionHead(
        {
            "embedding_model": embedder.model_id,
            "dim": embedder.dim,
            "hidden": cfg.hidden,
            "query_features": cfg.query_features,
            "threshold": 0.5,
            "features": list(SCALAR_FEATURES) + (["query"] if cfg.query_features else []),
            "history_weight": cfg.history_weight,
        },
        weights,
    )
    y_head = (head.probabilities(x_test) >= head.threshold).astype(np.float32)
    thr, thr_train_f1 = best_threshold(best_train, y_train)
    metrics = {
        "method": "gill_decision",
        "seconds": round(time.time() - started, 1),
        "embedding_model": embedder.model_id,
        "train_samples": len(y_train),
        "heldout_samples": len(y_test),
        "train_retrieve_fraction": float(y_train.mean()),
        "heldout_retrieve_fraction": float(y_test.mean()),
        "heldout": "windows of the world's test-users (users never seen in training)",
        "macro_f1_heldout": macro_f1(y_test, y_head),
        "threshold_baseline": {
            "threshold": thr,
            "macro_f1_train": thr_train_f1,
            "macro_f1_heldout": macro_f1(y_test, (best_test >= thr).astype(np.float32)),
        },
        "always_generate_macro_f1_heldout": macro_f1(y_test, np.zeros_like(y_test)),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "config": asdict(cfg),
    }
    out = Path(cfg.out)
    head.save(
        out,
        preset="decision",
        version=f"decision-{cfg.seed}",
        training_command=f"pigment train decision --out {cfg.out} --steps {cfg.steps}",
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def run(args) -> int:
    overrides = {
        k: v
        for k, v in vars(args).items()
        if k in DecisionTrainConfig.__dataclass_fields__ and v is not None
    }
    cfg = DecisionTrainConfig(**overrides)
    m = train_decision(cfg)
    print(
        f"decision head: macro F1 {m['macro_f1_heldout']:.3f} on {m['heldout_samples']} held-out windows "
        f"(threshold {m['threshold_baseline']['threshold']:.3f} on the best cosine: "
        f"{m['threshold_baseline']['macro_f1_heldout']:.3f}); written to {cfg.out}"
    )
    return 0


def register(train_sub) -> None:
    p = train_sub.add_parser(
        "decision", help="train the GILL-style retrieve-or-generate head (toy-world labels)"
    )
    p.add_argument("--out", required=True)
    p.add_argument(
        "--preset",
        default=None,
        help="preset whose CLIP embeds the catalog (default models/presets/toy)",
    )
    for name in ("world_seed", "n_users", "n_items", "steps", "hidden", "seed", "max_samples"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    for name in (
        "catalog_fraction",
        "min_strength",
        "no_prompt_fraction",
        "cold_fraction",
        "history_weight",
        "dropout",
        "lr",
    ):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=None)
    p.add_argument(
        "--no-query-features",
        dest="query_features",
        action="store_false",
        default=None,
        help="only the scalar features (the head then works with any CLIP)",
    )
    p.set_defaults(func=lambda args, settings: run(args))
