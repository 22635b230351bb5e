"""Train a tiny CLIP contrastively on toy-world item images and their captions.

Texts mix full captions, partial captions and keyword prompts so the model can
score an image against a target prompt and against a keyword prompt (PMG's
candidate selection). The image preprocessing is saved beside the weights as a
``CLIPImageProcessor`` config (32x32, mean = std = 0.5).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
from pigment.training.toy_tokenizers import build_text_tokenizer
from pigment.training.toy_world import all_combinations, caption, random_items
from tqdm import tqdm
from transformers import CLIPConfig, CLIPModel

MAX_LEN = 14


def make_clip(tokenizer, width: int = 64) -> CLIPModel:
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LEN,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    vision = dict(image_size=32, patch_size=4, hidden_size=width, intermediate_size=2 * width,
                  num_hidden_layers=2, num_attention_heads=4)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=width))


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 N,32,32,3 -> the normalisation the saved image processor applies."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def save_image_processor(path: Path) -> None:
    from transformers import CLIPImageProcessor
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, tokenizer, n: int = 500, seed: int = 77) -> float:
    """Image -> best of the 216 full captions; fraction exactly right (held-out items)."""
    combos = all_combinations()
    attrs, images = random_items(n, seed=seed)
    ids = tokenizer([caption(c) for c in combos], padding="max_length", max_length=MAX_LEN,
                    return_tensors="pt").input_ids
    t = model.get_text_features(input_ids=ids)
    v = model.get_image_features(pixel_values=pixel_values(images))
    t, v = [x if torch.is_tensor(x) else x.pooler_output for x in (t, v)]
    best = (v @ t.T).argmax(-1).tolist()
    return float(np.mean([combos[b] == a for b, a in zip(best, attrs)]))


def train_clip(out_dir: str | Path, steps: int = 800, batch_size: int = 128, lr: float = 2e-3,
               seed: int = 0, n_images: int = 10000, n_eval: int = 500, progress: bool = True) -> dict:
    from pigment.training.train_renderer import random_segment, text_corpus
    t0 = time.time()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    attrs, images = random_items(n_images, seed=seed + 30)
    x_all = pixel_values(images)
    tokenizer = build_text_tokenizer(text_corpus(), MAX_LEN)
    model = make_clip(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(range(steps), desc="clip", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, n_images, (batch_size,)).tolist()
        texts = [caption(attrs[i]) if rng.random() < 0.5 else random_segment(attrs[i], rng) for i in idx]
        ids = tokenizer(texts, padding="max_length", max_length=MAX_LEN, truncation=True,
                        return_tensors="pt").input_ids
        loss = model(input_ids=ids, pixel_values=x_all[idx], return_loss=True).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    metrics = {"steps": steps, "final_loss": loss.item(),
               "zero_shot_full_caption_accuracy": zero_shot_accuracy(model, tokenizer, n=n_eval),
               "wall_s": round(time.time() - t0, 1)}
    model.save_pretrained(Path(out_dir) / "clip")
    save_image_processor(Path(out_dir) / "clip")
    tokenizer.save_pretrained(Path(out_dir) / "clip_tokenizer")
    return metrics
