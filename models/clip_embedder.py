"""CLIP image/text embeddings (L2-normalised float32) for the item index and metrics."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pigment.models.loader import component_dir, load_component, read_manifest
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipEmbedder:
    def __init__(self, preset_dir: str | Path, device: str = "cpu"):
        self.model = load_component(preset_dir, "clip").to(device)
        self.tokenizer = load_component(preset_dir, "clip_tokenizer")
        self.device = device
        self.size = int(self.model.config.vision_config.image_size)
        self.dim = int(self.model.config.projection_dim)
        files = read_manifest(preset_dir)["components"]["clip"]["files"]
        # The embedding space is identified by the weights: a new CLIP means a new index.
        self.model_id = "clip-" + hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
        self.mean, self.std = clip_normalisation(preset_dir, "clip")

    def _pixels(self, images: Sequence[Image.Image | bytes | np.ndarray]) -> torch.Tensor:
        return clip_pixels(images, self.size, self.mean, self.std, self.device)

    @staticmethod
    def _normalise(x) -> np.ndarray:
        if not isinstance(x, torch.Tensor):  # transformers >= 5 returns the projection as pooler_output
            x = x.pooler_output
        return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image | bytes | np.ndarray]) -> np.ndarray:
        return self._normalise(self.model.get_image_features(pixel_values=self._pixels(images)))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        batch = self.tokenizer(list(texts), padding="max_length", truncation=True,
                               max_length=self.tokenizer.model_max_length, return_tensors="pt").to(self.device)
        return self._normalise(self.model.get_text_features(input_ids=batch.input_ids,
                                                            attention_mask=batch.attention_mask))


def clip_normalisation(preset_dir: Path, component: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of a CLIP vision component's preprocessor config (CLIP's own when it has none)."""
    pre = component_dir(preset_dir, component) / "preprocessor_config.json"
    cfg = json.loads(pre.read_text()) if pre.is_file() else {}
    return (np.asarray(cfg.get("image_mean", CLIP_MEAN), dtype=np.float32),
            np.asarray(cfg.get("image_std", CLIP_STD), dtype=np.float32))


def clip_pixels(images: Sequence[Image.Image | bytes | np.ndarray], size: int, mean: np.ndarray, std: np.ndarray,
                device) -> torch.Tensor:
    """Images (PIL, PNG/JPEG bytes or HxWx3 uint8) -> CLIP's normalised [N, 3, size, size] pixel values."""
    arrays = []
    for img in images:
        if isinstance(img, bytes):
            img = Image.open(io.BytesIO(img))
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        img = img.convert("RGB").resize((size, size), Image.BICUBIC)
        arrays.append((np.asarray(img, dtype=np.float32) / 255.0 - mean) / std)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device)
