"""The renderer: a diffusers Stable Diffusion pipeline fed with composed conditioning.

Conditioning is a list of text *segments* (content prompt, keyword prompt ...),
each encoded separately by the text encoder and scaled by its weight, then
concatenated along the token axis, followed by the user's soft tokens. Cross
attention accepts any sequence length, so this is how PMG balances the target
against the user without retraining the UNet. The negative (unconditional)
side is the encoding of "" for each segment and zeros for the soft tokens.

One call renders one request; per-image generators (seed + i) keep every image
reproducible whether it is rendered alone or in a batch.

The pipeline follows the UNet's config, not the preset's name: a UNet with
``addition_embed_type="text_time"`` (SDXL's) is served by ``StableDiffusionXLPipeline``.
There each segment is encoded by both text encoders (penultimate hidden states,
concatenated along features, as SDXL does), the pooled vector is text_encoder_2's
projection of the whole prompt (the segments joined with ", "), and the pipeline adds
the size/crop time ids. Soft tokens work when the preference head writes the UNet's
cross-attention width (both encoders side by side); the exported backends
(onnxruntime, tensorrt) take SD-style UNets only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from pigment.models.loader import (
    SAMPLER_KEYS,
    has_component,
    load_component,
    preset_version,
    sampler_defaults,
    torch_dtype,
)
from PIL import Image


@dataclass
class RenderInputs:
    segments: Sequence[str]
    segment_weights: Sequence[float] | None = None
    soft_tokens: np.ndarray | None = None  # [M, text_dim]
    soft_weight: float = 1.0
    reference_tokens: np.ndarray | None = None  # [K, text_dim] from models/reference.py (a subject's images)
    num_images: int = 1
    seed: int = 0
    # None: the preset's manifest defaults (``Renderer.defaults``); no sampler numbers live here
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    # an edit (masked image-to-image): the source image (uint8 HxWx3), what may change (bool HxW), how much
    init_image: np.ndarray | None = None
    mask: np.ndarray | None = None
    strength: float = 1.0
    repaint_whole: bool = False  # the UNet repaints the whole image; only ``mask`` is pasted into the source


@dataclass
class RenderOutput:
    images: list[Image.Image]
    seeds: list[int]
    model_version: str
    conditioning_tokens: int = 0
    extras: dict = field(default_factory=dict)


class Renderer:
    """Holds the diffusion components of one preset; ``render`` is one generation."""

    def __init__(self, preset_dir: str | Path, backend: str = "torch", device: str = "cpu", cache_dir: Path | None = None,
                 unet_adapter: str | Path | None = None, dtype: str | None = None, backend_options: dict | None = None):
        self.preset_dir = Path(preset_dir)
        self.device = device
        self.model_version = preset_version(preset_dir)
        self.defaults = sampler_defaults(preset_dir)
        # One precision for every component (a checkpoint stored in fp16 is cast too): mixed dtypes
        # break the pipeline ("mat1 and mat2 must have the same dtype").
        self.dtype_name = dtype or self.defaults.get("dtype", "fp32")
        if self.dtype_name != "fp32" and torch.device(device).type == "cpu":
            raise ValueError(f"dtype={self.dtype_name!r} is not allowed on cpu: use 'fp32'")
        self.dtype = torch_dtype(self.dtype_name)
        self.tokenizer = load_component(preset_dir, "tokenizer")
        self.text_encoder = self._place(load_component(preset_dir, "text_encoder"))
        unet = self._place(load_component(preset_dir, "unet"))
        self.sdxl = is_sdxl(unet.config)
        adapter_hash = None
        if unet_adapter is not None:  # a UNet LoRA (e.g. `pigment train diffusion-dpo`), fused into the weights
            adapter_hash = load_unet_lora(unet, unet_adapter)
            self.model_version += f"+unet-{adapter_hash}"
        self.backend = backend
        if backend != "torch":
            from pigment.models.backends import BackendUnavailable, load_unet_backend

            if self.sdxl:
                raise BackendUnavailable(
                    f"backend={backend!r} exports SD-style UNets (sample, timestep, encoder_hidden_states); this "
                    "preset's UNet also takes SDXL's pooled text embeds and time ids: use render_backend 'torch'")

            if self.dtype_name == "bf16":
                raise ValueError(f"dtype='bf16' is not allowed with backend={backend!r}: use fp16 or fp32")
            unet = load_unet_backend(backend, unet, cache_dir=cache_dir or self.preset_dir / ".engines", device=device,
                                     adapter_hash=adapter_hash, precision="fp16" if self.dtype_name == "fp16" else "fp32",
                                     **(backend_options or {}))
        vae, scheduler = self._place(load_component(preset_dir, "vae")), load_component(preset_dir, "scheduler")
        if self.sdxl:
            self.pipe = self._sdxl_pipeline(vae, unet, scheduler)
            self.text_dim = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
        else:
            from diffusers import StableDiffusionPipeline

            self.pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            self.text_dim = self.text_encoder.config.hidden_size
        self.pipe.set_progress_bar_config(disable=True)
        self.vae_scale = self.pipe.vae_scale_factor
        self._inpaint = None

    def _sdxl_pipeline(self, vae, unet, scheduler):
        from diffusers import StableDiffusionXLPipeline
        from pigment.models.loader import has_component

        missing = [n for n in ("text_encoder_2", "tokenizer_2") if not has_component(self.preset_dir, n)]
        if missing:
            raise ValueError(f"{self.preset_dir}: the UNet is SDXL's (addition_embed_type 'text_time') but the "
                             f"preset has no {missing}: record them with `pigment models manifest`")
        self.tokenizer_2 = load_component(self.preset_dir, "tokenizer_2")
        self.text_encoder_2 = self._place(load_component(self.preset_dir, "text_encoder_2"))
        if self.tokenizer_2.model_max_length != self.tokenizer.model_max_length:
            raise ValueError(f"tokenizer_2 pads to {self.tokenizer_2.model_max_length} tokens, tokenizer to "
                             f"{self.tokenizer.model_max_length}: SDXL concatenates them per token, they must match")
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False)

    def _place(self, module):
        """On this renderer's device, in its dtype (cast only when stored otherwise: no-op casts warn)."""
        module = module.to(self.device)
        return module if next(module.parameters()).dtype == self.dtype else module.to(self.dtype)

    def _ids(self, tokenizer, text: str) -> torch.Tensor:
        return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def encode_text(self, text: str) -> torch.Tensor:
        """[T, text_dim]: the last hidden states; SDXL: both encoders' penultimate ones, side by side."""
        if not self.sdxl:
            return self.text_encoder(self._ids(self.tokenizer, text))[0][0]
        return torch.cat([enc(self._ids(tok, text), output_hidden_states=True).hidden_states[-2][0]
                          for tok, enc in ((self.tokenizer, self.text_encoder),
                                           (self.tokenizer_2, self.text_encoder_2))], dim=-1)

    @torch.no_grad()
    def pooled(self, inputs: RenderInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's (positive, negative) pooled embeds: text_encoder_2's projection of the joined prompt and of ""."""
        prompt = ", ".join(s for s in inputs.segments if s)
        return tuple(self.text_encoder_2(self._ids(self.tokenizer_2, t))[0][0] for t in (prompt, ""))

    def conditioning(self, inputs: RenderInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) embeddings [T, D] for one request."""
        weights = inputs.segment_weights or [1.0] * len(inputs.segments)
        empty = self.encode_text("")
        pos = [self.encode_text(seg) * w for seg, w in zip(inputs.segments, weights)]
        neg = [empty for _ in inputs.segments]
        if inputs.soft_tokens is not None and len(inputs.soft_tokens):
            soft = torch.as_tensor(np.asarray(inputs.soft_tokens, dtype=np.float32), device=self.device).to(self.dtype)
            if soft.ndim != 2 or soft.shape[1] != self.text_dim:
                raise ValueError(f"soft tokens must be [M, {self.text_dim}], got {tuple(soft.shape)}")
            pos.append(soft * inputs.soft_weight)
            neg.append(torch.zeros_like(soft))
        if inputs.reference_tokens is not None:  # the unconditional side sees zeros, as in training
            ref = torch.as_tensor(np.asarray(inputs.reference_tokens, dtype=np.float32), device=self.device)
            if ref.ndim != 2 or ref.shape[1] != self.text_dim:
                raise ValueError(f"reference tokens must be [K, {self.text_dim}], got {tuple(ref.shape)}")
            pos.append(ref.to(self.dtype))
            neg.append(torch.zeros_like(pos[-1]))
        return torch.cat(pos), torch.cat(neg)

    def reference_tokens(self, images: Sequence) -> np.ndarray:
        """A subject's reference images -> [K, text_dim] tokens (the preset's reference projector, loaded once).
        ValueError when the preset has none: the request cannot be served by this model."""
        from pigment.models.reference import ReferenceEncoder, has_reference

        if self.__dict__.get("_reference") is None:
            if not has_reference(self.preset_dir):
                raise ValueError(f"the preset at {self.preset_dir} has no reference_projector: "
                                 "it cannot render reference images")
            self._reference = ReferenceEncoder(self.preset_dir, device=self.device)
        return self._reference.tokens(images)

    def with_defaults(self, inputs: RenderInputs) -> RenderInputs:
        """``inputs`` with unset sampler fields taken from the preset's manifest."""
        unset = {k: self.defaults[k] for k in SAMPLER_KEYS if getattr(inputs, k) is None}
        return replace(inputs, **unset) if unset else inputs

    def check_inputs(self, inputs: RenderInputs) -> None:
        inputs = self.with_defaults(inputs)
        for name in ("height", "width"):
            value = getattr(inputs, name)
            if value % (self.vae_scale * 4) != 0:
                raise ValueError(f"{name}={value} must be a multiple of {self.vae_scale * 4} for this model")
        if not inputs.segments:
            raise ValueError("at least one text segment is needed (use '' for unconditional)")
        if inputs.init_image is not None:
            check_edit_inputs(inputs)

    def batch_key(self, inputs: RenderInputs) -> tuple:
        """Requests with equal keys can share one pipeline call (same shapes, schedule and token count)."""
        inputs = self.with_defaults(inputs)
        soft = 0 if inputs.soft_tokens is None else len(inputs.soft_tokens)
        soft += 0 if inputs.reference_tokens is None else len(inputs.reference_tokens)
        tokens = len(inputs.segments) * self.tokenizer.model_max_length + soft
        edit = () if inputs.init_image is None else ("edit", inputs.strength, inputs.repaint_whole)
        return (inputs.height, inputs.width, inputs.num_inference_steps, inputs.guidance_scale, tokens, *edit)

    @torch.no_grad()
    def render(self, inputs: RenderInputs, on_step: Callable[[int, int], None] | None = None) -> RenderOutput:
        return self.render_batch([inputs], on_step)[0]

    @torch.no_grad()
    def render_batch(self, batch: Sequence[RenderInputs],
                     on_step: Callable[[int, int], None] | None = None) -> list[RenderOutput]:
        """Render several requests in one denoising loop (guidance doubles the batch inside the pipeline).

        All requests must share a ``batch_key``. Each image has its own generator
        (request seed + i), so results equal rendering each request alone.
        """
        batch = [self.with_defaults(inputs) for inputs in batch]
        for inputs in batch:
            self.check_inputs(inputs)
        keys = {self.batch_key(inputs) for inputs in batch}
        if len(keys) != 1:
            raise ValueError(f"requests in one batch must share size, steps, guidance and token count: {keys}")
        conds = [self.conditioning(inputs) for inputs in batch]
        first = batch[0]
        seeds = [[inputs.seed + i for i in range(inputs.num_images)] for inputs in batch]
        pos = torch.cat([p.unsqueeze(0).expand(x.num_images, -1, -1) for (p, _), x in zip(conds, batch)])
        neg = torch.cat([n.unsqueeze(0).expand(x.num_images, -1, -1) for (_, n), x in zip(conds, batch)])

        def callback(pipe, step, timestep, kwargs):
            if on_step is not None:
                on_step(step + 1, first.num_inference_steps)
            return {}

        generators = [torch.Generator("cpu").manual_seed(s) for group in seeds for s in group]
        if first.init_image is not None:
            images = self._edit(batch, pos, neg, generators, callback)
        else:
            images = self._generate(batch, pos, neg, generators, callback)
        outputs, start = [], 0
        for group, (p, _) in zip(seeds, conds):
            outputs.append(RenderOutput(images=images[start:start + len(group)], seeds=group,
                                        model_version=self.model_version, conditioning_tokens=int(p.shape[0])))
            start += len(group)
        return outputs

    def _generate(self, batch: Sequence[RenderInputs], pos, neg, generators, callback) -> list[Image.Image]:
        first, extra = batch[0], {}
        if self.sdxl:
            pooled = [self.pooled(inputs) for inputs in batch]
            for i, key in enumerate(("pooled_prompt_embeds", "negative_pooled_prompt_embeds")):
                extra[key] = torch.cat([p[i].unsqueeze(0).expand(x.num_images, -1) for p, x in zip(pooled, batch)])
        return self.pipe(
            **extra,
            prompt_embeds=pos,
            negative_prompt_embeds=neg,
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            height=first.height,
            width=first.width,
            generator=generators,
            callback_on_step_end=callback,
            output_type="pil",
        ).images

    @property
    def inpaint_pipe(self):
        """diffusers' inpainting pipeline on this renderer's components (built once).

        With a 4-channel UNet diffusers blends the noised source latents outside the mask at every step
        (masked image-to-image); a preset with a 9-channel ``unet_inpaint`` component uses that instead."""
        if self._inpaint is None:
            from diffusers import StableDiffusionInpaintPipeline

            if self.sdxl:
                raise ValueError("EditImage runs the SD 1.x inpainting pipeline: an SDXL preset cannot edit yet")

            parts = dict(self.pipe.components)
            if has_component(self.preset_dir, "unet_inpaint"):
                if self.backend != "torch":
                    raise ValueError(f"the preset's 9-channel unet_inpaint runs on the torch backend only, "
                                     f"not {self.backend!r}: serve edits from a torch worker")
                parts["unet"] = self._place(load_component(self.preset_dir, "unet_inpaint"))
            self._inpaint = StableDiffusionInpaintPipeline(**parts)
            self._inpaint.set_progress_bar_config(disable=True)
        return self._inpaint

    def _edit(self, batch: Sequence[RenderInputs], pos, neg, generators, callback) -> list[Image.Image]:
        """Masked image-to-image: only the mask is repainted; outside it the source pixels are kept exactly."""
        first = batch[0]
        sources = [x.init_image for x in batch for _ in range(x.num_images)]
        masks = [x.mask for x in batch for _ in range(x.num_images)]
        out = self.inpaint_pipe(
            prompt_embeds=pos, negative_prompt_embeds=neg, image=[Image.fromarray(s) for s in sources],
            mask_image=[Image.fromarray((latent_cells(m, self.vae_scale) | first.repaint_whole).astype(np.uint8) * 255)
                        for m in masks],
            height=first.height,
            width=first.width, strength=first.strength, num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale, generator=generators, callback_on_step_end=callback,
            output_type="np").images
        # the VAE round trip blurs what should not change: paste the source back outside the mask
        return [Image.fromarray(np.where(m[..., None], np.round(o * 255).astype(np.uint8), s))
                for o, s, m in zip(out, sources, masks)]


def latent_cells(mask: np.ndarray, scale: int) -> np.ndarray:
    """``mask`` grown to whole latent cells (scale x scale pixel blocks): a cell the mask touches is repainted.

    The pipeline samples the mask at latent resolution; a cell left out there keeps the source's latent, so
    pixels of the mask inside it would come back unchanged from the VAE. The pixel mask still decides what
    is pasted back (``Renderer._edit``)."""
    h, w = mask.shape
    cells = mask[: h // scale * scale, : w // scale * scale].reshape(h // scale, scale, w // scale, scale)
    return np.repeat(np.repeat(cells.any(axis=(1, 3)), scale, 0), scale, 1)


def check_edit_inputs(inputs: RenderInputs) -> None:
    shape = (inputs.height, inputs.width)
    if inputs.init_image.dtype != np.uint8 or inputs.init_image.shape != (*shape, 3):
        raise ValueError(f"edit source must be uint8 {shape[0]}x{shape[1]}x3, got {inputs.init_image.dtype} "
                         f"{inputs.init_image.shape}")
    if inputs.mask is None or inputs.mask.shape != shape or not inputs.mask.any():
        raise ValueError(f"edit mask must be a non-empty {shape[0]}x{shape[1]} boolean array")
    if not 0.0 < inputs.strength <= 1.0:
        raise ValueError(f"edit strength={inputs.strength} must be in (0, 1]")


def is_sdxl(unet_config) -> bool:
    """SDXL's UNet: conditioned on pooled text embeds and size/crop time ids besides cross attention."""
    return getattr(unet_config, "addition_embed_type", None) == "text_time"


UNET_LORA_FILE = "pytorch_lora_weights.safetensors"


def load_unet_lora(unet, adapter_dir: str | Path) -> str:
    """Load a diffusers-format UNet LoRA from a local directory, fuse it; returns a short hash of the file."""
    from pigment.models.loader import sha256_file

    path = Path(adapter_dir) / UNET_LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {UNET_LORA_FILE} in {adapter_dir}")
    unet.load_lora_adapter(str(adapter_dir), prefix=None, weight_name=UNET_LORA_FILE, use_safetensors=True,
                           local_files_only=True)
    unet.fuse_lora()
    return sha256_file(path)[:10]
