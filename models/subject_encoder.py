"""SubjectEncoder: a small frozen vision backbone for reference images (the toy preset's DINO stand-in).

Why it exists: the reference path needs patch features that carry a subject's
*identity*, shape as well as colour. The toy CLIP's vision tower, trained
against captions, reads colour but barely shape (bench/RESULTS.md, issue 21),
so a projector on it learns "this colour went with that shape in training",
wrong on every held-out subject. Real presets configure a real image encoder
(CLIP-ViT / DINOv2, kind ``image_encoder``) instead; this is what the toy
preset ships in its place, trained by ``training/train_subject_encoder.py``.

Same interface as a HF vision tower where the reference code needs it: a
``config`` with ``image_size``, ``patch_size``, ``hidden_size`` and a
``__call__(pixel_values=...)`` whose ``last_hidden_state`` is [N, 1 + g*g, D]
(a pooled token first, then the patch grid row by row). Not the attribute
probe (the evaluator): a different network, trained with a different
objective (subject-contrastive, METHODS.md's rule that nothing trains on the
evaluator) on training subjects only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
PREPROCESSOR = "preprocessor_config.json"
# Pixels in [0, 1] -> roughly zero-mean; kept in a preprocessor config so the reference code's
# CLIP-style normalisation (clip_normalisation) reads it like any vision component's.
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass
class _Output:
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class SubjectEncoder(nn.Module):
    """Conv trunk to a g x g grid (stride 4 on 32 px: the latent grid), dilated convs so every grid cell sees
    the whole subject (shape is a global property), a pooled token; all tokens projected to ``hidden``."""

    def __init__(self, image_size: int = 32, hidden: int = 64, width: int = 64, embed_dim: int = 64):
        super().__init__()
        self.config = SimpleNamespace(image_size=image_size, patch_size=4, hidden_size=hidden, width=width,
                                      embed_dim=embed_dim)
        norm = lambda c: nn.GroupNorm(8, c)  # no batch statistics: a frozen encoder behaves the same per image
        self.trunk = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, padding=1), norm(width // 2), nn.GELU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1), norm(width), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), norm(width), nn.GELU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), norm(width), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), norm(width), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=4, dilation=4), norm(width), nn.GELU(),
        )
        self.to_tokens = nn.Linear(width, hidden)
        self.pool = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        # the training objective's projection head (discarded for features, as in SimCLR/DINO)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> _Output:
        h = self.trunk(pixel_values)                       # [N, C, g, g]
        grid = h.flatten(2).transpose(1, 2)                # [N, g*g, C]
        pooled = self.pool(grid.mean(1, keepdim=True))     # [N, 1, hidden]
        tokens = torch.cat([pooled, self.to_tokens(grid)], dim=1)
        return _Output(tokens, (tokens,) if output_hidden_states else None)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The contrastive embedding (unit norm) of the pooled token."""
        return nn.functional.normalize(self.head(self(pixel_values).last_hidden_state[:, 0]), dim=-1)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = {k: getattr(self.config, k) for k in ("image_size", "hidden_size", "width", "embed_dim")}
        (path / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        (path / PREPROCESSOR).write_text(json.dumps({"image_mean": MEAN, "image_std": STD}, indent=2) + "\n")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS))

    @classmethod
    def from_pretrained(cls, path: str | Path, local_files_only: bool = True) -> SubjectEncoder:
        path = Path(path)
        cfg = json.loads((path / CONFIG).read_text())
        model = cls(cfg["image_size"], cfg["hidden_size"], cfg["width"], cfg["embed_dim"])
        model.load_state_dict(load_file(str(path / WEIGHTS)))
        return model.eval()
