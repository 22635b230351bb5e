"""Reference conditioning: a subject's images -> extra conditioning tokens (the IP-Adapter-Plus route).

A frozen image encoder turns each reference image into patch features. Which
one is the projector's ``image_encoder`` setting (a component name, chosen in
the training config): a real preset points it at a real vision backbone
(``image_encoder``: CLIP-ViT, ``dino_encoder``: DINOv2, whose features carry a
subject's identity rather than a caption's words); the toy preset uses its
``reference_encoder`` (models/subject_encoder.py), because the toy CLIP's tower
barely encodes shape (bench/RESULTS.md, issue 21). Then a small trained resampler (``reference_projector``: K learned queries
attending over the patch features of all references, then an MLP into the text
encoder's width) turns them into K tokens. The renderer appends those tokens to
the text conditioning along the token axis, as it does PMG's soft tokens, so the
UNet stays untouched and any preset that ships a projector can serve references.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pigment.models.clip_embedder import clip_normalisation, clip_pixels
from pigment.models.loader import has_component, load_component
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

PROJECTOR = "reference_projector"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class ReferenceProjector(nn.Module):
    """Patch features [B, P, image_dim] -> K tokens [B, K, text_dim]: ``depth`` self-attention layers over the
    patches (shape is spread over many patches; a frozen tower made for captions may not have pooled it),
    then K learned queries attend over them (IP-Adapter-Plus's resampler, one layer)."""

    def __init__(self, image_dim: int, text_dim: int, num_tokens: int = 4, heads: int = 4,
                 image_encoder: str = "clip", depth: int = 0, feature_layer: int = -1):
        super().__init__()
        self.config = {"image_dim": image_dim, "text_dim": text_dim, "num_tokens": num_tokens, "heads": heads,
                       "image_encoder": image_encoder, "depth": depth, "feature_layer": feature_layer}
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(image_dim, heads, 4 * image_dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(depth))
        self.queries = nn.Parameter(torch.randn(num_tokens, image_dim) * 0.02)
        self.norm_in = nn.LayerNorm(image_dim)
        self.attn = nn.MultiheadAttention(image_dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, 4 * image_dim), nn.GELU(),
                                 nn.Linear(4 * image_dim, image_dim))
        self.out = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, text_dim))

    @property
    def num_tokens(self) -> int:
        return self.config["num_tokens"]

    def forward(self, patches: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` [B, P] True where a patch is padding (requests with fewer references in a batch)."""
        for block in self.blocks:
            patches = block(patches, src_key_padding_mask=mask)
        kv = self.norm_in(patches)
        q = self.queries.unsqueeze(0).expand(patches.shape[0], -1, -1)
        h = q + self.attn(q, kv, kv, key_padding_mask=mask, need_weights=False)[0]
        h = h + self.mlp(h)
        return self.out(h)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG).write_text(json.dumps(self.config, indent=2))
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS))

    @classmethod
    def from_pretrained(cls, path: str | Path, local_files_only: bool = True) -> ReferenceProjector:
        path = Path(path)
        model = cls(**json.loads((path / CONFIG).read_text()))
        model.load_state_dict(load_file(str(path / WEIGHTS)))
        return model.eval()


def has_reference(preset_dir: str | Path) -> bool:
    """Whether the preset can serve reference images (it ships a trained projector)."""
    return has_component(preset_dir, PROJECTOR)


class ImagePatches:
    """A frozen vision tower (CLIP / DINOv2 / the toy SubjectEncoder) -> per-patch features (CLS/pooled first)."""

    def __init__(self, preset_dir: str | Path, component: str = "clip", device: str = "cpu"):
        model = load_component(preset_dir, component)
        self.tower = getattr(model, "vision_model", model).to(device).eval().requires_grad_(False)
        self.device = device
        self.size = int(self.tower.config.image_size)
        self.dim = int(self.tower.config.hidden_size)
        self.patch = int(self.tower.config.patch_size)
        self.mean, self.std = clip_normalisation(preset_dir, component)

    @property
    def grid(self) -> int:
        return self.size // self.patch

    def pixels(self, images: Sequence[Image.Image | bytes | np.ndarray]) -> torch.Tensor:
        return clip_pixels(images, self.size, self.mean, self.std, self.device)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image | bytes | np.ndarray], batch_size: int = 256,
                 layer: int = -1) -> torch.Tensor:
        """[N, 1 + grid*grid, dim]: the CLS token, then the patches row by row; ``layer`` -1 is the last
        hidden state, k >= 1 the output of the k-th transformer block."""
        out = []
        for i in range(0, len(images), batch_size):
            res = self.tower(pixel_values=self.pixels(images[i:i + batch_size]), output_hidden_states=layer != -1)
            out.append(res.last_hidden_state if layer == -1 else res.hidden_states[layer])
        return torch.cat(out).float()


class ReferenceEncoder:
    """The preset's image encoder + reference projector: one request's reference images -> [K, text_dim]."""

    def __init__(self, preset_dir: str | Path, device: str = "cpu"):
        self.projector = load_component(preset_dir, PROJECTOR).to(device).eval()
        self.patches = ImagePatches(preset_dir, self.projector.config["image_encoder"], device)
        self.device = device

    @property
    def num_tokens(self) -> int:
        return self.projector.num_tokens

    @torch.no_grad()
    def tokens(self, images: Sequence[Image.Image | bytes | np.ndarray]) -> np.ndarray:
        """All references of one subject attend together (their patches concatenated) -> K tokens."""
        if not images:
            raise ValueError("at least one reference image is needed")
        feats = self.patches(images, layer=self.projector.config.get("feature_layer", -1))
        return self.projector(feats.reshape(1, -1, feats.shape[-1]))[0].float().cpu().numpy()
