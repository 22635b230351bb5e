"""PMG's implicit-preference head: learned prefix + image tokens and a projection.

``prefix`` (P vectors) is prepended to the history prompt and ``image_tokens``
(M vectors) appended after it, both in the LLM's input-embedding space; the
LLM's last hidden states at the M image positions go through ``proj`` into the
text encoder's width, giving M soft tokens appended to the conditioning.

PMG's P-Tuning v2 prefix lives in every layer's key/values; we use input-level
prefix vectors (prompt tuning), which need no model-specific cache plumbing and
work for any causal LM that accepts ``inputs_embeds``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class PreferenceHead(nn.Module):
    def __init__(self, llm_hidden: int, text_hidden: int, num_prefix: int = 2, num_image_tokens: int = 2):
        super().__init__()
        self.config = {
            "llm_hidden": llm_hidden,
            "text_hidden": text_hidden,
            "num_prefix": num_prefix,
            "num_image_tokens": num_image_tokens,
        }
        self.prefix = nn.Parameter(torch.randn(num_prefix, llm_hidden) * 0.02)
        self.image_tokens = nn.Parameter(torch.randn(num_image_tokens, llm_hidden) * 0.02)
        self.proj = nn.Linear(llm_hidden, text_hidden)

    @property
    def num_image_tokens(self) -> int:
        return self.config["num_image_tokens"]

    def forward(self, llm, history_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """history_embeds [B, T, H] (LLM input embeddings) -> soft tokens [B, M, text_hidden]."""
        batch = history_embeds.shape[0]
        prefix = self.prefix.unsqueeze(0).expand(batch, -1, -1).to(history_embeds.dtype)
        image = self.image_tokens.unsqueeze(0).expand(batch, -1, -1).to(history_embeds.dtype)
        embeds = torch.cat([prefix, history_embeds, image], dim=1)
        if attention_mask is not None:
            ones_p = attention_mask.new_ones(batch, prefix.shape[1])
            ones_i = attention_mask.new_ones(batch, image.shape[1])
            attention_mask = torch.cat([ones_p, attention_mask, ones_i], dim=1)
        out = llm(inputs_embeds=embeds, attention_mask=attention_mask, output_hidden_states=True)
        hidden = out.hidden_states[-1][:, -self.num_image_tokens :]
        return self.proj(hidden.to(self.proj.weight.dtype))

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG).write_text(json.dumps(self.config, indent=2))
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS))

    @classmethod
    def from_pretrained(cls, path: str | Path, local_files_only: bool = True) -> PreferenceHead:
        path = Path(path)
        head = cls(**json.loads((path / CONFIG).read_text()))
        head.load_state_dict(load_file(str(path / WEIGHTS)))
        return head
