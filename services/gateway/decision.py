"""GILL-style decision: return a catalog item, or generate. No grpc, no torch at import.

GILL keeps CLIP frozen, maps the LLM's [IMG] state into CLIP's space to score a
precomputed catalog, and lets a small head (dropout + linear) choose between the
best catalog image and a generated one (METHODS.md, "GILL"). Here:

* **Query.** A vector in the item index's CLIP space, built from the request
  and the preference encoding (``build_query``).
* **Candidates.** ``HistoryCore.search`` over the FAISS item index: only public
  items and the user's tenant's items, minus items the user already interacted
  with unless ``include_seen``; both filters run inside the search.
* **Policy.** ``threshold`` retrieves when the best cosine >= a configured
  threshold; ``learned`` asks a small head (``DecisionHead``, trained by
  ``pigment train decision``) for P(retrieve) from the scores and the query.
* **Modes.** ``auto`` follows the policy; ``retrieve_only`` always returns items
  (FAILED_PRECONDITION when none is visible); ``both`` returns items and renders.

``Decision.reason`` says in words what happened and what to change to get the
other outcome.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pigment.services.common.errors import FailedPrecondition, InvalidInput, ModelNotReady
from pigment.services.gateway.core import Decision, RetrievedItem
from pigment.services.store.db import transaction
from pigment.services.store.tables import Item
from sqlalchemy import select

POLICIES = ("threshold", "learned")
TOP_FEATURES = 5  # candidates whose scores feed the features (mean of top-5)
SCALAR_FEATURES = ("best", "gap", "mean_top", "text_history_cos", "has_history", "keyword_fraction")
MAX_KEYWORDS = 4  # normaliser for keyword_fraction (the toy world has four attributes)
HEAD_COMPONENT = "decision_head"
HEAD_CONFIG = "config.json"
HEAD_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class DecisionConfig:
    """How the decider scores and decides (from ``Settings.retrieval_*`` and ``decision_head``)."""

    policy: str = "threshold"
    """``threshold`` | ``learned``."""
    threshold: float | None = None
    """threshold policy: retrieve when the best catalog cosine is at least this. None (the preset tuned
    none for its CLIP; a random CLIP scores every item alike) never retrieves under ``auto``."""
    history_weight: float = 0.3
    """Weight of the mean history image embedding in the query (the rest is the text)."""
    head_dir: Path | None = None
    """learned policy: a directory written by ``pigment train decision``."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise InvalidInput(
                f"retrieval_policy={self.policy!r} is unknown: allowed {', '.join(POLICIES)}"
            )
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise InvalidInput(
                f"retrieval_threshold={self.threshold} is out of range: allowed -1.0..1.0 (cosine)"
            )
        if not 0.0 <= self.history_weight <= 1.0:
            raise InvalidInput(
                f"retrieval_history_weight={self.history_weight} is out of range: allowed 0.0..1.0"
            )
        if self.policy == "learned" and self.head_dir is None:
            raise InvalidInput(
                "retrieval_policy='learned' needs decision_head (a directory from "
                "`pigment train decision --out DIR`)"
            )


# --------------------------------------------------------------------------- query and features


def query_text(prompt: str, keywords: Sequence[str]) -> str:
    """What the CLIP text encoder reads: the requested content, then the explicit taste."""
    return ", ".join(p for p in [prompt.strip(), *keywords] if p)


def _unit(x: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(x))
    return x / n if n > 0 else x


def build_query(
    text_vec: np.ndarray | None, history_vecs: np.ndarray | None, history_weight: float
) -> tuple[np.ndarray | None, float]:
    """The query vector and cos(text, history mean) (0 when either side is missing).

    Why a blend: the CLIP *text* embedding of "prompt, keywords" carries what
    the request asks for (the content) plus the taste the LLM could put into
    words, and it lives in the same space as the item images. The *mean image
    embedding of the user's history* carries the taste keywords miss (keywords
    can be rejected, truncated or absent) and is what the catalog items are
    embedded from. It also carries the content of past items (other shapes, say),
    which would pull the search away from what was asked for, so it gets the
    smaller weight. Both are unit vectors; the blend is renormalised, so scores
    stay cosines.
    """
    hist = (
        _unit(history_vecs.mean(axis=0)) if history_vecs is not None and len(history_vecs) else None
    )
    if text_vec is None:
        return hist, 0.0
    text_vec = _unit(np.asarray(text_vec, dtype=np.float32))
    if hist is None:
        return text_vec, 0.0
    query = _unit((1.0 - history_weight) * text_vec + history_weight * hist).astype(np.float32)
    return query, float(text_vec @ hist)


def features(
    scores: Sequence[float],
    text_history_cos: float,
    has_history: bool,
    n_keywords: int,
    query: np.ndarray | None = None,
) -> np.ndarray:
    """Decision-head input: ``SCALAR_FEATURES`` (then the query vector, when given).

    Missing candidates count as cosine -1 (nothing in the catalog).
    """
    top = list(scores[:TOP_FEATURES]) + [-1.0] * max(0, TOP_FEATURES - len(scores))
    scalars = [
        top[0],
        top[0] - top[1],
        float(np.mean(top)),
        text_history_cos,
        float(has_history),
        min(n_keywords, MAX_KEYWORDS) / MAX_KEYWORDS,
    ]
    parts = [np.asarray(scalars, dtype=np.float32)]
    if query is not None:
        parts.append(np.asarray(query, dtype=np.float32).ravel())
    return np.concatenate(parts)


# --------------------------------------------------------------------------- the learned head


class DecisionHead:
    """Standardise -> (ReLU hidden layer) -> linear -> sigmoid, in numpy.

    Weights (``model.safetensors``): ``mean``, ``std``, optional ``w1``/``b1``,
    ``w2``/``b2``. ``config.json``: ``embedding_model``, ``dim``,
    ``query_features``, ``hidden``, ``threshold``, ``features``. The directory
    holds a loader-style ``manifest.json`` with a sha256 per file; ``load``
    refuses any mismatch before reading a byte of weights.
    """

    def __init__(self, config: dict, weights: dict[str, np.ndarray]):
        self.config = config
        self.w = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
        self.threshold = float(config.get("threshold", 0.5))

    @classmethod
    def load(cls, head_dir: str | Path) -> DecisionHead:
        from pigment.models.loader import (
            ModelIntegrityError,
            component_dir,
            read_manifest,
            sha256_file,
        )
        from safetensors.numpy import load_file

        try:
            entry = read_manifest(head_dir)["components"][HEAD_COMPONENT]
            comp = component_dir(head_dir, HEAD_COMPONENT)
            for rel, expected in entry["files"].items():
                if not (comp / rel).is_file() or sha256_file(comp / rel) != expected:
                    raise ModelIntegrityError(
                        f"{comp / rel} is missing or its sha256 differs from the manifest"
                    )
            config = json.loads((comp / HEAD_CONFIG).read_text())
            weights = load_file(str(comp / HEAD_WEIGHTS))
        except (ModelIntegrityError, KeyError, OSError, ValueError) as exc:
            raise ModelNotReady(f"decision head at {head_dir} cannot be used: {exc}") from None
        return cls(config, weights)

    def save(self, out_dir: str | Path, **meta) -> Path:
        """Write config + safetensors under ``out_dir/decision_head`` and a manifest with sha256s."""
        from pigment.models.loader import write_manifest
        from safetensors.numpy import save_file

        out = Path(out_dir)
        comp = out / HEAD_COMPONENT
        comp.mkdir(parents=True, exist_ok=True)
        (comp / HEAD_CONFIG).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        save_file({k: np.ascontiguousarray(v) for k, v in self.w.items()}, str(comp / HEAD_WEIGHTS))
        write_manifest(
            out, {HEAD_COMPONENT: {"path": HEAD_COMPONENT, "kind": HEAD_COMPONENT}}, **meta
        )
        return out

    def check_space(self, embedding_model: str, dim: int) -> None:
        if self.config.get("query_features") and (
            self.config.get("embedding_model"),
            self.config.get("dim"),
        ) != (embedding_model, dim):
            raise FailedPrecondition(
                f"decision head was trained on {self.config.get('embedding_model')} (dim {self.config.get('dim')}), "
                f"the item index uses {embedding_model} (dim {dim}): retrain with `pigment train decision`"
            )

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """P(retrieve) for each row of ``x`` (n, n_features)."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float32))
        if x.shape[1] != self.w["mean"].shape[0]:
            raise FailedPrecondition(
                f"decision head expects {self.w['mean'].shape[0]} features, got {x.shape[1]}: "
                "retrain it with `pigment train decision`"
            )
        h = (x - self.w["mean"]) / self.w["std"]
        if "w1" in self.w:
            h = np.maximum(h @ self.w["w1"].T + self.w["b1"], 0.0)
        logits = (h @ self.w["w2"].T + self.w["b2"])[:, 0]
        return 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))

    def probability(self, x: np.ndarray) -> float:
        return float(self.probabilities(x)[0])


# --------------------------------------------------------------------------- the decider


@dataclass
class _Verdict:
    retrieve: bool
    score: float
    reason: str


class Decider:
    """``decide(user_id, params, history, preference) -> Decision`` for the gateway.

    ``history_core`` is the HistoryCore (its embedder, index and ``search``).
    """

    def __init__(self, history_core, config: DecisionConfig):
        self.history = history_core
        self.config = config
        self._head: tuple[Path, DecisionHead] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, history_core, settings, preset_threshold: float | None = None) -> Decider:
        """``preset_threshold``: the preset's own (manifest ``retrieval.threshold``), unless settings set one."""
        threshold = settings.retrieval_threshold
        return cls(
            history_core,
            DecisionConfig(
                policy=settings.retrieval_policy,
                threshold=preset_threshold if threshold is None else threshold,
                history_weight=settings.retrieval_history_weight,
                head_dir=settings.decision_head,
            ),
        )

    # -- the query ----------------------------------------------------------------
    def query(self, params, history, preference) -> tuple[np.ndarray | None, float, int]:
        """(query vector or None, cos(text, history), number of keywords)."""
        embedder = self.history.embedder
        keywords = list(preference.keywords) if preference is not None else []
        text = query_text(params.prompt, keywords)
        text_vec = embedder.embed_texts([text])[0] if text else None
        # non_personalized (preference None) asked for no personalization: the history stays out.
        hist = self._history_vectors(history, embedder) if preference is not None else None
        query, agreement = build_query(text_vec, hist, self.config.history_weight)
        return query, agreement, len(keywords)

    def _history_vectors(self, history, embedder) -> np.ndarray | None:
        ids = list({h.item.item_id for h in history})
        if not ids:
            return None
        with transaction(self.history.sessions) as s:
            blobs = list(
                s.scalars(
                    select(Item.embedding).where(
                        Item.item_id.in_(ids),
                        Item.embedding_model == embedder.model_id,
                        Item.deleted.is_(False),
                    )
                )
            )
        vecs = [np.frombuffer(b, dtype=np.float32) for b in blobs if b]
        vecs = [v for v in vecs if v.size == embedder.dim and np.isfinite(v).all()]
        return np.stack(vecs) if vecs else None

    # -- the decision ---------------------------------------------------------------
    def decide(self, user_id: str, params, history, preference) -> Decision:
        query, agreement, n_kw = self.query(params, history, preference)
        hits = []
        if query is not None:
            k = min(1000, max(params.num_images, TOP_FEATURES))
            hits = self.history.search(
                vector=query, k=k, user_id=user_id, include_seen=params.include_seen
            )
        scores = [s for _, s in hits]
        shown = [
            RetrievedItem(rec.item_id, float(s), rec.image_uri) for rec, s in hits if rec.image_uri
        ]
        shown = shown[: params.num_images]
        verdict = self._verdict(
            query, scores, agreement, bool(history) and preference is not None, n_kw, params
        )
        mode = params.retrieval
        if mode == "auto":
            if verdict.retrieve and shown:
                note = (
                    ""
                    if len(shown) == params.num_images
                    else (
                        f"; {len(shown)} of {params.num_images} requested: no more visible catalog items with images"
                    )
                )
                return Decision(
                    self.config.policy, True, False, verdict.score, verdict.reason + note, shown
                )
            reason = verdict.reason
            if verdict.retrieve:  # nothing to show: say what happens, never "retrieving" while generating
                reason = reason.rsplit(": ", 1)[0] + ": no visible catalog items with images, generating"
            return Decision(self.config.policy, False, True, verdict.score, reason)
        if not shown:
            raise FailedPrecondition(self._nothing_to_retrieve(user_id, params, query))
        how = "returning catalog items" + (" and generating" if mode == "both" else "")
        reason = f"request asked for {mode}: {how} (policy said: {verdict.reason})"
        return Decision("forced", True, mode == "both", verdict.score, reason, shown)

    def _verdict(self, query, scores, agreement, has_history, n_kw, params) -> _Verdict:
        if query is None:
            return _Verdict(
                False,
                0.0,
                "nothing to search the catalog with (no prompt, keywords or history "
                "embeddings): generating",
            )
        if not scores:
            seen = (
                ""
                if params.include_seen
                else ", or the user has seen every visible item (set include_seen)"
            )
            return _Verdict(
                False, 0.0, f"no catalog candidates (the index is empty{seen}): generating"
            )
        best = scores[0]
        if self.config.policy == "threshold":
            thr = self.config.threshold
            if thr is None:
                return _Verdict(False, best, f"best catalog match {best:.2f}; this preset has no retrieval "
                                "threshold tuned for its CLIP (set retrieval_threshold): generating")
            if best >= thr:
                return _Verdict(
                    True, best, f"best catalog match {best:.2f} >= threshold {thr:.2f}: retrieving"
                )
            return _Verdict(
                False,
                best,
                f"best catalog match {best:.2f} < threshold {thr:.2f}: generating "
                "(lower retrieval_threshold or ask for retrieve_only to get catalog items)",
            )
        head = self.head()
        x = features(
            scores,
            agreement,
            has_history,
            n_kw,
            query if head.config.get("query_features") else None,
        )
        p = head.probability(x)
        cmp, what = (">=", "retrieving") if p >= head.threshold else ("<", "generating")
        return _Verdict(
            p >= head.threshold,
            p,
            f"decision head P(retrieve)={p:.2f} {cmp} {head.threshold:.2f} "
            f"(best catalog match {best:.2f}, gap {scores[0] - (scores[1] if len(scores) > 1 else -1.0):.2f}): {what}",
        )

    def _nothing_to_retrieve(self, user_id: str, params, query) -> str:
        if query is None:
            return (
                f"retrieval={params.retrieval!r} needs something to search with: give a prompt, or a "
                "personalized method and a user with embedded history items"
            )
        seen = (
            ""
            if params.include_seen
            else " or the user has already seen every visible one (set include_seen),"
        )
        return (
            f"retrieval={params.retrieval!r} found no catalog item with an image for user {user_id!r}: the "
            f"catalog is empty,{seen} or its items belong to another tenant; ingest items "
            "(`pigment ingest`) or use retrieval=auto/generate_only"
        )

    def head(self) -> DecisionHead:
        """The learned head, loaded once per directory (sha256-checked)."""
        head_dir = Path(self.config.head_dir)
        with self._lock:
            if self._head is None or self._head[0] != head_dir:
                head = DecisionHead.load(head_dir)
                embedder = self.history.embedder
                head.check_space(embedder.model_id, embedder.dim)
                self._head = (head_dir, head)
            return self._head[1]

    def with_config(self, **changes) -> Decider:
        """A decider with some config fields changed (the same history core)."""
        return Decider(self.history, replace(self.config, **changes))
