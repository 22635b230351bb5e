"""Train the toy preset's ``reference_encoder`` (models/subject_encoder.py): a frozen image backbone that sees shape.

Objective (supervised-contrastive, SupCon; DINO's augment-invariance with the
augmentations a subject-driven task needs): two renders of the same subject
(shape, colour) with a different background, size, position and jitter are
positives; every other subject in the batch is a negative. So the embedding
must keep shape and colour and drop background and size, which is what a
reference encoder should carry. A second term does the same on colour-permuted
views (RGB channels shuffled, so one subject's renders come in a different colour)
with *shape* as the only identity: it forces colour-invariant shape features,
so shape cannot be inferred from colour, which is the shortcut that made the
toy CLIP's projector wrong on unseen (shape, colour) pairs.

Only the training subjects (toy_subjects.train_subjects: the six diagonal
subjects are never seen) are used, and never the attribute probe. Mild blur and
noise as the probe's trainer uses, so soft renders read like crisp ones.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pigment.models.subject_encoder import SubjectEncoder
from pigment.training import toy_subjects as ts
from pigment.training.toy_augment import soften
from pigment.training.toy_world import ATTRIBUTES
from tqdm import tqdm

NAME = "reference_encoder"


def _permute_colours(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image's RGB channels in a random order (the toy backgrounds are grey-ish, so they barely change)."""
    perms = torch.stack([torch.randperm(3, generator=gen) for _ in range(len(x))])
    return torch.gather(x, 1, perms[:, :, None, None].expand_as(x))


def supcon(z: torch.Tensor, labels: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over unit embeddings ``z`` [N, D]."""
    sim = z @ z.T / tau
    eye = torch.eye(len(z), dtype=torch.bool)
    sim = sim.masked_fill(eye, -1e9)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    logp = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    return -(logp * pos).sum(1).div(pos.sum(1).clamp(min=1)).mean()


def render_subjects(subjects: list[ts.Subject], per_subject: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 17])
    images = np.stack([ts.subject_images(s, per_subject, rng)[1] for s in subjects])  # [S, n, 32, 32, 3]
    return images, np.array([ATTRIBUTES["shape"].index(s.shape) for s in subjects])


def to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def features(encoder: SubjectEncoder, images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 32, 32, 3] -> the pooled token [N, D] (what the projector's attention can read first)."""
    return encoder((to_pixels(images) - 0.5) / 0.5).last_hidden_state[:, 0]


def shape_ranking(embed, subjects: list[ts.Subject], seed: int = 1, n: int = 60) -> float:
    """Share of triplets (anchor, same subject re-rendered, same colour in another shape) where the same
    subject is the closer (cosine) of the two: 0.5 is chance, and colour alone cannot beat it."""
    rng = np.random.default_rng([seed, 23])
    wins = []
    for k in range(n):
        s = subjects[k % len(subjects)]
        other = ts.Subject(str(rng.choice([x for x in ATTRIBUTES["shape"] if x != s.shape])), s.colour)
        _, a = ts.subject_images(s, 2, rng)
        _, b = ts.subject_images(other, 1, rng)
        z = F.normalize(embed(np.concatenate([a, b])), dim=-1)
        wins.append(float(z[0] @ z[1] > z[0] @ z[2]))
    return float(np.mean(wins))


def heldout_shape_accuracy(embed, seed: int = 1, per_subject: int = 40) -> float:
    """Nearest-centroid shape read-out: centroids from *training* subjects' features (per shape, over
    their colours), tested on held-out subjects. 1/6 is chance; a colour->shape shortcut scores below it."""
    train, test = render_subjects(ts.train_subjects(), per_subject, seed), render_subjects(
        ts.held_out_subjects(), per_subject, seed + 1)
    ftr = F.normalize(embed(train[0].reshape(-1, *train[0].shape[2:])), dim=-1)
    ytr = torch.from_numpy(np.repeat(train[1], per_subject))
    cent = F.normalize(torch.stack([ftr[ytr == k].mean(0) for k in range(len(ATTRIBUTES["shape"]))]), dim=-1)
    fte = F.normalize(embed(test[0].reshape(-1, *test[0].shape[2:])), dim=-1)
    yte = torch.from_numpy(np.repeat(test[1], per_subject))
    return float(((fte @ cent.T).argmax(1) == yte).float().mean())


def train_subject_encoder(out_dir: str | Path, steps: int = 800, seed: int = 0, batch_subjects: int = 30,
                          views: int = 4, per_subject: int = 160, lr: float = 2e-3, shape_weight: float = 1.0,
                          progress: bool = True) -> dict:
    t0 = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    subjects = ts.train_subjects()
    images, shapes = render_subjects(subjects, per_subject, seed)
    x_all = to_pixels(images.reshape(-1, *images.shape[2:])).reshape(len(subjects), per_subject, 3, 32, 32)
    enc = SubjectEncoder()
    opt = torch.optim.AdamW(enc.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(range(steps), desc="reference_encoder", disable=not progress)
    history = []
    for step in bar:
        subj = torch.randperm(len(subjects), generator=gen)[:batch_subjects]
        pick = torch.randint(0, per_subject, (len(subj), views), generator=gen)
        x = soften(x_all[subj[:, None], pick].reshape(-1, 3, 32, 32), gen, blur_p=0.5, noise=0.04)
        ids = subj.repeat_interleave(views)
        loss = supcon(enc.embed((x - 0.5) / 0.5), ids)
        if shape_weight:
            xs = _permute_colours(x, gen)
            loss = loss + shape_weight * supcon(enc.embed((xs - 0.5) / 0.5), torch.from_numpy(shapes)[ids])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        history.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    enc.eval()
    embed = lambda ims: features(enc, ims)
    metrics = {"steps": steps, "wall_s": round(time.time() - t0, 1), "loss_first": float(np.mean(history[:20])),
               "loss_last": float(np.mean(history[-20:])),
               "heldout_shape_accuracy": heldout_shape_accuracy(embed),
               "heldout_shape_ranking": shape_ranking(embed, ts.held_out_subjects()),
               "trained_on": [s.name for s in subjects]}
    enc.save_pretrained(Path(out_dir) / NAME)
    return metrics
