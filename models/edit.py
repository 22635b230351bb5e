"""Instruction editing (LLMGA's edit path): an instruction -> an edit target and a region -> a mask.

``parse_instruction`` turns "make the background light" or "smaller" into an
``EditPlan`` (attribute, new vocabulary value, region, strength) using the
preset's keyword vocabulary: a vocabulary value named in the instruction
("light background", "red"), a word that is one with a comparative ending
("smaller", "lighter", "larger"), or a synonym the preset lists. Anything else
raises ``EditNotUnderstood`` with the reason, never a silent no-op.

``region_mask`` makes the mask from the image itself: the subject is what
differs from the border's colour (product shots, icons, the toy world); the
regions are ``subject`` (recolour), ``subject_area`` (the disc a larger or
different subject may need: size, shape), ``background`` and ``whole``. A
caller may send its own mask instead.

Config: ``edit.json`` in the preset (optional) with ``regions`` (attribute ->
region), ``strength`` (attribute -> SDEdit strength in (0, 1]) and
``synonyms`` (word -> vocabulary value). Attributes it does not list use the
whole image at strength 0.75 (SDEdit: the layout survives, the look changes).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REGIONS = ("subject", "subject_area", "background", "whole")
DEFAULT_REGION, DEFAULT_STRENGTH = "whole", 0.75
EDIT_CONFIG = "edit.json"
MAX_INSTRUCTION_CHARS = 300
_WORD_RE = re.compile(r"[a-z]+")


class EditNotUnderstood(ValueError):
    """The instruction names no change this preset can make; the message says why and what would work."""


@dataclass(frozen=True)
class EditPlan:
    attribute: str
    value: str  # a vocabulary entry ("light background")
    region: str
    strength: float
    repaint_whole: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class EditConfig:
    regions: dict[str, str]
    strength: dict[str, float]
    synonyms: dict[str, str]
    subject_area: float = 0.47  # radius of the subject_area disc, fraction of the image side
    # attributes the preset's CLIP reads reliably from an uploaded image
    describe: tuple[str, ...] = ()
    # attributes whose edit renders a whole new image and keeps the source outside the region (a new
    # background: the UNet, seeing the source's subject cells, drifts back toward the old background)
    repaint_whole: tuple[str, ...] = ()

    @classmethod
    def load(cls, preset_dir: str | Path) -> EditConfig:
        path = Path(preset_dir) / EDIT_CONFIG
        raw = json.loads(path.read_text()) if path.is_file() else {}
        cfg = cls(
            raw.get("regions", {}),
            {k: float(v) for k, v in raw.get("strength", {}).items()},
            {k.lower(): v.lower() for k, v in raw.get("synonyms", {}).items()},
            float(raw.get("subject_area", 0.47)),
            tuple(raw.get("describe", ())),
            tuple(raw.get("repaint_whole", ())),
        )
        bad = {a: r for a, r in cfg.regions.items() if r not in REGIONS}
        if bad:
            raise ValueError(f"{path}: unknown regions {bad}; allowed {REGIONS}")
        return cfg


def _stem_matches(word: str, value_word: str) -> bool:
    """``smaller`` -> small, ``larger`` -> large, ``lighter`` -> light, ``bigger``-style doubling too."""
    for ending in ("er", "r", "est", "st"):
        if word.endswith(ending) and len(word) > len(ending) + 2:
            stem = word[: -len(ending)]
            if stem == value_word or (stem[-1:] == stem[-2:-1] and stem[:-1] == value_word):
                return True
    return False


def parse_instruction(instruction: str, vocab, config: EditConfig) -> EditPlan:
    """The edit an instruction asks for, from the preset's vocabulary. ``EditNotUnderstood`` otherwise."""
    text = " ".join(instruction.lower().split())
    if not text:
        raise EditNotUnderstood(
            "the instruction is empty: say what to change, e.g. 'make the background light'"
        )
    if not vocab.by_attribute:
        raise EditNotUnderstood(
            "this preset has no keyword vocabulary (keywords.json) to read edits with"
        )
    words = _WORD_RE.findall(text)
    padded = " " + " ".join(words) + " "
    found: dict[str, str] = {}
    for attr, values in vocab.by_attribute.items():
        hits = []
        for value in values:
            core = value.split()
            # "make the background light": the attribute's name stands in for the rest of the entry
            variants = {value, " ".join(reversed(core))} | (
                {core[0]} if attr in words and len(core) > 1 else set()
            )
            if any(f" {v} " in padded for v in variants) or (
                len(core) == 1 and any(_stem_matches(w, core[0]) for w in words)
            ):
                hits.append(value)
        hits = hits or [v for w, v in config.synonyms.items() if v in values and f" {w} " in padded]
        if len(set(hits)) > 1:
            raise EditNotUnderstood(
                f"{instruction[:80]!r} names several {attr} values ({', '.join(sorted(set(hits)))})"
                ": name one"
            )
        if hits:
            found[attr] = hits[0]
    bare = {a: v for a, v in found.items() if len(v.split()) == 1 or a in words}
    # "light background" names the background; a bare "light" with no attribute word is ambiguous
    found = bare if bare else found
    if not found:
        known = ", ".join(f"{a} ({'/'.join(v[:3])} ...)" for a, v in vocab.by_attribute.items())
        raise EditNotUnderstood(
            f"no editable attribute or value in {instruction[:80]!r}: this preset can change "
            f"{known}, e.g. 'make the {next(iter(vocab.by_attribute))} "
            f"{next(iter(vocab.by_attribute.values()))[0]}'"
        )
    if len(found) > 1:
        raise EditNotUnderstood(
            f"{instruction[:80]!r} asks for several changes ({found}): send one edit at a time"
        )
    attr, value = next(iter(found.items()))
    return EditPlan(
        attr,
        value,
        config.regions.get(attr, DEFAULT_REGION),
        config.strength.get(attr, DEFAULT_STRENGTH),
        attr in config.repaint_whole,
    )


def edit_prompt(description: str, plan: EditPlan, vocab, schema=None) -> str:
    """The source's description with the edited slot replaced, assembled by the prompt schema (never raw text)."""
    from pigment.models.prompt_assistant import assemble, request_slots

    slots, _ = request_slots(description, vocab)
    slots[plan.attribute] = [plan.value]
    return assemble(slots, schema, list(vocab.by_attribute))


def describe_image(image: np.ndarray, clip, vocab, attributes, schema=None) -> str:
    """An uploaded image's description (it has no prompt of its own): per attribute in ``attributes``, the
    vocabulary value whose text (through the prompt schema) the CLIP scores highest; assembled by the schema.
    Only the attributes the preset lists (``describe`` in edit.json, measured) are read."""
    from pigment.models.prompt_assistant import assemble

    order = list(vocab.by_attribute)
    image_vec = clip.embed_images([image])[0]
    slots = {}
    for attr in attributes:
        values = vocab.by_attribute.get(attr, [])
        if values:
            texts = clip.embed_texts([assemble({attr: [v]}, schema, order) for v in values])
            slots[attr] = [values[int(np.argmax(texts @ image_vec))]]
    return assemble(slots, schema, order)


def subject_mask(image: np.ndarray, threshold: float = 40.0) -> np.ndarray:
    """Pixels that differ from the border's median colour by more than ``threshold`` (summed absolute RGB)
    and by at least half the subject's typical difference: a soft (generated) edge is split half-way, so
    its background-coloured fringe is repainted with the background rather than kept with the subject."""
    img = image.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    diff = np.abs(img - np.median(border, axis=0)).sum(-1)
    return diff > max(threshold, 0.5 * float(np.percentile(diff, 99)))


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, iterations=steps) if steps > 0 else mask


def region_mask(image: np.ndarray, region: str, config: EditConfig | None = None) -> np.ndarray:
    """Boolean HxW mask of what may change (True = repaint) for ``region``."""
    h, w = image.shape[:2]
    if region == "whole":
        return np.ones((h, w), bool)
    subject = subject_mask(image)
    edge = max(1, round(min(h, w) / 32))  # antialiased edges belong to both sides
    if region == "subject":
        return _dilate(subject, edge)
    if region == "background":  # antialiased edges are repainted too: no ring of the old background
        return ~subject if subject.any() else np.ones((h, w), bool)
    if region == "subject_area":
        ys, xs = np.nonzero(subject) if subject.any() else (np.array([h / 2]), np.array([w / 2]))
        radius = (config.subject_area if config else 0.47) * min(h, w)
        yy, xx = np.mgrid[:h, :w]
        disc = (yy - ys.mean()) ** 2 + (xx - xs.mean()) ** 2 <= radius**2
        return disc | _dilate(subject, 2 * edge)
    raise ValueError(f"region={region!r} is unknown: allowed {REGIONS}")
