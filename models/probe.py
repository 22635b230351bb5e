"""AttributeProbe: a small CNN that reads a toy-world item's attributes from pixels.

Used only for scoring (does a rendered image show the asked-for shape, colour,
background, size?). The attribute names and values live in ``config.json`` so
this module does not import ``training/``. Weights are safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class AttributeProbe(nn.Module):
    """Conv trunk + one linear head per attribute; input uint8 N,H,W,3 (or float N,3,H,W in [0,1])."""

    def __init__(self, attributes: dict[str, list[str]], channels: tuple[int, ...] = (32, 64, 64),
                 image_size: int = 32, hidden: int = 128):
        super().__init__()
        self.config: dict[str, Any] = {"attributes": {k: list(v) for k, v in attributes.items()},
                                       "channels": list(channels), "image_size": image_size,
                                       "hidden": hidden}
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1), nn.ReLU()]
        c_in, side = channels[0], image_size
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            c_in, side = c, (side + 1) // 2
        self.trunk = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * side * side, hidden),
                                   nn.ReLU())
        self.heads = nn.ModuleDict({a: nn.Linear(hidden, len(v)) for a, v in attributes.items()})

    @property
    def attributes(self) -> dict[str, list[str]]:
        return self.config["attributes"]

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pixels``: float N,3,H,W in [0, 1] -> attr -> logits N,n_values."""
        h = self.trunk(pixels - 0.5)
        return {a: head(h) for a, head in self.heads.items()}

    @staticmethod
    def to_tensor(images: np.ndarray) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images N,H,W,3, got shape {images.shape}")
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
        """uint8 N,H,W,3 -> attr -> int64 array of value indices."""
        self.eval()
        out: dict[str, list[np.ndarray]] = {a: [] for a in self.heads}
        for i in range(0, len(images), batch_size):
            logits = self(self.to_tensor(images[i:i + batch_size]))
            for a, lg in logits.items():
                out[a].append(lg.argmax(-1).numpy())
        return {a: np.concatenate(v) if v else np.zeros(0, np.int64) for a, v in out.items()}

    def predict_values(self, images: np.ndarray) -> list[dict[str, str]]:
        """uint8 N,H,W,3 -> one attr -> value-name dict per image."""
        idx = self.predict(images)
        n = len(images)
        return [{a: self.attributes[a][int(idx[a][i])] for a in idx} for i in range(n)]

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | Path, local_files_only: bool = True, **_: Any) -> AttributeProbe:
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path} (local_files_only={local_files_only})")
        cfg = json.loads((path / CONFIG_NAME).read_text())
        model = cls(cfg["attributes"], tuple(cfg["channels"]), cfg["image_size"], cfg["hidden"])
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        return model.eval()
