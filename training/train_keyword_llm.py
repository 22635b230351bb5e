"""Train the keyword LLM: history captions in, the chosen item's attribute keywords out.

It learns only from what a deployment observes: five history captions and the
item the user went on to choose (its attribute keywords, in a fixed order).
Latent tastes are never a label. Prompt and answer follow ``PREFERENCE``, which
is stored in the preset as ``preference.json``::

    history:\\n1. a large red star on a dark background\\n...\\nkeywords:\\n
    -> 1. red 2. dark background 3. large 4. star <eos>

Augmentation (on by default): the train split is about 5.8k windows whose
targets are noisy draws from each taste, and 2000 plain steps (11 epochs)
memorise them (val keyword joint 0.791; more steps fall further, 0.742 at
3000x64). Each example is therefore redrawn on the fly: every attribute's
values are relabelled by a random permutation, applied to the history and the
target alike (the world's values are exchangeable labels, so this keeps the
taste-to-choice statistics and removes what is worth memorising), and half the
time the history order is shuffled. Val joint 0.824, which is what each
attribute's most frequent history value scores (0.824): counting is all the
history offers.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from pigment.training.toy_tokenizers import build_llm_tokenizer
from pigment.training.toy_world import (
    ATTRIBUTES,
    KEYWORD_ORDER,
    ToyWorld,
    caption,
    item_keywords,
    keywords_table,
)
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PREFERENCE = {"keyword_template": "history:\n{history}\nkeywords:\n", "history_line": "{i}. {caption}",
              "max_keywords": len(KEYWORD_ORDER)}
KEYWORD_RE = re.compile(r"(\d+)\.\s*([a-z][a-z ]*[a-z])")


def format_prompt(captions: list[str]) -> str:
    lines = [PREFERENCE["history_line"].format(i=i + 1, caption=c) for i, c in enumerate(captions)]
    return PREFERENCE["keyword_template"].format(history="\n".join(lines))


def format_answer(keywords: list[str]) -> str:
    return " ".join(f"{i + 1}. {k}" for i, k in enumerate(keywords))


def parse_keywords(text: str) -> list[str]:
    return [m.group(2) for m in KEYWORD_RE.finditer(text)]


def _example(history: list[dict[str, str]], target: dict[str, str]) -> tuple[str, str, dict[str, str]]:
    return format_prompt([caption(h) for h in history]), format_answer(item_keywords(target)), target


def _windows(world: ToyWorld, split: str) -> list[tuple[list[dict[str, str]], dict[str, str]]]:
    """(history attributes, target attributes) per window of ``split``."""
    items = world.item_by_id
    return [([items[i].attributes for i in s.history], items[s.target].attributes) for s in world.samples(split)]


def augmented(example_attrs: tuple[list[dict[str, str]], dict[str, str]],
              rng: np.random.Generator) -> tuple[str, str, dict[str, str]]:
    """One window redrawn: values relabelled per attribute (history and target alike), order shuffled half the time."""
    history, target = example_attrs
    relabel = {a: dict(zip(vals, rng.permutation(vals))) for a, vals in ATTRIBUTES.items()}
    history = [{a: str(relabel[a][v]) for a, v in h.items()} for h in history]
    if rng.random() < 0.5:
        history = [history[i] for i in rng.permutation(len(history))]
    return _example(history, {a: str(relabel[a][v]) for a, v in target.items()})


def make_llm(tokenizer: PreTrainedTokenizerFast, width: int = 64) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=3 * width,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=128, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg)


def _batch(tokenizer, examples) -> dict[str, torch.Tensor]:
    """Right-padded prompt+answer+eos with labels only on the answer."""
    ids, labels = [], []
    for prompt, answer, _ in examples:
        p = tokenizer(prompt).input_ids
        a = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        ids.append(p + a)
        labels.append([-100] * len(p) + a)
    n = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return {"input_ids": torch.tensor([x + [pad] * (n - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids]),
            "labels": torch.tensor([y + [-100] * (n - len(y)) for y in labels])}


@torch.no_grad()
def generate_keywords(model, tokenizer, prompts: list[str], max_new_tokens: int = 14) -> list[list[str]]:
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return [parse_keywords(t) for t in texts]


def keyword_accuracy(pred: list[list[str]], targets: list[dict[str, str]]) -> dict[str, float]:
    """Per attribute: does the predicted keyword for that attribute equal the target's value?"""
    table = keywords_table()
    acc = {}
    for attr in KEYWORD_ORDER:
        hits = [next((k for k in kws if k in table[attr]), None) == table[attr][ATTRIBUTES[attr].index(t[attr])]
                for kws, t in zip(pred, targets)]
        acc[attr] = float(np.mean(hits))
    acc["mean"] = float(np.mean([acc[a] for a in KEYWORD_ORDER]))
    return acc


def history_mode_baseline(world: ToyWorld, split: str) -> dict[str, float]:
    """Reference: predict each attribute as its most frequent value in the history."""
    items = world.item_by_id
    hits = {a: [] for a in KEYWORD_ORDER}
    for s in world.samples(split):
        for a in KEYWORD_ORDER:
            mode = Counter(items[i].attributes[a] for i in s.history).most_common(1)[0][0]
            hits[a].append(mode == items[s.target].attributes[a])
    acc = {a: float(np.mean(h)) for a, h in hits.items()}
    acc["mean"] = float(np.mean(list(acc.values())))
    return acc


def train_keyword_llm(out_dir: str | Path, steps: int = 600, batch_size: int = 32, lr: float = 3e-3,
                      seed: int = 0, world: ToyWorld | None = None, n_eval: int = 400,
                      progress: bool = True, augment: bool = True) -> dict:
    t0 = time.time()
    torch.manual_seed(seed)
    world = world or ToyWorld(seed=seed)
    train_attrs = _windows(world, "train")
    train, val = [_example(*a) for a in train_attrs], [_example(*a) for a in _windows(world, "val")]
    corpus = [p + " " + a for p, a, _ in train] + [format_answer(v) for v in keywords_table().values()]
    tokenizer = build_llm_tokenizer(corpus + [f"{i}." for i in range(1, 21)])
    model = make_llm(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = np.random.default_rng(seed)
    bar = tqdm(range(steps), desc="llm", disable=not progress)
    for _ in bar:
        picks = gen.integers(0, len(train), batch_size)
        batch = _batch(tokenizer, [augmented(train_attrs[i], gen) if augment else train[i] for i in picks])
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    val = val[:n_eval]
    pred = generate_keywords(model, tokenizer, [p for p, _, _ in val])
    metrics = {"steps": steps, "augment": augment, "final_loss": loss.item(), "n_val": len(val),
               "val_keyword_accuracy": keyword_accuracy(pred, [t for _, _, t in val]),
               "val_well_formed": float(np.mean([len(p) == len(KEYWORD_ORDER) for p in pred])),
               "val_history_mode_baseline": history_mode_baseline(world, "val"),
               "example": {"prompt": val[0][0], "generated": pred[0], "target": val[0][1]},
               "wall_s": round(time.time() - t0, 1)}
    model.save_pretrained(Path(out_dir) / "llm")
    tokenizer.save_pretrained(Path(out_dir) / "llm_tokenizer")
    return metrics
