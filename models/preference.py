"""PMG preference encoding: history captions -> keywords (explicit) + soft tokens (implicit).

Captions are data, never instructions: special tokens and markup are stripped,
length is capped, and the history is truncated from the oldest so the prompt
fits the LLM context. Generated keywords are validated before they can reach
the renderer: they must parse as short lowercase phrases and, when the preset
ships a keyword vocabulary (``keywords.json``), be in it; keywords for an
attribute the request already names are dropped, so taste never overrides the
requested content.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pigment.models.loader import has_component, load_component, preset_file, preset_version
from pigment.models.tiny import DEFAULT_PREFERENCE_CONFIG

KEYWORD_RE = re.compile(r"(\d+)\s*\.\s*([a-z][a-z \-]*?)\s*(?=\d+\s*\.|$)")
FREE_KEYWORD_RE = re.compile(r"^[a-z][a-z\-]*( [a-z][a-z\-]*){0,2}$")
# Without a vocabulary, words that only make sense as instructions to a model never pass.
INSTRUCTION_WORDS = frozenset("ignore disregard instruction instructions system prompt assistant user override".split())
MARKUP_RE = re.compile(r"<[^>]{0,40}>|\[[A-Z_]{2,12}\]")

# Flags reported back to the caller.
EMPTY_HISTORY = "EMPTY_HISTORY"
HISTORY_TRUNCATED = "HISTORY_TRUNCATED"
KEYWORDS_REJECTED = "KEYWORDS_REJECTED"
NO_KEYWORDS = "NO_KEYWORDS"


@dataclass
class Preference:
    keywords: list[str]
    soft_tokens: np.ndarray | None  # [M, text_dim] float16
    flags: list[str] = field(default_factory=list)
    cache_key: str = ""
    model_version: str = ""
    rejected_keywords: list[str] = field(default_factory=list)
    history_used: int = 0


class KeywordVocabulary:
    """attribute -> allowed keyword strings, from the preset's ``keywords.json`` (optional)."""

    def __init__(self, by_attribute: dict[str, list[str]] | None):
        self.by_attribute = {a: [v.lower() for v in vals] for a, vals in (by_attribute or {}).items()}
        self.attribute_of = {v: a for a, vals in self.by_attribute.items() for v in vals}

    def validate(self, keywords: Sequence[str], target: str) -> tuple[list[str], list[str]]:
        """Returns (kept, rejected). Rejects unknown or malformed keywords and ones the target already names."""
        named = self.attributes_named_in(target)
        kept, rejected, seen_attrs = [], [], set()
        for kw in keywords:
            kw = kw.strip().lower()
            attr = self.attribute_of.get(kw)
            ok = (attr is not None) if self.by_attribute else (
                bool(FREE_KEYWORD_RE.match(kw)) and not INSTRUCTION_WORDS.intersection(kw.split()))
            if not ok or attr in named or (attr and attr in seen_attrs) or kw in kept:
                rejected.append(kw)
                continue
            if attr:
                seen_attrs.add(attr)
            kept.append(kw)
        return kept, rejected

    def attributes_named_in(self, text: str) -> set[str]:
        words = f" {text.lower()} "
        return {a for v, a in self.attribute_of.items() if f" {v} " in words}


def sanitize_caption(caption: str, max_chars: int, special_tokens: Sequence[str]) -> str:
    for tok in special_tokens:
        caption = caption.replace(tok, " ")
    caption = MARKUP_RE.sub(" ", caption)
    caption = " ".join(caption.split())
    return caption[:max_chars]


def parse_keywords(text: str) -> list[str]:
    return [m.group(2).strip() for m in KEYWORD_RE.finditer(text.lower().replace("\n", " "))]


class PreferenceEncoder:
    """Loads the LLM (+ optional preference head) of a preset; ``encode`` is pure given its inputs."""

    def __init__(self, preset_dir: str | Path, device: str = "cpu", cache_size: int = 4096):
        self.preset_dir = Path(preset_dir)
        self.device = device
        self.model_version = preset_version(preset_dir)
        cfg_path = preset_file(preset_dir, "preference.json")
        self.cfg = {**DEFAULT_PREFERENCE_CONFIG, **(json.loads(cfg_path.read_text()) if cfg_path else {})}
        vocab_path = preset_file(preset_dir, "keywords.json")
        self.vocab = KeywordVocabulary(json.loads(vocab_path.read_text()) if vocab_path else None)
        self.tokenizer = load_component(preset_dir, "llm_tokenizer")
        self.llm = load_component(preset_dir, "llm").to(device)
        self.head = load_component(preset_dir, "preference_head").to(device) if has_component(preset_dir, "preference_head") else None
        self.context = int(getattr(self.llm.config, "max_position_embeddings", 2048))
        self._cache: OrderedDict[str, Preference] = OrderedDict()
        self._cache_size = cache_size

    # -- prompt -------------------------------------------------------------
    def build_prompt(self, captions: Sequence[str]) -> tuple[str, int, bool]:
        """The keyword prompt over the newest captions that fit; (prompt, n_used, truncated)."""
        special = [t for t in self.tokenizer.all_special_tokens if t]
        clean = [sanitize_caption(c, self.cfg["max_caption_chars"], special) for c in captions]
        clean = [c for c in clean if c]
        budget = self.context - int(self.cfg["max_new_tokens"]) - 8
        if self.head is not None:
            budget -= self.head.config["num_prefix"] + self.head.num_image_tokens
        used = clean
        while used:
            prompt = self._format(used)
            if len(self.tokenizer(prompt).input_ids) <= budget:
                return prompt, len(used), len(used) < len(clean)
            used = used[1:]  # drop the oldest
        return self._format([]), 0, bool(clean)

    def _format(self, captions: Sequence[str]) -> str:
        lines = "\n".join(self.cfg["history_line"].format(i=i + 1, caption=c) for i, c in enumerate(captions))
        return self.cfg["keyword_template"].format(history=lines)

    # -- encode ------------------------------------------------------------
    def cache_key(self, captions: Sequence[str], target: str, method: str) -> str:
        blob = json.dumps([self.model_version, method, target, list(captions)])
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def encode(self, captions: Sequence[str], target: str = "", method: str = "pmg") -> Preference:
        key = self.cache_key(captions, target, method)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        pref = self._encode(captions, target, method)
        pref.cache_key = key
        self._cache[key] = pref
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return pref

    @torch.no_grad()
    def _encode(self, captions: Sequence[str], target: str, method: str) -> Preference:
        prompt, used, truncated = self.build_prompt(captions)
        flags = [HISTORY_TRUNCATED] if truncated else []
        if used == 0:
            return Preference([], None, flags + [EMPTY_HISTORY], model_version=self.model_version)
        keywords: list[str] = []
        rejected: list[str] = []
        if method in ("pmg", "pmg_keywords"):
            raw = self.generate_keywords(prompt)
            keywords, rejected = self.vocab.validate(raw, target)
            keywords = keywords[: int(self.cfg["max_keywords"])]
            if rejected:
                flags.append(KEYWORDS_REJECTED)
            if not keywords:
                flags.append(NO_KEYWORDS)
        soft = None
        if method in ("pmg", "pmg_soft") and self.head is not None:
            soft = self.soft_tokens(prompt).astype(np.float16)
        return Preference(keywords, soft, flags, model_version=self.model_version,
                          rejected_keywords=rejected, history_used=used)

    def generate_keywords(self, prompt: str) -> list[str]:
        return self.generate_keywords_batch([prompt])[0]

    @torch.no_grad()
    def generate_keywords_batch(self, prompts: Sequence[str]) -> list[list[str]]:
        """Greedy decoding of many prompts at once (left-padded), parsed into raw keywords."""
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        out = self.llm.generate(
            **batch, max_new_tokens=int(self.cfg["max_new_tokens"]), do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
        )
        texts = self.tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
        return [parse_keywords(t) for t in texts]

    def soft_tokens(self, prompt: str) -> np.ndarray:
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(self.device)
        embeds = self.llm.get_input_embeddings()(ids)
        return self.head(self.llm, embeds)[0].float().cpu().numpy()
