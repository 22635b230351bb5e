"""Training-time augmentation for toy renders: a random mix with a 3x3 blur plus mild pixel noise, so
networks trained on crisp toy images read slightly soft diffusion renders fairly (the attribute probe,
the reference encoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soften(x: torch.Tensor, gen: torch.Generator, blur_p: float, noise: float) -> torch.Tensor:
    """Blur mixed in (a random amount) for a share ``blur_p`` of images, noise up to ``noise``; [0, 1] kept."""
    n = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) < blur_p)
    x = x * (1 - mix) + blur * mix
    return (x + torch.randn(x.shape, generator=gen) * noise * torch.rand(n, 1, 1, 1, generator=gen)).clamp(0, 1)
