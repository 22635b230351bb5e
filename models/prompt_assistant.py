"""LLMGA's prompt assistant: the request (short, vague or empty) + the user's taste -> a detailed prompt.

LLMGA has its LLM write the whole generation prompt. Here the LLM's answer (the
preference LLM's keywords, or a chat LLM's free-form description) and the
request are both parsed into *slots*, and the prompt is assembled from the
preset's schema, never copied: with a vocabulary (``keywords.json``) a slot
holds only a vocabulary entry; without one, a short lowercase phrase with no
instruction words (``KeywordVocabulary.validate``). So vague words ("something
for my wall") and injected text ("ignore all previous instructions") never
reach the renderer; they are dropped, and the caller sees what was written.

Schema (``prompt_schema`` in the preset's ``preference.json``): a list of
parts, each a literal or a text with ``{attribute}`` slots; a part whose slots
are all empty is left out. Without a schema the slots are joined with commas
(content first, then taste), which any text-conditioned UNet reads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

SLOT_RE = re.compile(r"\{([a-z_]+)\}")
FREE_SLOT = "_"  # slot name of phrases outside any vocabulary attribute
MAX_FREE_PHRASES = 8
_SPLIT_RE = re.compile(r"[,;.\n!?]| and | with | on | in | of ")


@dataclass
class WrittenPrompt:
    text: str
    slots: dict[str, list[str]] = field(
        default_factory=dict
    )  # attribute -> phrases (vocabulary entries)
    dropped: list[str] = field(default_factory=list)  # request phrases that did not fit the schema


def request_slots(request: str, vocab) -> tuple[dict[str, list[str]], list[str]]:
    """What the request names: vocabulary entries by attribute, or (no vocabulary) validated short phrases."""
    text = " ".join(request.lower().split())
    if vocab.by_attribute:
        slots: dict[str, list[str]] = {}
        padded = f" {text} "
        for attr, values in vocab.by_attribute.items():
            # longest first: "light background" wins over a bare "light" of another attribute
            for value in sorted(values, key=len, reverse=True):
                if f" {value} " in padded and attr not in slots:
                    slots[attr] = [value]
                    padded = padded.replace(f" {value} ", " ")
        leftover = [w for w in padded.split() if w not in {"a", "an", "the"}]
        return slots, leftover
    phrases = [p.strip() for p in _SPLIT_RE.split(f" {text} ") if p.strip()]
    kept, rejected = vocab.validate(phrases, target="")
    return ({FREE_SLOT: kept[:MAX_FREE_PHRASES]} if kept else {}), rejected


def taste_slots(keywords: Sequence[str], vocab, named: set[str]) -> dict[str, list[str]]:
    """The LLM's validated keywords as slots, skipping attributes the request already names."""
    slots: dict[str, list[str]] = {}
    for kw in keywords:
        attr = vocab.attribute_of.get(kw, FREE_SLOT)
        if attr in named and attr != FREE_SLOT:
            continue
        if attr == FREE_SLOT or attr not in slots:
            slots.setdefault(attr, []).append(kw)
    return slots


def assemble(
    slots: dict[str, list[str]], schema: Sequence[str] | None, order: Sequence[str]
) -> str:
    """The prompt text from filled slots: through the schema's parts, or comma-joined in ``order``."""
    if schema:
        parts = []
        for part in schema:
            names = SLOT_RE.findall(part)
            if names and not any(slots.get(n) for n in names):
                continue
            parts.append(SLOT_RE.sub(lambda m: " ".join(slots.get(m.group(1), [])), part))
        used = {n for part in schema for n in SLOT_RE.findall(part)}
        extra = [p for a in order if a not in used for p in slots.get(a, [])]
        text = " ".join(" ".join(parts).split())
        return ", ".join([text, *extra]) if extra else text
    return ", ".join(p for a in order for p in slots.get(a, []))


def write_prompt(
    request: str,
    keywords: Sequence[str],
    vocab,
    schema: Sequence[str] | None = None,
    content_first: Sequence[str] = (),
) -> WrittenPrompt:
    """The detailed prompt for ``request`` and the user's taste ``keywords`` (the LLM's, parsed).

    ``content_first``: attributes listed first when there is no schema (what the request names leads)."""
    named, dropped = request_slots(request, vocab)
    keywords, _ = vocab.validate(
        keywords, target=""
    )  # whoever called, only schema-valid taste gets in
    slots = {**taste_slots(keywords, vocab, set(named)), **named}
    if FREE_SLOT in named:  # free phrases of the request lead, the taste's follow
        slots[FREE_SLOT] = named[FREE_SLOT] + [
            k
            for k in taste_slots(keywords, vocab, set()).get(FREE_SLOT, [])
            if k not in named[FREE_SLOT]
        ]
    order = [*content_first, *named, *vocab.by_attribute, FREE_SLOT]
    order = list(dict.fromkeys(order))
    return WrittenPrompt(assemble(slots, schema, order), slots, dropped)
