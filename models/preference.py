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
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pigment.models.loader import (
    has_component,
    load_component,
    preset_file,
    preset_version,
    sha256_file,
)
from pigment.models.tiny import DEFAULT_PREFERENCE_CONFIG
from torch import nn

KEYWORD_RE = re.compile(r"(\d+)\s*\.\s*([a-z][a-z \-]*?)\s*(?=\d+\s*\.|$)")
FREE_KEYWORD_RE = re.compile(r"^[a-z][a-z\-]*( [a-z][a-z\-]*){0,2}$")
# Without a vocabulary, words that only make sense as instructions to a model never pass.
INSTRUCTION_WORDS = frozenset(["ignore", "disregard", "instruction", "instructions", "system", "prompt", "assistant", "user", "override"])
MARKUP_RE = re.compile(r"<[^>]{0,40}>|\[[A-Z_]{2,12}\]")
# The prompt's own structure, which a caption must not imitate: numbered entries ("1. purple", the format of
# both history lines and the keyword answer) and the template's labels ("keywords:" up to the sentence end).
ENUMERATION_RE = re.compile(r"(?<![\w.])\d+\s*[.)]\s*[^\W\d_][^\d.\n]*", re.UNICODE)
TEMPLATE_LABEL_RE = re.compile(r"\b([A-Za-z_]+)\s*:")

# Flags reported back to the caller.
EMPTY_HISTORY = "EMPTY_HISTORY"
HISTORY_TRUNCATED = "HISTORY_TRUNCATED"
KEYWORDS_REJECTED = "KEYWORDS_REJECTED"
NO_KEYWORDS = "NO_KEYWORDS"

PMG_LORA = "llm_lora"  # inside the preference head's dir: the optional LLM LoRA (peft files)


@dataclass
class Preference:
    keywords: list[str]
    soft_tokens: np.ndarray | None  # [M, text_dim] float16
    flags: list[str] = field(default_factory=list)
    cache_key: str = ""
    model_version: str = ""
    rejected_keywords: list[str] = field(default_factory=list)
    history_used: int = 0
    feedback_used: list[str] = field(default_factory=list)  # feedback_ids that shaped the keywords
    explored_attribute: str = ""  # on an exploration candidate: the attribute it varies ("*": sampled)
    prompt: str | None = None  # a method that writes the whole generation prompt (llmga); None: the caller's


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
            if not self.is_valid(kw) or attr in named or (attr and attr in seen_attrs) or kw in kept:
                rejected.append(kw)
                continue
            if attr:
                seen_attrs.add(attr)
            kept.append(kw)
        return kept, rejected

    def is_valid(self, keyword: str) -> bool:
        """In the vocabulary (when the preset has one), else a short lowercase phrase with no instruction words."""
        keyword = keyword.strip().lower()
        if self.by_attribute:
            return keyword in self.attribute_of
        return bool(FREE_KEYWORD_RE.match(keyword)) and not INSTRUCTION_WORDS.intersection(keyword.split())

    def attributes_named_in(self, text: str) -> set[str]:
        words = f" {text.lower()} "
        return {a for v, a in self.attribute_of.items() if f" {v} " in words}


def sanitize_caption(caption: str, max_chars: int, special_tokens: Sequence[str], labels: Sequence[str] = ()) -> str:
    """A caption as plain data: no special tokens or markup, no numbered entries, none of the template's
    ``labels`` (with what follows them up to the sentence end), one line, at most ``max_chars``."""
    for tok in special_tokens:
        caption = caption.replace(tok, " ")
    caption = MARKUP_RE.sub(" ", caption)
    caption = ENUMERATION_RE.sub(" ", caption)
    if labels:
        names = "|".join(re.escape(label) for label in labels)
        caption = re.sub(rf"\b(?:{names})\s*:[^.\n]*", " ", caption, flags=re.IGNORECASE)
    caption = " ".join(caption.split()).strip(" .,;:-)")
    return caption[:max_chars]


def template_labels(template: str) -> list[str]:
    """The ``word:`` labels of a prompt template ("history", "keywords"), which captions may not contain."""
    return sorted(set(TEMPLATE_LABEL_RE.findall(template.replace("{history}", ""))))


KEYWORD_FORMATS = ("numbered", "free")
CHAT_FILLER = frozenset(["sure", "okay", "ok", "certainly", "of", "course", "here", "you", "go", "yes"]) | {"of course", "here you go"}
_LIST_MARK_RE = re.compile(r"^\s*(?:\d+\s*[.)]|[-*\u2022])\s*")
_SEPARATOR_RE = re.compile(r"[,;\n!?]|\s\d+\s*[.)]\s")


def parse_keywords(text: str, fmt: str = "numbered") -> list[str]:
    """Keywords from the LLM's answer, in the preset's ``keyword_format``.

    ``numbered``: the toy LLM's "1. red 2. dark background"; ``free``: what an instruction-tuned LLM
    writes ("Sure! red, dark background\n- large"): split on commas, semicolons, lines and list marks,
    keep short lowercase phrases (validation decides what passes)."""
    if fmt == "numbered":
        return [m.group(2).strip() for m in KEYWORD_RE.finditer(text.lower().replace("\n", " "))]
    if fmt != "free":
        raise ValueError(f"keyword_format={fmt!r} is not allowed: one of {KEYWORD_FORMATS}")
    out = []
    for piece in _SEPARATOR_RE.split(" " + text.lower() + " "):
        piece = _LIST_MARK_RE.sub("", piece.rsplit(":", 1)[-1]).strip(" .\"'()[]")  # "keywords: red" -> red
        if piece and len(piece.split()) <= 3 and piece not in out and piece not in CHAT_FILLER:
            out.append(piece)
    return out


class PreferenceEncoder:
    """Loads the LLM (+ optional preference head) of a preset; ``encode`` is pure given its inputs."""

    def __init__(self, preset_dir: str | Path, device: str = "cpu", cache_size: int = 4096,
                 adapter_dir: str | Path | None = None):
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
        # LLM LoRAs are named peft adapters on one wrapped LLM: "pmg" (trained with the head, soft
        # tokens only) and "pigeon" (keywords only); keywords without Pigeon use the plain LLM.
        if self.head is not None and (self.preset_dir / "preference_head" / PMG_LORA).is_dir():
            from peft import PeftModel

            self.llm = PeftModel.from_pretrained(self.llm, str(self.preset_dir / "preference_head" / PMG_LORA),
                                                 adapter_name="pmg", is_trainable=False).eval()
        self.context = int(getattr(self.llm.config, "max_position_embeddings", 2048))
        self._cache: OrderedDict[str, Preference] = OrderedDict()
        self._cache_size = cache_size
        # Optional Pigeon adapter (LoRA + mask generator from `pigment train pigeon`): keywords only.
        self.pigeon: PigeonAdapter | None = None
        if adapter_dir is not None:
            self.pigeon = PigeonAdapter.load(adapter_dir, self.llm, device)
            self.llm = self.pigeon.model
            self.model_version += f"+pigeon-{self.pigeon.version}"

    # -- prompt -------------------------------------------------------------
    def build_prompt(self, captions: Sequence[str]) -> tuple[str, int, bool]:
        """The keyword prompt over the newest captions that fit; (prompt, n_used, truncated)."""
        special = [t for t in self.tokenizer.all_special_tokens if t]
        labels = template_labels(self.cfg["keyword_instruction"] if self.chat else self.cfg["keyword_template"])
        clean = [sanitize_caption(c, self.cfg["max_caption_chars"], special, labels) for c in captions]
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
        if self.chat:  # an instruction-tuned LLM: the request goes through its own chat template
            message = self.cfg["keyword_instruction"].format(history=lines)
            return self.tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                      add_generation_prompt=True)
        return self.cfg["keyword_template"].format(history=lines)

    @property
    def chat(self) -> bool:
        return bool(self.cfg.get("chat_template")) and bool(getattr(self.tokenizer, "chat_template", None))

    def parse(self, text: str) -> list[str]:
        return parse_keywords(text, self.cfg.get("keyword_format", "numbered"))

    def readable_fraction(self, captions: Sequence[str]) -> float:
        """Share of the captions' tokens the LLM knows (not its unknown token); 1.0 without an unknown token."""
        unk = self.tokenizer.unk_token_id
        if unk is None:
            return 1.0
        ids = [i for c in captions for i in self.tokenizer(c, add_special_tokens=False).input_ids]
        return 1.0 if not ids else sum(i != unk for i in ids) / len(ids)

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
            return Preference([], None, flags + [EMPTY_HISTORY], model_version=self.model_version,
                              prompt=self.write_prompt(target, []) if method == "llmga" else None)
        keywords: list[str] = []
        rejected: list[str] = []
        if method in ("pmg", "pmg_keywords", "llmga"):
            raw = self.generate_keywords(prompt)
            keywords, rejected = self.vocab.validate(raw, target)
            keywords = keywords[: int(self.cfg["max_keywords"])]
            # Only invalid keywords are flagged: dropping one for an attribute the target names (the LLM's
            # "star" for "a star") or a repeat is the expected filtering, not a sign of a bad answer.
            if any(not self.vocab.is_valid(k) for k in rejected):
                flags.append(KEYWORDS_REJECTED)
            if not keywords:
                flags.append(NO_KEYWORDS)
        soft = None
        if method in ("pmg", "pmg_soft") and self.head is not None:
            soft = self.soft_tokens(prompt).astype(np.float16)
        return Preference(keywords, soft, flags, model_version=self.model_version, rejected_keywords=rejected,
                          history_used=used, prompt=self.write_prompt(target, keywords) if method == "llmga" else None)

    def write_prompt(self, request: str, keywords: Sequence[str]) -> str:
        """LLMGA's prompt assistant: the request's content + the LLM's (validated) taste, through the schema."""
        from pigment.models.prompt_assistant import write_prompt

        return write_prompt(request, keywords, self.vocab, self.cfg.get("prompt_schema")).text

    def generate_keywords(self, prompt: str) -> list[str]:
        return self.generate_keywords_batch([prompt])[0]

    @torch.no_grad()
    def generate_keywords_batch(self, prompts: Sequence[str]) -> list[list[str]]:
        """Greedy decoding of many prompts at once (left-padded), parsed into raw keywords."""
        if self.pigeon is not None:
            with self.adapter("pigeon"):
                texts = self.pigeon.generate(self.tokenizer, prompts, self.cfg["keyword_template"],
                                             int(self.cfg["max_new_tokens"]))
            return [self.parse(t) for t in texts]
        return [self.parse(t) for t in self._generate(prompts, do_sample=False)]

    def _generate(self, prompts: Sequence[str], do_sample: bool, seed: int = 0) -> list[str]:
        batch = self.prompt_batch(prompts)
        extra = {"temperature": 1.0, "top_k": 0} if do_sample else {}
        if do_sample:
            torch.manual_seed(seed)  # reproducible draws (the caller's rng picks the seed)
        with self.adapter(None):
            out = self.llm.generate(
                **batch, max_new_tokens=int(self.cfg["max_new_tokens"]), do_sample=do_sample,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id, **extra,
            )
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def sample_keywords(self, captions: Sequence[str], target: str = "", seed: int = 0) -> list[str]:
        """Alternative keywords sampled from the LLM (exploration where the preset has no vocabulary)."""
        prompt, used, _ = self.build_prompt(captions)
        if not used:
            return []
        kept, _ = self.vocab.validate(self.parse(self._generate([prompt], do_sample=True, seed=seed)[0]), target)
        return kept[: int(self.cfg["max_keywords"])]

    def prompt_batch(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """BOS + prompt, left-padded (generation continues right after each prompt), as the LLMs are trained."""
        # a chat template writes its own BOS; the plain keyword LLMs are trained on BOS + prompt
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None and not self.chat else []
        ids = [bos + self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        width = max(map(len, ids))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return {
            "input_ids": torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device),
            "attention_mask": torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device),
        }

    def soft_tokens_batch(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, M, text_dim] soft tokens (differentiable through the head; used by `pigment train pmg`)."""
        batch = self.prompt_batch(prompts)
        embeds = self.llm.get_input_embeddings()(batch["input_ids"])
        # The head was trained with its own LoRA (if any) on the plain LLM: Pigeon's never applies here.
        with self.adapter("pmg"):
            return self.head(self.llm, embeds, batch["attention_mask"])

    @contextmanager
    def adapter(self, name: str | None):
        """Run the LLM with one named peft adapter active, or (None, or not loaded) with none."""
        from peft import PeftModel

        if not isinstance(self.llm, PeftModel):  # a plain LLM (or one a trainer wraps itself)
            yield
        elif name is None or name not in self.llm.peft_config:
            with self.llm.disable_adapter():
                yield
        else:
            self.llm.set_adapter(name)
            yield

    def soft_tokens(self, prompt: str) -> np.ndarray:
        with torch.no_grad():
            return self.soft_tokens_batch([prompt])[0].float().cpu().numpy()


# ----------------------------------------------------------------------------- Pigeon
# Pigeon (WWW 2025) on our stack: the history tokens of the keyword prompt pass a
# learned mask (top ``keep_ratio`` kept, the rest zeroed) and a LoRA'd LLM writes
# the keywords. Trained by `pigment train pigeon` (SFT, then DPO); files:
# adapter_model.safetensors + adapter_config.json (peft), mask_generator.safetensors,
# pigeon.json (mask config, keep ratio, provenance).
PIGEON_META = "pigeon.json"
MASK_WEIGHTS = "mask_generator.safetensors"
HISTORY_TYPE = 1  # token type of history tokens; everything else (template, BOS, answer) is 0


class MaskGenerator(nn.Module):
    """Scores each prompt token: one transformer layer over token + position + type embeddings,
    score = cosine(input, output). ``forward`` keeps the top ``keep_ratio`` of history tokens.

    Upstream only uses the hard mask to pick indices, so no gradient reaches this module;
    here the embeddings are multiplied by a straight-through mask (hard value forward,
    ``sigmoid((score - threshold) / temperature)`` gradient), so it learns.
    """

    def __init__(self, hidden: int, max_positions: int = 2048, temperature: float = 0.05):
        super().__init__()
        self.config = {"hidden": hidden, "max_positions": max_positions, "temperature": temperature}
        heads = next(h for h in (8, 4, 2, 1) if hidden % h == 0)
        self.position = nn.Embedding(max_positions, hidden)
        self.token_type = nn.Embedding(2, hidden)
        nn.init.normal_(self.position.weight, std=0.02)
        nn.init.normal_(self.token_type.weight, std=0.02)
        self.layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout=0.0, batch_first=True)

    def scores(self, embeds: torch.Tensor, type_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # positions count real tokens only, so left and right padding score alike
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(0, self.config["max_positions"] - 1)
        x = embeds.float() + self.position(pos) + self.token_type(type_ids)
        y = self.layer(x, src_key_padding_mask=attention_mask == 0)
        return torch.nn.functional.cosine_similarity(x, y, dim=-1)

    def forward(self, embeds: torch.Tensor, type_ids: torch.Tensor, attention_mask: torch.Tensor,
                keep_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds with dropped history tokens zeroed, hard keep mask [B, T] over history tokens)."""
        score = self.scores(embeds, type_ids, attention_mask)
        hist = (type_ids == HISTORY_TYPE) & (attention_mask > 0)
        n_hist = hist.sum(-1)
        n_keep = torch.ceil(n_hist.float() * keep_ratio).long()
        ranked = score.detach().masked_fill(~hist, float("-inf"))
        order = ranked.argsort(-1, descending=True)
        hard = hist & (order.argsort(-1) < n_keep[:, None])
        top = ranked.gather(-1, order)
        last_kept = top.gather(-1, (n_keep - 1).clamp(min=0)[:, None])
        first_dropped = top.gather(-1, n_keep.clamp(max=top.shape[-1] - 1)[:, None])
        lo = torch.where((n_keep < n_hist)[:, None], first_dropped, last_kept - 1)
        hi = torch.where((n_keep > 0)[:, None], last_kept, lo + 1)
        threshold = ((hi + lo) / 2).nan_to_num(0.0, posinf=2.0, neginf=-2.0)
        soft = torch.sigmoid((score - threshold) / self.config["temperature"])
        keep = hard.float() + soft - soft.detach()  # straight-through
        factor = torch.where(hist, keep, torch.ones_like(keep))
        return embeds * factor.unsqueeze(-1).to(embeds.dtype), hard

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(Path(path) / MASK_WEIGHTS))

    @classmethod
    def from_pretrained(cls, path: str | Path, config: dict) -> MaskGenerator:
        from safetensors.torch import load_file

        mask = cls(**config)
        mask.load_state_dict(load_file(str(Path(path) / MASK_WEIGHTS)))
        return mask.eval()


def pigeon_tokens(tokenizer, prompt: str, template: str, answer: str | None = None) -> tuple[list[int], ...]:
    """(ids, type ids, labels) of BOS + prompt [+ answer + EOS]; history = the template's ``{history}`` span."""
    head, _, tail = template.partition("{history}")
    lo, hi = len(head), len(prompt) - len(tail)
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc.input_ids)
    types = [HISTORY_TYPE if (s >= lo and e <= hi and e > s) else 0 for s, e in enc.offset_mapping]
    if tokenizer.bos_token_id is not None:  # the keyword LLMs are trained on BOS + prompt
        ids, types = [tokenizer.bos_token_id] + ids, [0] + types
    labels = [-100] * len(ids)
    if answer is not None:
        ans = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        ids, types, labels = ids + ans, types + [0] * len(ans), labels + ans
    return ids, types, labels


def pad_batch(rows: Sequence[tuple[list[int], ...]], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad (ids, types, labels) rows into input_ids, type_ids, labels, attention_mask tensors."""
    n = max(len(r[0]) for r in rows)
    out: dict[str, list] = {"input_ids": [], "type_ids": [], "labels": [], "attention_mask": []}
    for ids, types, labels in rows:
        k = n - len(ids)
        for key, seq, fill in (("input_ids", ids, pad_id), ("type_ids", types, 0), ("labels", labels, -100),
                               ("attention_mask", [1] * len(ids), 0)):
            out[key].append([fill] * k + list(seq) if side == "left" else list(seq) + [fill] * k)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def masked_embeds(model, mask: MaskGenerator, batch: dict[str, torch.Tensor], keep_ratio: float) -> torch.Tensor:
    embeds = model.get_input_embeddings()(batch["input_ids"])
    return mask(embeds, batch["type_ids"], batch["attention_mask"], keep_ratio)[0]


@dataclass
class PigeonAdapter:
    model: Any          # the peft model wrapping the LLM
    mask: MaskGenerator
    keep_ratio: float
    version: str

    @classmethod
    def load(cls, adapter_dir: str | Path, llm, device: str = "cpu") -> PigeonAdapter:
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        meta = json.loads((adapter_dir / PIGEON_META).read_text())
        if isinstance(llm, PeftModel):  # already carries the PMG head's LoRA: add a second adapter
            llm.load_adapter(str(adapter_dir), adapter_name="pigeon", is_trainable=False)
            model = llm.eval()
        else:
            model = PeftModel.from_pretrained(llm, str(adapter_dir), adapter_name="pigeon", is_trainable=False).eval()
        mask = MaskGenerator.from_pretrained(adapter_dir, meta["mask"]).to(device)
        digest = hashlib.sha256((sha256_file(adapter_dir / "adapter_model.safetensors")
                                 + sha256_file(adapter_dir / MASK_WEIGHTS)).encode()).hexdigest()[:10]
        return cls(model, mask, float(meta["keep_ratio"]), digest)

    @torch.no_grad()
    def generate(self, tokenizer, prompts: Sequence[str], template: str, max_new_tokens: int,
                 keep_ratio: float | None = None, do_sample: bool = False, temperature: float = 1.0) -> list[str]:
        return pigeon_generate(self.model, self.mask, tokenizer, prompts, template, max_new_tokens,
                               self.keep_ratio if keep_ratio is None else keep_ratio, do_sample, temperature)


@torch.no_grad()
def pigeon_generate(model, mask: MaskGenerator, tokenizer, prompts: Sequence[str], template: str,
                    max_new_tokens: int, keep_ratio: float, do_sample: bool = False,
                    temperature: float = 1.0) -> list[str]:
    """Decode keyword text from masked history embeddings (left-padded batch)."""
    device = model.get_input_embeddings().weight.device
    batch = pad_batch([pigeon_tokens(tokenizer, p, template) for p in prompts], tokenizer.pad_token_id, "left")
    batch = {k: v.to(device) for k, v in batch.items()}
    embeds = masked_embeds(model, mask, batch, keep_ratio)
    extra = {"temperature": temperature, "top_k": 0} if do_sample else {}
    out = model.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens,
                         do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **extra)
    return tokenizer.batch_decode(out, skip_special_tokens=True)  # inputs_embeds: only new tokens come back


def save_pigeon_adapter(out_dir: str | Path, model, mask: MaskGenerator, keep_ratio: float, **meta: Any) -> Path:
    """Write the LoRA (peft ``save_pretrained``: adapter_model.safetensors), the mask generator and pigeon.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    mask.save_pretrained(out)
    (out / PIGEON_META).write_text(json.dumps({"mask": mask.config, "keep_ratio": keep_ratio, **meta}, indent=2))
    return out
