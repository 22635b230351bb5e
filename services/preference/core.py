"""Preference core: the LLM encoder (+ the active Pigeon adapter), loaded lazily once per process.

With a registry, every ``encode`` uses the ``pigeon_lora`` version active at that
moment: one encoder per version (LRU), its adapter checked against the
registry's sha256 before it loads (a modified file is refused, never served), so a
promotion reaches the gateway without a restart. The version used is remembered
per thread (``used_versions``) so the gateway stamps on the request exactly the
version that wrote its keywords, even if a promotion lands in between.

Exploration (``explore_rate`` > 0): that fraction of keyword encodes is served
with some attributes' keywords resampled from the preset's vocabulary (without
one: a keyword list sampled from the LLM) and the flag ``EXPLORED``, so the images users pick between differ in their keywords
(what Pigeon DPO learns from). Off by default.

``personalize`` is what the gateway calls (issue 20): the history weighed by what each interaction
means, feedback on the user's earlier images as evidence for and against their keywords, and, for
candidate k > 0 of a round, a variant of the best guess on the least certain attribute (see
models/personalize.py for the design and why it works around the LLM, not inside it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import threading
from collections import OrderedDict
from collections.abc import Callable
from threading import Lock

from pigment.models import personalize as pz
from pigment.services.common import metrics

PIGEON_KIND = "pigeon_lora"
EXPLORED = pz.EXPLORED


class PreferenceCore:
    def __init__(self, encoder_factory: Callable, registry=None, explore_rate: float = 0.0, explore_seed: int = 0,
                 max_versions: int = 2):
        self._factory = encoder_factory  # () -> encoder; (adapter_dir=PATH) -> encoder with that Pigeon adapter
        self.registry = registry
        self.explore_rate = explore_rate
        self._rng = random.Random(explore_seed)
        self._encoders: OrderedDict[str | None, object] = OrderedDict()
        self._max_versions = max_versions
        self._lock = Lock()  # one generation at a time per encoder: no state crosses users
        self._build_lock = Lock()
        self._used = threading.local()

    @property
    def encoder(self):
        """The preset's encoder (no adapter)."""
        return self._encoder_for(None)

    def active_version(self) -> str | None:
        if self.registry is None:
            return None
        entry = self.registry.active(PIGEON_KIND)
        return entry.version if entry is not None else None

    def _encoder_for(self, version: str | None):
        with self._build_lock:  # one load at a time (model loading is not thread-safe); others wait for it
            with self._lock:
                if version in self._encoders:
                    self._encoders.move_to_end(version)
                    metrics.PREFERENCE_CACHE.labels("hit").inc()
                    return self._encoders[version]
            metrics.PREFERENCE_CACHE.labels("miss").inc()
            if version is None:
                encoder = self._factory()
            else:
                path = self.registry.verify(version)  # AdapterMismatch (FAILED_PRECONDITION) when modified
                encoder = self._factory(adapter_dir=path)
            with self._lock:
                self._encoders[version] = encoder
                while len(self._encoders) > self._max_versions + 1:  # + the preset's own encoder
                    oldest = next(v for v in self._encoders if v is not None and v != version)
                    self._encoders.pop(oldest)
            return encoder

    def encode(self, captions, target: str = "", method: str = "pmg"):
        version = self.active_version()
        encoder = self._encoder_for(version)
        self._used.versions = {PIGEON_KIND: version} if version else {}
        with self._lock:
            pref = encoder.encode(list(captions), target=target, method=method)
            if self.explore_rate > 0 and pref.keywords and self._rng.random() < self.explore_rate:
                if encoder.vocab.by_attribute:
                    pref = explore(pref, encoder.vocab, target, self._rng, captions)
                else:  # no closed vocabulary: the alternative list is sampled from the LLM itself
                    pref = explore_sampled(pref, encoder, target, self._rng, captions)
        return pref

    def personalize(self, history, feedback=(), target: str = "", method: str = "pmg", candidate: int = 0,
                    half_life_s: float = 0.0, now_ms: int = 0):
        """``history``: HistoryEntry list (newest first, as the history service returns it); ``feedback``:
        FeedbackRow list. Candidate 0 is the best guess; k > 0 the k-th exploration variant."""
        version = self.active_version()
        encoder = self._encoder_for(version)
        self._used.versions = {PIGEON_KIND: version} if version else {}
        cfg = encoder.cfg
        table = {**pz.DEFAULT_SIGNAL_WEIGHTS, **(cfg.get("signal_weights") or {})}
        signals = [(pz.Signal(h.item.item_id, h.interaction.kind or "view", float(h.interaction.value),
                              int(h.interaction.timestamp_ms)), h.item.caption) for h in reversed(list(history))]
        caption_of = {sig: c for sig, c in signals}
        weighted = [(caption_of[sig], w) for sig, w in pz.weigh_signals([s for s, _ in signals], table, half_life_s,
                                                                         now_ms)]
        flags = []
        captions = [c for c, w in weighted if w > 0]  # the LLM reads what the user was for, oldest first
        if weighted and not captions:
            flags.append(pz.HISTORY_ALL_NEGATIVE)
        if captions and encoder.readable_fraction(captions) < float(cfg.get("min_readable_fraction", 0.0)):
            flags.append(pz.HISTORY_UNREADABLE)  # no taste is invented from tokens the model cannot read
            captions, weighted = [], []
        with self._lock:
            base = encoder.encode(captions, target=target, method=method)
            hist = pz.history_evidence(weighted, encoder.vocab) if encoder.vocab.by_attribute else {}

            def evidence_for(round_decay: float):
                return pz.feedback_evidence(feedback, table, float(cfg.get("feedback_evidence_cap", 4.0)),
                                            half_life_s, now_ms, round_decay,
                                            float(cfg.get("feedback_change_drop", 0.0)),
                                            pz.prior_scores(base.keywords, hist))

            evidence = evidence_for(float(cfg.get("feedback_round_decay", 1.0)))
            keywords, explored, changed = base.keywords, "", False
            if method in ("pmg", "pmg_keywords"):
                # what to ask next is planned on fast-forgetting evidence (a taste that may have moved is
                # re-tested), what to show as the best guess on the steady one (a random pick is outvoted)
                fast = float(cfg.get("feedback_explore_decay", 0.0))
                choice = pz.choose_keywords(base.keywords, encoder.vocab, target, hist, evidence.scores,
                                            int(cfg["max_keywords"]), evidence.prior_scale, evidence.reset,
                                            evidence_for(fast) if fast and feedback else None,
                                            evidence.rounds_seen, evidence.change_round)
                keywords, changed = encoder.vocab.validate(choice.keywords, target)[0], choice.changed_by_feedback
                if candidate > 0:
                    keywords, explored = self._variant(encoder, choice, keywords, captions, target, candidate,
                                                       base.cache_key)
                elif self.explore_rate > 0 and keywords and self._rng.random() < self.explore_rate:
                    pref = dataclasses.replace(base, keywords=keywords)
                    pref = (explore(pref, encoder.vocab, target, self._rng, captions) if encoder.vocab.by_attribute
                            else explore_sampled(pref, encoder, target, self._rng, captions))
                    keywords, explored = pref.keywords, "*" if EXPLORED in pref.flags else ""
        flags += [f for f in base.flags if f != EXPLORED]
        if evidence.used:
            flags.append(pz.FEEDBACK_APPLIED)
        if changed and evidence.scores:
            flags.append(pz.KEYWORDS_CHANGED_BY_FEEDBACK)
        if evidence.contradictions:
            flags.append(pz.FEEDBACK_CONTRADICTION_LATEST_WINS)
        if explored:
            flags.append(EXPLORED)
        # the cache key names everything the answer depends on: new feedback (or a new candidate) changes it
        blob = json.dumps([base.cache_key, sorted(evidence.scores.items()), candidate, keywords])
        return dataclasses.replace(base, keywords=keywords, flags=flags, feedback_used=evidence.used,
                                   explored_attribute=explored,
                                   cache_key=hashlib.sha256(blob.encode()).hexdigest()[:32])

    @staticmethod
    def _variant(encoder, choice, keywords, captions, target, candidate: int, key: str) -> tuple[list[str], str]:
        """Candidate k's keywords: the k-th variant on the least certain attribute(s); without a vocabulary,
        a keyword list sampled from the LLM (seeded by the request, so a replay gets the same list)."""
        if choice.variants:
            attr, kws = choice.variants[(candidate - 1) % len(choice.variants)]
            return encoder.vocab.validate(kws, target)[0], attr
        if not captions:
            return keywords, ""
        seed = int(hashlib.sha256(f"{key}:{candidate}".encode()).hexdigest()[:8], 16)
        alternative = encoder.sample_keywords(captions, target, seed=seed)
        return (alternative, "*") if alternative and alternative != keywords else (keywords, "")

    def clear_cache(self) -> None:
        """Forget every cached preference (GDPR deletion: a cached entry may come from the deleted history)."""
        with self._build_lock, self._lock:
            for encoder in self._encoders.values():
                cache = getattr(encoder, "_cache", None)
                if cache is not None:
                    cache.clear()

    def used_versions(self) -> dict[str, str] | None:
        """{kind: version} of the preference adapters the calling thread's last ``encode`` used, read once
        (None when this thread has not encoded since the last read, e.g. a non-personalized request)."""
        return self._used.__dict__.pop("versions", None)


def explore(pref, vocab, target: str, rng: random.Random, captions=()):
    """A copy of ``pref`` with each open attribute's keyword resampled with probability 1/2 (at least one changes).

    Alternatives are the attribute's keywords the history mentions (plausible tastes, as sampling the LLM
    would propose), else any of the vocabulary's."""
    if not vocab.by_attribute:
        return pref
    named = vocab.attributes_named_in(target)
    current = {vocab.attribute_of.get(k): k for k in pref.keywords}
    attrs = [a for a in vocab.by_attribute if a not in named]
    if not attrs:
        return pref
    seen = " " + " ".join(str(c).lower() for c in captions) + " "
    forced = rng.choice(attrs)
    chosen = dict(current)
    for attr in attrs:
        if attr == forced or rng.random() < 0.5:
            others = [k for k in vocab.by_attribute[attr] if k != current.get(attr)]
            mentioned = [k for k in others if f" {k} " in seen]
            chosen[attr] = rng.choice(mentioned or others)
    keywords = [chosen[a] for a in vocab.by_attribute if a in chosen and a is not None and a not in named]
    return dataclasses.replace(pref, keywords=keywords, flags=[*pref.flags, EXPLORED])


def explore_sampled(pref, encoder, target: str, rng: random.Random, captions=(), tries: int = 3):
    """A copy of ``pref`` whose keywords are a list sampled from the LLM (temperature 1), when one differs."""
    for _ in range(tries):
        alternative = encoder.sample_keywords(list(captions), target, seed=rng.randrange(2**31))
        if alternative and alternative != pref.keywords:
            return dataclasses.replace(pref, keywords=alternative, flags=[*pref.flags, EXPLORED])
    return pref
