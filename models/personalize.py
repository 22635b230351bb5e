"""What each signal says about a user's taste, and how feedback on generated images reshapes the keywords.

Design (issue 20). The LLM reads captions, never kinds or values, and retraining it per user is out of
reach, so personalization by feedback happens *around* the LLM, on the keywords:

1. Every interaction and every feedback row becomes a :class:`Signal` with a weight from a documented
   table (``DEFAULT_SIGNAL_WEIGHTS``; a preset may override it in ``preference.json`` ``signal_weights``):
   ratings count relative to the user's own mean, likes/purchases for, dislikes against, clicks and
   views a little. Exact duplicates count once; an optional half-life decays old signals.
2. The LLM reads only the captions the user was *for* (a history of dislikes must not read as a taste);
   its keywords are the prior.
3. Feedback on a generated image is evidence for (or against) the keywords that produced that image:
   the image's keyword list is known exactly (the gateway stored it), so a pick of "blue" over "red" is
   a statement about those keywords, with no model in between. Evidence per keyword is summed, clipped
   to ``feedback_evidence_cap`` (a flood of one-sided feedback saturates instead of growing forever)
   and added to the prior: with a keyword vocabulary, per attribute (each attribute's best-scored
   value wins, so feedback can replace the LLM's colour); without one, over the free keyword list
   (keywords with net negative evidence drop out, liked ones come in).
4. Exploration asks about the least certain attribute: the candidates differ from the best guess in
   exactly that attribute's next-best values, so one pick answers it.
5. After a change point of the whole taste (a round's best rating a star lower than before), the rounds
   are asked whether and where the taste changed (``_change_round``); from there it is re-learnt jointly
   over the attributes from the picks *and* the stars of every candidate, and the candidates are a design
   that varies several attributes at once (``_choose_after_change``): one-attribute variants cannot
   re-ask a taste that moved on every attribute within two rounds.

This module is pure (no database, no services): the gateway reads the rows, the preference core calls it.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

# Weight of one signal by kind. ``rating``: per star above (+) or below (-) the user's own mean rating;
# ``pick``: the chosen image gets +pick, the images not chosen share -pick. Unknown kinds weigh ``default``.
DEFAULT_SIGNAL_WEIGHTS: dict[str, float] = {
    "purchase": 1.5, "like": 1.0, "dislike": -1.0, "rating": 0.5, "pick": 2.0, "click": 0.3, "view": 0.2,
    "default": 0.1,
}
RATING_PRIOR_MEAN, RATING_PRIOR_COUNT = 3.0, 2.0  # a user's mean rating shrinks toward the scale's middle
LLM_PRIOR = 1.0  # score of the keyword the LLM chose for an attribute, before any evidence
UNBACKED_PICK = 0.25  # weight of a pick against the belief that neither the ratings nor a next pick back
UNCERTAIN_MARGIN = 1.5  # an attribute whose best value leads the next by less is asked about (a pick: +2)

# Flags reported back to the caller.
FEEDBACK_APPLIED = "FEEDBACK_APPLIED"
KEYWORDS_CHANGED_BY_FEEDBACK = "KEYWORDS_CHANGED_BY_FEEDBACK"
FEEDBACK_CONTRADICTION_LATEST_WINS = "FEEDBACK_CONTRADICTION_LATEST_WINS"
HISTORY_UNREADABLE = "HISTORY_UNREADABLE"
HISTORY_ALL_NEGATIVE = "HISTORY_ALL_NEGATIVE"
EXPLORED = "EXPLORED"
OPINION_KINDS = ("like", "dislike", "rating")  # one opinion per image: the latest wins


@dataclass(frozen=True)
class Signal:
    """One thing a user did: ``kind``/``value`` at ``ts_ms`` about ``subject`` (an item or a generation)."""

    subject: str
    kind: str
    value: float = 1.0
    ts_ms: int = 0


@dataclass
class FeedbackRow:
    """A feedback row with the keyword lists of the images it is about (read by the gateway)."""

    feedback_id: str
    generation_id: str
    kind: str
    value: float
    ts_ms: int
    keywords: list[str]
    others: list[list[str]] = field(default_factory=list)  # picks: keyword lists of the images not chosen


@dataclass
class FeedbackEvidence:
    scores: dict[str, float]
    used: list[str]
    contradictions: list[str]
    prior_scale: float = 1.0  # weight left to the history's prior: 0 after a change point of the whole taste
    reset: frozenset[str] = frozenset()  # keywords whose prior a change point dropped (what a pick overturned)
    # every round as shown and answered, and the round of the last change point of the whole taste (None:
    # there was none): after one, the keyword choice re-learns the taste jointly (``_choose_after_change``)
    rounds_seen: tuple[RoundSeen, ...] = ()
    change_round: int | None = None


@dataclass(frozen=True)
class RoundSeen:
    """One round of feedback as shown and answered: each rated image (its keywords, its stars) and the pick
    (the chosen image's keywords and the others'; None when the round had no pick)."""

    ratings: tuple[tuple[tuple[str, ...], float], ...]
    chosen: tuple[str, ...] | None = None
    others: tuple[tuple[str, ...], ...] = ()


def rating_mean(values: Iterable[float]) -> float:
    values = list(values)
    return (sum(values) + RATING_PRIOR_MEAN * RATING_PRIOR_COUNT) / (len(values) + RATING_PRIOR_COUNT)


def decay(ts_ms: int, now_ms: int, half_life_s: float) -> float:
    if half_life_s <= 0 or not ts_ms or not now_ms:
        return 1.0
    return 0.5 ** (max(0.0, now_ms - ts_ms) / 1000.0 / half_life_s)


def weigh_signals(signals: Sequence[Signal], table: dict[str, float], half_life_s: float = 0.0,
                  now_ms: int = 0) -> list[tuple[Signal, float]]:
    """(signal, weight) per distinct signal, in the given order; exact duplicates are dropped."""
    unique = list(dict.fromkeys(signals))
    mean = rating_mean(s.value for s in unique if s.kind == "rating")
    out = []
    for s in unique:
        if s.kind == "rating":
            w = table.get("rating", 0.0) * (s.value - mean)
        else:
            w = table.get(s.kind, table.get("default", 0.0))
        out.append((s, w * decay(s.ts_ms, now_ms, half_life_s)))
    return out


def feedback_evidence(rows: Sequence[FeedbackRow], table: dict[str, float], cap: float,
                      half_life_s: float = 0.0, now_ms: int = 0, round_decay: float = 1.0,
                      change_drop: float = 0.0, prior: dict[str, float] | None = None) -> FeedbackEvidence:
    """keyword -> summed evidence of ``rows`` (newest last). Per image, one opinion (like, dislike or
    rating): the latest; a like and a dislike of the same image is a contradiction, resolved by the latest.
    Each pick counts once per chosen image (its latest). A pick opens a round of feedback.

    Old evidence is forgotten at a *change point*, not by age (``change_drop`` > 0 turns it on), so one
    random pick among settled rounds is outvoted while a taste that moved is followed within two rounds.
    A pick *contradicts* when it prefers keywords the belief so far (``prior``, the history's keyword
    scores, plus the evidence) ranks lower; on the keywords the candidates differ on only. Then:
    - the round's best rating also fell ``change_drop`` below the best of earlier rounds, or fell at all
      while the pick contradicts (nothing shown fits as before: the taste moved on more than the asked
      attribute) -> all earlier evidence and the whole prior are dropped.
      ``change_round`` marks it (its index in ``rounds_seen``): with a vocabulary, the keyword choice then
      asks the rounds themselves whether and where the taste changed (``_change_round``) and re-learns
      every attribute jointly from there (``_choose_after_change``);
    - the ratings back the pick (chosen rated above every other image of the round), or the previous
      pick contradicted too -> earlier evidence and prior are dropped for the keywords this pick was
      about (a random click is not backed by the ratings, a moved taste is; picks without ratings need
      two in a row).
    ``round_decay`` < 1 additionally ages evidence per later pick; wall-clock decay (``half_life_s``) is
    separate and optional."""
    latest: dict[tuple[str, str], FeedbackRow] = {}
    kinds_seen: dict[str, set[str]] = defaultdict(set)
    for row in sorted(rows, key=lambda r: r.ts_ms):
        family = "opinion" if row.kind in OPINION_KINDS else row.kind
        if family == "opinion":
            kinds_seen[row.generation_id].add("pos" if _opinion_sign(row) > 0 else "neg")
        latest[(row.generation_id, family)] = row
    kept = sorted(latest.values(), key=lambda r: r.ts_ms)
    pick_times = sorted(r.ts_ms for r in kept if r.kind == "pick")
    rounds = [bisect.bisect_right(pick_times, r.ts_ms) for r in kept]  # a pick opens a round
    centres = _rating_centres(kept, rounds)
    prior = prior or {}
    scores: dict[str, float] = defaultdict(float)
    reset: set[str] = set()
    all_reset, contradicted, fell, best_before, prior_scale = False, False, False, -math.inf, 1.0
    seen: list[RoundSeen] = []
    change_round = None
    for rnd in range(max(rounds, default=-1) + 1):
        members = [(row, c) for row, r, c in zip(kept, rounds, centres) if r == rnd]
        ratings = [row.value for row, _ in members if row.kind == "rating"]
        pick = next((row for row, _ in members if row.kind == "pick"), None)
        unbacked = None
        if change_drop > 0 and pick is not None:
            belief = {kw: (0.0 if all_reset or kw in reset else prior_scale * prior.get(kw, 0.0)) + scores.get(kw, 0.0)
                      for kw in {*pick.keywords, *(k for other in pick.others for k in other)}}
            against = _contradicts(pick, belief)
            drop = best_before - max(ratings) if ratings else 0.0
            if drop >= change_drop or (drop > 0 and (against or fell)):
                scores, all_reset, best_before, change_round = defaultdict(float), True, -math.inf, len(seen)
                drop = 0.0
            elif against and (_rated_best(pick, [row for row, _ in members]) or contradicted or fell):
                for kw in _contrast(pick)[0] | _contrast(pick)[1]:
                    scores.pop(kw, None)
                    reset.add(kw)
            elif against:  # nothing backs it (yet): maybe a random click, it counts for less until confirmed
                unbacked = pick
            contradicted, fell = against, drop > 0
        for kw in scores:
            scores[kw] *= round_decay if rnd else 1.0
        prior_scale *= round_decay if rnd else 1.0
        for row, centre in members:
            weight = UNBACKED_PICK if row is unbacked else 1.0
            _add_row(scores, row, table, centre, weight * decay(row.ts_ms, now_ms, half_life_s))
        if ratings:
            best_before = max(best_before, max(ratings))
        if members:
            seen.append(RoundSeen(tuple((tuple(row.keywords), row.value) for row, _ in members if row.kind == "rating"),
                                   tuple(pick.keywords) if pick else None,
                                   tuple(tuple(o) for o in pick.others) if pick else ()))
    clipped = {k: max(-cap, min(cap, v)) for k, v in scores.items() if abs(v) > 1e-9}
    contradictions = sorted(g for g, signs in kinds_seen.items() if len(signs) > 1)
    return FeedbackEvidence(clipped, sorted(r.feedback_id for r in kept), contradictions,
                            0.0 if all_reset else prior_scale, frozenset(reset), tuple(seen),
                            change_round)


def _rating_centres(kept: Sequence[FeedbackRow], rounds: Sequence[int]) -> list[float]:
    """What each rating is compared with: the mean of its round's ratings when the round rated several
    images (the candidates share most keywords; only what they differ on is rated, so a round rated low
    as a whole says "not this" about no keyword in particular), else the user's own mean."""
    mean = rating_mean(r.value for r in kept if r.kind == "rating")
    per_round: dict[int, list[float]] = defaultdict(list)
    for row, rnd in zip(kept, rounds):
        if row.kind == "rating":
            per_round[rnd].append(row.value)
    return [sum(per_round[rnd]) / len(per_round[rnd]) if len(per_round[rnd]) > 1 else mean for rnd in rounds]


def _add_row(scores: dict[str, float], row: FeedbackRow, table: dict[str, float], centre: float, d: float) -> None:
    if row.kind == "pick":
        w = table.get("pick", 0.0) * d
        _add(scores, row.keywords, w)
        for other in row.others:
            _add(scores, other, -w / max(1, len(row.others)))
    elif row.kind == "rating":
        _add(scores, row.keywords, table.get("rating", 0.0) * (row.value - centre) * d)
    else:
        _add(scores, row.keywords, table.get(row.kind, table.get("default", 0.0)) * d)


def _contrast(pick: FeedbackRow) -> tuple[set[str], set[str]]:
    """(chosen-only, rejected-only) keywords: what the candidates differ on, what the pick answers."""
    chosen = set(pick.keywords)
    rejected = {kw for other in pick.others for kw in other}
    return chosen - rejected, rejected - chosen


def _contradicts(pick: FeedbackRow, belief: dict[str, float]) -> bool:
    """The pick prefers an image the belief ranked lower: for some image not chosen, the belief in what it
    has and the chosen one lacks outweighs the belief in what the chosen one has and it lacks."""
    chosen = set(pick.keywords)
    return any(sum(belief[kw] for kw in set(other) - chosen) > sum(belief[kw] for kw in chosen - set(other))
               for other in pick.others)


def _rated_best(pick: FeedbackRow, members: Sequence[FeedbackRow]) -> bool:
    """The user's ratings agree with the pick: the chosen image rated above every other one of the round."""
    chosen = [r.value for r in members if r.kind == "rating" and r.generation_id == pick.generation_id]
    others = [r.value for r in members if r.kind == "rating" and r.generation_id != pick.generation_id]
    return bool(chosen and others) and chosen[0] >= max(others) and chosen[0] > sum(others) / len(others)


def _opinion_sign(row: FeedbackRow) -> float:
    if row.kind == "rating":
        return row.value - RATING_PRIOR_MEAN
    return 1.0 if row.kind == "like" else -1.0


def _add(scores: dict[str, float], keywords: Iterable[str], w: float) -> None:
    for kw in set(keywords):
        scores[kw] += w


@dataclass
class Choice:
    """The personalised keywords: the best guess, how sure each attribute is, and what to explore."""

    keywords: list[str]
    changed_by_feedback: bool
    variants: list[tuple[str, list[str]]]  # (attribute or "", keywords) alternatives, most informative first


def history_evidence(weighted: Sequence[tuple[str, float]], vocab) -> dict[str, float]:
    """keyword -> share of the history's weight on captions that mention it, in [-1, 1] (vocabulary only)."""
    total = sum(abs(w) for _, w in weighted) or 1.0
    out: dict[str, float] = defaultdict(float)
    for caption, w in weighted:
        text = f" {caption.lower()} "
        for kw in vocab.attribute_of:
            if f" {kw} " in text:
                out[kw] += w / total
    return dict(out)


def prior_scores(llm_keywords: Sequence[str], history: dict[str, float]) -> dict[str, float]:
    """keyword -> what the history alone says (the LLM's choice plus the history evidence): the belief
    that feedback is checked against for contradictions (``feedback_evidence`` ``prior``)."""
    out = dict(history)
    for kw in llm_keywords:
        out[kw] = out.get(kw, 0.0) + LLM_PRIOR
    return out


def choose_keywords(llm_keywords: Sequence[str], vocab, target: str, history: dict[str, float],
                    feedback: dict[str, float], max_keywords: int, prior_scale: float = 1.0,
                    reset: frozenset[str] = frozenset(), explore: FeedbackEvidence | None = None,
                    rounds_seen: Sequence[RoundSeen] = (), change_round: int | None = None) -> Choice:
    """Combine the LLM's keywords and the history evidence (the prior, weighted ``prior_scale``; dropped
    for an attribute with a ``reset`` keyword: a change point overturned it) with feedback evidence into
    the keywords to render. ``rounds_seen``/``change_round`` (from ``FeedbackEvidence``): after a change
    point of the whole taste, the vocabulary attributes are re-learnt jointly from the rounds instead."""
    if vocab.by_attribute:
        return _choose_vocab(llm_keywords, vocab, target, history, feedback, prior_scale, reset, explore,
                             rounds_seen, change_round)
    return _choose_free(llm_keywords, feedback, max_keywords, prior_scale, reset)


def _choose_vocab(llm_keywords, vocab, target, history, feedback, prior_scale=1.0, reset=frozenset(),
                  explore=None, rounds_seen=(), change_round=None) -> Choice:
    named = vocab.attributes_named_in(target)
    last_chosen = set(rounds_seen[-1].chosen or ()) if rounds_seen else set()
    from_llm = {vocab.attribute_of[k]: k for k in llm_keywords if k in vocab.attribute_of}

    def pick(evidence: dict[str, float], scale: float, reset=reset,
             keep: dict[str, str] | None = None) -> tuple[dict[str, str], list[tuple[float, str, list[str]]]]:
        best, margins = {}, []
        for attr, values in vocab.by_attribute.items():
            if attr in named:
                continue
            s = 0.0 if evidence and reset.intersection(values) else scale
            score = {kw: s * ((LLM_PRIOR if from_llm.get(attr) == kw else 0.0) + history.get(kw, 0.0))
                     + evidence.get(kw, 0.0) for kw in values}
            # ties (e.g. a value every candidate of the round shared: the pick says nothing about it) go to
            # what the user chose last, then to the LLM's value
            ranked = sorted(values, key=lambda kw: (-score[kw], kw not in last_chosen,
                                                    kw != from_llm.get(attr), values.index(kw)))
            # an attribute is rendered when the LLM named it or the evidence for a value is positive
            if attr in from_llm or score[ranked[0]] > 0:
                best[attr] = ranked[0]
            gap = score[ranked[0]] - score[ranked[1]] if len(ranked) > 1 else math.inf
            shown = (keep or best).get(attr)
            margins.append((gap, attr, [kw for kw in ranked if kw != shown]))
        return best, margins

    best, margins = pick(feedback, prior_scale)
    prior, _ = pick({}, 1.0)
    if change_round is not None and rounds_seen:
        since = _change_round(vocab, named, prior, rounds_seen)
        if since is not None:
            return _choose_after_change(vocab, named, best, prior, feedback, rounds_seen, since)
    if explore is not None:
        _, margins = pick(explore.scores, explore.prior_scale, explore.reset, keep=best)
    margins.sort(key=lambda m: m[0])  # least certain attribute first
    # Ask about the uncertain attributes (all of them, interleaved, next-best value first): one uncertain
    # attribute -> every candidate differs on it; none -> the least certain one is asked about anyway.
    asked = [m for m in margins if m[0] < UNCERTAIN_MARGIN] or margins[:1]
    queue = [(attr, alts[depth]) for depth in range(max((len(m[2]) for m in asked), default=0))
             for _, attr, alts in asked if depth < len(alts)]
    variants = [(attr, _ordered(vocab, {**best, attr: alt})) for attr, alt in queue]
    return Choice(_ordered(vocab, best), _ordered(vocab, best) != _ordered(vocab, prior), variants)


# After a change point of the whole taste (the best rating of a round fell: nothing shown fits as before),
# the attributes are re-learnt *jointly*, and the next candidates are a design, not one-attribute
# variants. Why: a taste that moved may have moved on every attribute at once, and three variants that
# each change one attribute of a wrong guess test three values a round (six colours, three backgrounds and
# two sizes need more than two rounds of that). Every candidate is rated, so each image's stars say *how
# many* of its values are favourites; images that differ on several attributes at once, chosen so that
# the likely tastes predict different picks and star patterns, let one round's answers tell the
# attributes apart. Only what a rater gives is modelled:
# - the pick prefers images with more favourite values (log-odds PICK_SHARPNESS per value; a random click
#   stays possible);
# - a rating: an image with every favourite value gets the user's best rating so far (the anchor), each
#   missing one costs a share of the scale below it (unknown: averaged over STARS_PER_VALUE), plus noise
#   (RATING_NOISE stars), rounded to whole stars and clipped at the scale's ends. Absolute stars matter: a
#   round rated 2 throughout says none of its values is a favourite, which ratings centred on the round's
#   mean cannot say.
# Where the taste changed is itself asked of the rounds (``_change_round``): the threshold that calls a
# change point sees one round's best rating, so it fires a round late, or on one unluckily rated round
# of a settled user. Each split "one taste before round c, another from c on" is scored by its evidence
# (the likelihood summed over tastes: a new taste must pay for its extra freedom) against "no change",
# with CHANGE_HAZARD the prior chance of a change per round. After the split, the best guess before it
# keeps OLD_GUESS log-odds per value (a real drift outvotes it in one round).
PICK_SHARPNESS = 3.0
RATING_SCALE = (1.0, 5.0)  # the feedback API's star ratings
RATING_NOISE = 0.7
STARS_PER_VALUE = (0.5, 0.75, 1.0)  # fractions of (anchor - lowest star) / attributes lost per missing value
CHANGE_HAZARD = 0.5
OLD_GUESS = 0.5
RATING_DESIGN_WEIGHT = 1.0  # the design's value of distinguishable ratings next to distinguishable picks
MAX_HYPOTHESES = 4096  # tastes scored jointly; larger vocabularies keep each attribute's best-scored values
DESIGN_TASTES, DESIGN_POOL = 512, 64  # the design is planned on the most likely tastes and their images
MAX_DESIGN = 7  # exploration variants planned per round (a request for candidate k takes the k-th)


class _Tastes:
    """Every combination of values of ``attrs`` (a taste), and what a round of feedback says about each."""

    def __init__(self, vocab, attrs: list[str], seen: Sequence[RoundSeen], feedback: dict[str, float]):
        values = {a: sorted(vocab.by_attribute[a], key=lambda kw: -feedback.get(kw, 0.0)) for a in attrs}
        while math.prod(len(v) for v in values.values()) > MAX_HYPOTHESES:
            widest = max(attrs, key=lambda a: len(values[a]))
            values[widest] = values[widest][:-1]
        self.attrs = attrs
        self.hyps = list(itertools.product(*(values[a] for a in attrs)))
        self.table = np.array(self.hyps, dtype=object).reshape(len(self.hyps), len(attrs))
        self.anchor = max((v for rnd in seen for _, v in rnd.ratings), default=RATING_SCALE[1])

    def matches(self, keywords: Sequence[str]) -> np.ndarray:
        """Per taste, how many of the image's values are its favourites."""
        kws = set(keywords)
        return np.array([sum(kw in kws for kw in h) for h in self.hyps], dtype=float)

    def loglik(self, rnd: RoundSeen) -> np.ndarray:
        """log P(the round's stars and pick | taste), per taste."""
        out = np.zeros(len(self.hyps))
        if rnd.ratings:
            m = np.stack([self.matches(kws) for kws, _ in rnd.ratings], axis=1)
            out += _ratings_loglik(m, [v for _, v in rnd.ratings], len(self.attrs), self.anchor)
        if rnd.chosen is not None and rnd.others:
            m = PICK_SHARPNESS * np.stack([self.matches(kws) for kws in (rnd.chosen, *rnd.others)], axis=1)
            out += m[:, 0] - np.logaddexp.reduce(m, axis=1)
        return out


def _open_attributes(vocab, named: set[str], seen: Sequence[RoundSeen]) -> list[str]:
    shown = {kw for rnd in seen for kws, _ in rnd.ratings for kw in kws}
    shown |= {kw for rnd in seen for kws in (rnd.chosen or (), *rnd.others) for kw in kws}
    return [a for a in vocab.by_attribute if a not in named and shown.intersection(vocab.by_attribute[a])]


def _change_round(vocab, named: set[str], prior: dict[str, str], seen: Sequence[RoundSeen]) -> int | None:
    """The round from which a new taste explains the rounds best (None: one taste explains them best)."""
    attrs = _open_attributes(vocab, named, seen)
    if not attrs or len(seen) < 2:
        return None
    tastes = _Tastes(vocab, attrs, seen, {})
    per_round = np.stack([tastes.loglik(rnd) for rnd in seen])
    before = LLM_PRIOR * tastes.matches([prior[a] for a in attrs if a in prior])  # the history's guess
    before -= np.logaddexp.reduce(before)
    fresh = np.full(len(tastes.hyps), -math.log(len(tastes.hyps)))  # a new taste: any, equally

    def evidence(rows: np.ndarray, log_prior: np.ndarray) -> float:
        return float(np.logaddexp.reduce(rows.sum(axis=0) + log_prior)) if len(rows) else 0.0

    n = len(seen) - 1  # chances to change
    best_c, best = None, evidence(per_round, before) + n * math.log(1 - CHANGE_HAZARD)
    for c in range(1, len(seen)):
        score = (evidence(per_round[:c], before) + evidence(per_round[c:], fresh)
                 + math.log(CHANGE_HAZARD) + (n - 1) * math.log(1 - CHANGE_HAZARD))
        if score > best:
            best_c, best = c, score
    return best_c


def _choose_after_change(vocab, named: set[str], best: dict[str, str], prior: dict[str, str],
                         feedback: dict[str, float], seen: Sequence[RoundSeen], change_round: int) -> Choice:
    """The taste since ``change_round``: a posterior over every combination of values of the attributes the
    rounds since showed (``feedback`` scores break ties only), its most likely combination as the best
    guess and, as variants, the images that split the likely tastes into the most distinguishable groups
    of picks and ratings (greedy, so the first k variants are the best k for any N)."""
    attrs = _open_attributes(vocab, named, seen[change_round:])
    if not attrs:
        return Choice(_ordered(vocab, best), _ordered(vocab, best) != _ordered(vocab, prior), [])
    tastes = _Tastes(vocab, attrs, seen, feedback)
    hyps = tastes.hyps
    logp = 1e-3 * np.array([sum(feedback.get(kw, 0.0) for kw in h) for h in hyps])
    logp += sum((tastes.loglik(rnd) for rnd in seen[change_round:]), np.zeros(len(hyps)))
    if OLD_GUESS and change_round:
        old = sum((tastes.loglik(rnd) for rnd in seen[:change_round]), np.zeros(len(hyps)))
        old += LLM_PRIOR * tastes.matches([prior[a] for a in attrs if a in prior])
        logp += OLD_GUESS * tastes.matches(hyps[int(np.argmax(old))])
    post = np.exp(logp - logp.max())
    post /= post.sum()
    top = int(np.argmax(post))
    guess = {**best, **dict(zip(attrs, hyps[top]))}
    # the design: candidate images are the likely tastes' own combinations; each added one is the image
    # whose predicted picks and stars, with those of the images already in the round, split the likely
    # tastes into the groups of largest entropy (a round that every likely taste answers differently)
    order = np.argsort(-post, kind="stable")
    rows_, pool = order[:DESIGN_TASTES], [int(i) for i in order[:DESIGN_POOL]]
    weight = post[rows_] / post[rows_].sum()
    counts = (tastes.table[rows_][:, None, :] == tastes.table[pool][None, :, :]).sum(axis=2).astype(int)
    design, variants = [0], []  # pool[0] is the best guess
    for _ in range(min(MAX_DESIGN, len(pool) - 1)):
        value = {j: _design_value(counts[:, design + [j]], weight) for j in range(len(pool)) if j not in design}
        j = max(value, key=lambda j: (value[j], -j))
        design.append(j)
        variant = {**guess, **dict(zip(attrs, hyps[pool[j]]))}
        variants.append(("+".join(a for a in attrs if variant[a] != guess[a]), _ordered(vocab, variant)))
    return Choice(_ordered(vocab, guess), _ordered(vocab, guess) != _ordered(vocab, prior), variants)


def _ratings_loglik(m: np.ndarray, stars: Sequence[float], n_attrs: int, anchor: float) -> np.ndarray:
    """log P(stars | taste) per taste (rows of ``m``: each rated image's number of favourite values), under
    the rater model above, averaged over the unknown stars per value."""
    lo, hi = RATING_SCALE
    stars = np.asarray(stars, dtype=float)
    upper = np.where(stars >= hi, np.inf, stars + 0.5)
    lower = np.where(stars <= lo, -np.inf, stars - 0.5)
    out = []
    for frac in STARS_PER_VALUE:
        mu = anchor - frac * (anchor - lo) / max(1, n_attrs) * (n_attrs - m)
        p = _phi((upper - mu) / RATING_NOISE) - _phi((lower - mu) / RATING_NOISE)
        out.append(np.log(np.maximum(p, 1e-9)).sum(axis=1))
    return np.logaddexp.reduce(np.stack(out), axis=0) - math.log(len(STARS_PER_VALUE))


_erf = np.vectorize(math.erf, otypes=[float])


def _phi(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))


def _design_value(cols: np.ndarray, weight: np.ndarray) -> float:
    """How well a round of these images tells the likely tastes apart: by the pick (which images are best
    for each taste) plus, weighted RATING_DESIGN_WEIGHT, the stars (each image's number of favourites)."""
    picks = cols == cols.max(axis=1, keepdims=True)
    return _partition_entropy(picks, weight) + RATING_DESIGN_WEIGHT * _partition_entropy(cols, weight)


def _partition_entropy(keys: np.ndarray, weight: np.ndarray) -> float:
    groups: dict[bytes, float] = defaultdict(float)
    for key, p in zip(keys, weight):
        groups[key.tobytes()] += float(p)
    return -sum(p * math.log(p) for p in groups.values() if p > 0)


def _ordered(vocab, chosen: dict[str, str]) -> list[str]:
    return [chosen[a] for a in vocab.by_attribute if a in chosen]


def _choose_free(llm_keywords, feedback, max_keywords, prior_scale=1.0, reset=frozenset()) -> Choice:
    score = {kw: 0.0 if kw in reset else LLM_PRIOR * prior_scale for kw in llm_keywords}
    for kw, v in feedback.items():
        score[kw] = score.get(kw, 0.0) + v
    order = sorted((kw for kw, v in score.items() if v > 0), key=lambda kw: (-score[kw], kw not in llm_keywords))
    keywords = order[:max_keywords]
    return Choice(keywords, keywords != list(llm_keywords)[:max_keywords], [])
