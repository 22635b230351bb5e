"""What every UNet backend shares: the shape profile, the runner contract, the error.

A runner is a drop-in for ``pipe.unet`` in a diffusers ``StableDiffusionPipeline``
called with ``prompt_embeds``: the pipeline reads ``config.in_channels``,
``config.sample_size``, ``config.time_cond_proj_dim`` and ``dtype``, and calls
``unet(latents, t, encoder_hidden_states=..., timestep_cond=None,
cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=False)[0]``.
A runner is deliberately not an ``nn.Module``: the pipeline then takes its device
from the VAE, and no offload hook or ``.to()`` reaches a compiled engine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

PRECISIONS = ("fp32", "fp16")


class BackendUnavailable(RuntimeError):
    """A backend that was asked for cannot run here; the message says why.

    Serving maps it to ``ModelNotReady``; models/ does not import services/.
    """


@dataclass(frozen=True)
class ShapeProfile:
    """Allowed (min, opt, max) sizes per dynamic axis; latent H/W are in latent pixels.

    ``opt`` is what the export traces and what TensorRT tunes for. ``multiple`` is
    the UNet's own constraint: latent H/W must divide by 2 ** (number of down blocks - 1).
    """

    batch: tuple[int, int, int] = (1, 2, 16)
    height: tuple[int, int, int] = (8, 64, 128)
    width: tuple[int, int, int] = (8, 64, 128)
    seq_len: tuple[int, int, int] = (1, 77, 512)
    multiple: int = 8

    def __post_init__(self) -> None:
        for axis in ("batch", "height", "width", "seq_len"):
            low, opt, high = getattr(self, axis)
            if not 1 <= low <= opt <= high:
                raise ValueError(
                    f"ShapeProfile.{axis}={(low, opt, high)}: need 1 <= min <= opt <= max"
                )

    @classmethod
    def for_unet(cls, config: Any, *, max_batch: int = 16, max_seq_len: int = 512) -> ShapeProfile:
        """A default profile: latents from 1x to 2x the UNet's sample_size."""
        from pigment.models.loader import latent_range

        size = config.sample_size
        size = size if isinstance(size, int) else max(size)
        multiple, low, _ = latent_range(size, len(config.down_block_types))
        return cls(
            batch=(1, min(2, max_batch), max_batch),
            height=(low, size, 2 * size),
            width=(low, size, 2 * size),
            seq_len=(1, min(77, max_seq_len), max_seq_len),
            multiple=multiple,
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def check(self, batch: int, height: int, width: int, seq_len: int) -> None:
        """Raise ValueError naming the value passed and the range allowed."""
        for axis, value in (("batch", batch), ("seq_len", seq_len)):
            low, _, high = getattr(self, axis)
            if not low <= value <= high:
                raise ValueError(
                    f"{axis}={value} is outside this backend's profile: allowed {low}..{high}"
                )
        for axis, value in (("height", height), ("width", width)):
            low, _, high = getattr(self, axis)
            if not low <= value <= high or value % self.multiple:
                raise ValueError(
                    f"latent {axis}={value} is not allowed: latent {axis} must be a multiple of "
                    f"{self.multiple} in {low}..{high} (image {axis} x8 with an SD VAE: "
                    f"multiple of {8 * self.multiple} in {8 * low}..{8 * high})"
                )


class UNetRunner:
    """Calls a UNet the way diffusers does; subclasses implement ``_run``."""

    name = "base"

    def __init__(
        self, config: Any, *, profile: ShapeProfile, device: str, precision: str, cache_key: str
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not allowed: one of {PRECISIONS}")
        self.config = config
        self.profile = profile
        self.device = torch.device(device)
        self.precision = precision
        self.cache_key = cache_key

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the pipeline should make latents and embeddings in."""
        return torch.float16 if self.precision == "fp16" else torch.float32

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **unsupported: Any,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        extras = {
            "timestep_cond": timestep_cond,
            "cross_attention_kwargs": cross_attention_kwargs,
            "added_cond_kwargs": added_cond_kwargs,
            **unsupported,
        }
        passed = sorted(k for k, v in extras.items() if v is not None and not _empty_dict(v))
        if passed:
            raise ValueError(
                f"{self.name} UNet backend does not take {passed}: the export has "
                "inputs sample, timestep and encoder_hidden_states only"
            )
        batch, _, height, width = sample.shape
        self.profile.check(batch, height, width, encoder_hidden_states.shape[1])
        if encoder_hidden_states.shape[0] != batch:
            raise ValueError(
                f"encoder_hidden_states batch {encoder_hidden_states.shape[0]} "
                f"!= sample batch {batch}"
            )
        timesteps = torch.as_tensor(timestep, device=sample.device).float().reshape(-1)
        timesteps = timesteps.expand(batch).contiguous()
        out = self._run(sample, timesteps, encoder_hidden_states).to(sample.dtype)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def _run(
        self, sample: torch.Tensor, timesteps: torch.Tensor, ehs: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def ready(self) -> bool:
        """Cheap check that the runner can take a call."""
        return True

    def close(self) -> None:
        """Release sessions / engines; the runner must not be called afterwards."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(device={self.device}, precision={self.precision}, "
            f"key={self.cache_key[:12]})"
        )


def _empty_dict(value: Any) -> bool:
    return isinstance(value, dict) and not value
