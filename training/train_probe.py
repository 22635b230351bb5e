"""Train the attribute probe on real toy-world images (scoring only, never a generator)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pigment.models.probe import AttributeProbe
from pigment.training.toy_augment import soften
from pigment.training.toy_world import ATTRIBUTES, attribute_indices, random_items
from tqdm import tqdm


def probe_accuracy(probe: AttributeProbe, images: np.ndarray, attrs: list[dict[str, str]]) -> dict[str, float]:
    pred, true = probe.predict(images), attribute_indices(attrs)
    acc = {a: float((pred[a] == true[a]).mean()) for a in ATTRIBUTES}
    acc["joint"] = float(np.all([pred[a] == true[a] for a in ATTRIBUTES], axis=0).mean())
    return acc


def train_probe(out_dir: str | Path, steps: int = 1500, n_train: int = 20000, batch_size: int = 128,
                seed: int = 0, lr: float = 2e-3, n_heldout: int = 2000, progress: bool = True) -> dict:
    t0 = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    attrs, images = random_items(n_train, seed=seed + 1000)
    x_all = AttributeProbe.to_tensor(images)
    y_all = {a: torch.from_numpy(v) for a, v in attribute_indices(attrs).items()}
    probe = AttributeProbe(ATTRIBUTES)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(range(steps), desc="probe", disable=not progress)
    for _ in bar:
        idx = torch.randint(0, n_train, (batch_size,), generator=gen)
        logits = probe(soften(x_all[idx], gen, blur_p=0.4, noise=0.03))
        loss = sum(F.cross_entropy(logits[a], y_all[a][idx]) for a in ATTRIBUTES)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    probe.eval()
    test_attrs, test_images = random_items(n_heldout, seed=seed + 2000)  # fresh held-out items
    metrics = {"heldout_accuracy": probe_accuracy(probe, test_images, test_attrs),
               "steps": steps, "wall_s": round(time.time() - t0, 1)}
    probe.save_pretrained(Path(out_dir) / "probe")
    return metrics
