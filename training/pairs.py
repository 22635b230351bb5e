"""Preference pairs (chosen, rejected) from logged feedback, for DPO-style training.

Pure functions over SQL rows (anything with the ``feedback`` / ``generations``
columns as attributes); ``load_feedback`` reads them. Sources, strongest first:

- **pick**: the user chose ``generation_id`` over each of ``other_generation_ids``
  (the candidates shown with it).
- **explicit**: for the same user and the same target prompt, a liked or
  highly rated generation (rating >= ``high``) over a disliked or lowly rated one
  (rating <= ``low``). A user's latest signal on a generation wins; clicks are
  too weak to pair on.
- **auto** (``auto_pairs``): best vs worst of several candidates by a scorer that
  must not be the evaluation metric (selecting with the evaluator flatters it).

Each user contributes at most ``max_per_user`` pairs per round (picks first, then
the widest margins), so one user flooding feedback cannot outweigh the others.
A pair contradicted by the same user (A over B and B over A) is dropped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

SOURCE_RANK = {"pick": 0, "explicit": 1, "auto": 2}


@dataclass(frozen=True)
class Pair:
    user_id: str
    prompt: str
    chosen: str  # generation id
    rejected: str  # generation id
    source: str  # pick | explicit | auto
    margin: float = 1.0


@dataclass(frozen=True)
class GenerationInfo:
    """What a pair needs of a generation: its owner, its target prompt and the request it came from."""

    generation_id: str
    user_id: str
    prompt: str
    request_id: str = ""
    storage_uri: str | None = None
    model_version: str = ""
    adapter_version: str | None = None
    retrieved_item_id: str | None = None  # a catalog image shown instead of a rendered one


def polarity(kind: str, value: float, high: float = 4.0, low: float = 2.0) -> float | None:
    """A signal's strength: > 0 preferred, < 0 rejected, None when it cannot be paired on."""
    if kind == "like":
        return 1.0
    if kind == "dislike":
        return -1.0
    if kind == "rating" and (value >= high or value <= low):
        return value - (high + low) / 2
    return None


def pick_pairs(feedback: Iterable, generations: Mapping[str, GenerationInfo]) -> list[Pair]:
    out = []
    for fb in feedback:
        if fb.kind != "pick" or fb.generation_id not in generations:
            continue
        prompt = generations[fb.generation_id].prompt
        for other in fb.other_generation_ids or []:
            if other != fb.generation_id and other in generations:
                out.append(Pair(fb.user_id, prompt, fb.generation_id, other, "pick", 1.0))
    return out


def explicit_pairs(feedback: Iterable, generations: Mapping[str, GenerationInfo], high: float = 4.0,
                   low: float = 2.0) -> list[Pair]:
    latest: dict[tuple[str, str], tuple] = {}  # (user, generation) -> (time, polarity)
    for fb in feedback:
        pol = polarity(fb.kind, fb.value, high, low)
        if pol is None or fb.generation_id not in generations:
            continue
        key = (fb.user_id, fb.generation_id)
        stamp = (getattr(fb, "created_at", None) or datetime.min, fb.feedback_id)
        if key not in latest or stamp >= latest[key][0]:
            latest[key] = (stamp, pol)
    groups: dict[tuple[str, str], list[tuple[str, float]]] = defaultdict(list)
    for (user, gid), (_, pol) in sorted(latest.items()):
        groups[(user, generations[gid].prompt)].append((gid, pol))
    out = []
    for (user, prompt), scored in groups.items():
        for good, gp in scored:
            for bad, bp in scored:
                if gp > 0 > bp:
                    out.append(Pair(user, prompt, good, bad, "explicit", gp - bp))
    return out


def auto_pairs(candidates: Mapping[str, Sequence[GenerationInfo]], scorer: Callable[[GenerationInfo], float],
               evaluator: Callable | None = None, min_gap: float = 0.0) -> list[Pair]:
    """Best vs worst of each group of candidates (e.g. one request's images) by ``scorer``.

    ``scorer`` must not be the evaluation metric: pass the evaluator too and a mistake is refused."""
    if evaluator is not None and scorer is evaluator:
        raise ValueError("auto pairs must be scored by a model that is not the evaluation metric")
    out = []
    for group in candidates.values():
        if len(group) < 2:
            continue
        scored = sorted(((scorer(g), g.generation_id, g) for g in group), key=lambda t: (t[0], t[1]))
        (lo, _, worst), (hi, _, best) = scored[0], scored[-1]
        if hi - lo > min_gap:
            out.append(Pair(best.user_id, best.prompt, best.generation_id, worst.generation_id, "auto", hi - lo))
    return out


def cap_per_user(pairs: Iterable[Pair], max_per_user: int) -> list[Pair]:
    """Deduplicate, drop contradicted pairs, keep each user's strongest ``max_per_user`` (picks, then margin)."""
    unique: dict[tuple[str, str, str], Pair] = {}
    for p in sorted(pairs, key=lambda p: (SOURCE_RANK[p.source], -p.margin)):
        unique.setdefault((p.user_id, p.chosen, p.rejected), p)
    kept = [p for k, p in unique.items() if (k[0], k[2], k[1]) not in unique]
    by_user: dict[str, list[Pair]] = defaultdict(list)
    for p in kept:
        by_user[p.user_id].append(p)
    out = []
    for user in sorted(by_user):
        ranked = sorted(by_user[user], key=lambda p: (SOURCE_RANK[p.source], -p.margin, p.chosen, p.rejected))
        out.extend(ranked[:max_per_user])
    return out


def build_pairs(feedback: Sequence, generations: Mapping[str, GenerationInfo], max_per_user: int = 32,
                high: float = 4.0, low: float = 2.0, extra: Iterable[Pair] = ()) -> list[Pair]:
    """All pairs of one training round: picks + explicit (+ ``extra``, e.g. auto pairs), capped per user.

    Feedback whose user does not own the generation is ignored (the gateway refuses it anyway)."""
    own = [fb for fb in feedback if fb.generation_id in generations
           and generations[fb.generation_id].user_id == fb.user_id]
    return cap_per_user([*pick_pairs(own, generations), *explicit_pairs(own, generations, high, low), *extra],
                        max_per_user)


def load_feedback(session, since: datetime | None = None) -> tuple[list, dict[str, GenerationInfo]]:
    """Feedback rows (optionally since a time) and every generation they mention, with its target prompt."""
    from pigment.services.store.tables import Feedback, Generation, RenderRequest
    from sqlalchemy import select

    query = select(Feedback).order_by(Feedback.created_at, Feedback.feedback_id)
    if since is not None:
        query = query.where(Feedback.created_at >= since)
    feedback = list(session.scalars(query))
    ids = {fb.generation_id for fb in feedback} | {o for fb in feedback for o in fb.other_generation_ids or []}
    rows = session.execute(select(Generation, RenderRequest.params).join(
        RenderRequest, RenderRequest.request_id == Generation.request_id).where(Generation.generation_id.in_(ids)))
    generations = {g.generation_id: GenerationInfo(g.generation_id, g.user_id, (params or {}).get("prompt", ""),
                                                   g.request_id, g.storage_uri, g.model_version, g.adapter_version,
                                                   g.retrieved_item_id)
                   for g, params in rows}
    return feedback, generations


def candidates_by_request(generations: Iterable[GenerationInfo]) -> dict[str, list[GenerationInfo]]:
    """The images shown together: the generations of one request."""
    groups: dict[str, list[GenerationInfo]] = defaultdict(list)
    for g in generations:
        groups[g.request_id].append(g)
    return dict(groups)
