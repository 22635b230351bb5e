"""`pigment models build --arch ARCH`: real architectures from configs, random weights, nothing downloaded.

``sdxl-small`` is SDXL's architecture at a small width: a UNet with ``addition_embed_type="text_time"``
(pooled text embeds + size/crop time ids), two CLIP text encoders (``CLIPTextModel`` and
``CLIPTextModelWithProjection``, their hidden states concatenated for cross attention), the SDXL VAE's
8x downscale and scaling factor, and an Euler scheduler; it builds in seconds (~20 MB) and renders at
its native 128x128. The renderer picks the SDXL pipeline from the UNet's config, not from the name.

``sd15`` is Stable Diffusion 1.5's shape (UNet 860M, VAE 84M, CLIP text encoder 123M with a 49,408-entry
embedding table, PNDM scheduler), a 105M-class Llama with a chat template (an instruction-tuned LLM's
interface), a ViT-B/32-class CLIP for retrieval and a PMG preference head: about 4.7 GB in fp32.
Tokenizers are word-level, trained locally on a small vocabulary (their ids fit the real embedding
tables). Everything is saved with ``save_pretrained`` and recorded by ``write_manifest`` with the
architecture's own sampler defaults, so the preset loads through the same loader as a real checkpoint.
Random weights render noise: this proves plumbing, memory and speed at real size, not quality.
"""

from __future__ import annotations

import json
from pathlib import Path

from pigment.models.loader import write_manifest

ARCHS = ("tiny", "sd15", "sdxl-small")
# An instruction-tuned LLM's interface: the keyword request goes through the tokenizer's chat template,
# and the answer is free text ("red, dark background, large") parsed by the preset's keyword format.
CHAT_TEMPLATE = ("{% for m in messages %}[BOS] {{ m['role'] }} : {{ m['content'] }} [EOS] {% endfor %}"
                 "{% if add_generation_prompt %}[BOS] assistant : {% endif %}")
SD15_PREFERENCE = {
    "keyword_format": "free",  # comma/line separated phrases, not the toy LLM's numbered list
    "chat_template": True,
    "keyword_instruction": "List up to five short visual keywords (colours, styles, backgrounds) this user "
                           "likes, separated by commas. History:\n{history}",
    "history_line": "- {caption}",
    "max_keywords": 5,
    "max_new_tokens": 24,
    "max_caption_chars": 200,
    "keyword_weight": 1.0,
    "soft_weight": 0.5,
    "soft_weight_alone": 1.0,
}


def build_preset(arch: str, out_dir: str | Path, seed: int = 0, dtype: str = "fp32") -> Path:
    if arch == "tiny":
        from pigment.models.tiny import build_tiny

        return build_tiny(out_dir, seed=seed)
    if arch == "sd15":
        return build_sd15(out_dir, seed=seed, dtype=dtype)
    if arch == "sdxl-small":
        return build_sdxl_small(out_dir, seed=seed, dtype=dtype)
    raise ValueError(f"arch={arch!r} is not allowed: one of {ARCHS}")


def sd15_parts(seed: int = 0) -> dict:
    """Every component, built from SD 1.5's configs (weights random, from ``seed``)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from pigment.models.preference_head import PreferenceHead
    from pigment.models.tiny import VOCAB_WORDS, build_word_tokenizer
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(VOCAB_WORDS, model_max_length=77)
    llm_tokenizer = build_word_tokenizer(VOCAB_WORDS + ["assistant", "system", "list", "up", "to", "five",
                                                        "short", "visual", "likes", "separated", "by",
                                                        "commas", "colours", "styles", "backgrounds", "this",
                                                        "-"], model_max_length=2048)
    llm_tokenizer.chat_template = CHAT_TEMPLATE
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    parts = {
        "unet": UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8),
        "vae": AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512),
        "scheduler": PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                                   set_alpha_to_one=False),
        "text_encoder": CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            **special)),
        "tokenizer": tokenizer,
        "llm": LlamaForCausalLM(LlamaConfig(
            vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=10,
            num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048, **special)),
        "llm_tokenizer": llm_tokenizer,
        "clip": CLIPModel(CLIPConfig(
            text_config={"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                         "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
                         **special},
            vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                           "num_attention_heads": 12, "image_size": 224, "patch_size": 32},
            projection_dim=512)),
        "clip_tokenizer": tokenizer,
        "preference_head": PreferenceHead(llm_hidden=768, text_hidden=768, num_prefix=4, num_image_tokens=4),
    }
    return parts


def save_parts(out: Path, parts: dict, dtype: str) -> list[str]:
    """``save_pretrained`` every part (popped, so a multi-GB model is freed as soon as it is written)."""
    import torch

    names = list(parts)
    for name in names:
        part = parts.pop(name)
        if dtype == "fp16" and isinstance(part, torch.nn.Module):
            part = part.to(torch.float16)  # stored in fp16 (as released checkpoints often are); served per dtype
        part.save_pretrained(out / name)
        del part
    return names


def build_sd15(out_dir: str | Path, seed: int = 0, dtype: str = "fp32") -> Path:
    return write_random_preset(
        out_dir, "sd15", sd15_parts(seed), SD15_PREFERENCE, seed, dtype,
        # SD 1.5's own sampler settings (diffusers' pipeline defaults) at its native 512x512
        defaults={"num_inference_steps": 50, "guidance_scale": 7.5, "height": 512, "width": 512,
                  "num_images": 1, "dtype": "fp32"},
        # random weights: the gate's CLIP guard checks plumbing, not quality, so it renders cheaply on a CPU
        retrain={"gate": "preference", "gate_steps": 2, "gate_size": 256},
    )


def write_random_preset(out_dir: str | Path, arch: str, parts: dict, preference: dict, seed: int, dtype: str,
                        defaults: dict, retrain: dict) -> Path:
    """Save ``parts`` (random weights) as preset ``arch`` under ``out_dir``, with its manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = save_parts(out, parts, dtype)
    (out / "preference.json").write_text(json.dumps(preference, indent=2))
    command = f"pigment models build --arch {arch} --dir DIR --seed {seed} --dtype {dtype}"
    write_manifest(
        out, {n: {"path": n, "kind": n, "training_command": command, "data_seed": seed} for n in names},
        preset=arch, version=f"{arch}-random-1", defaults=defaults, retrain=retrain,
    )
    return out


def sdxl_small_parts(seed: int = 0) -> dict:
    """SDXL's component layout and UNet conditioning at a small width (weights random, from ``seed``).

    As in SDXL: the first down block has no attention, deeper blocks stack more transformer layers,
    ``attention_head_dim`` counts heads, linear projections in the transformers, cross attention over
    the two encoders' penultimate hidden states concatenated (32 + 64 here; 768 + 1280 in SDXL), and the
    ``text_time`` embedding of text_encoder_2's pooled projection plus six size/crop ids.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from pigment.models.preference_head import PreferenceHead
    from pigment.models.tiny import VOCAB_WORDS, build_word_tokenizer
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(VOCAB_WORDS, model_max_length=77)
    llm_tokenizer = build_word_tokenizer(VOCAB_WORDS, model_max_length=256)
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    te1, te2, pooled, time_dim = 32, 64, 32, 8
    text = {"vocab_size": len(tokenizer), "intermediate_size": 64, "num_hidden_layers": 2,
            "max_position_embeddings": 77, **special}
    return {
        "unet": UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
            cross_attention_dim=te1 + te2, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + pooled, norm_num_groups=8),
        "vae": AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
            layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, sample_size=128,
            scaling_factor=0.13025, force_upcast=True),
        "scheduler": EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading"),
        "text_encoder": CLIPTextModel(CLIPTextConfig(hidden_size=te1, num_attention_heads=4, **text)),
        "tokenizer": tokenizer,
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=te2, num_attention_heads=4, projection_dim=pooled, hidden_act="gelu", **text)),
        "tokenizer_2": tokenizer,
        "llm": LlamaForCausalLM(LlamaConfig(
            vocab_size=len(llm_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, **special)),
        "llm_tokenizer": llm_tokenizer,
        "clip": CLIPModel(CLIPConfig(
            text_config={"hidden_size": 32, "num_attention_heads": 4, **text},
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
            projection_dim=32)),
        "clip_tokenizer": tokenizer,
        # soft tokens live in the UNet's cross-attention space: both encoders' widths side by side
        "preference_head": PreferenceHead(llm_hidden=64, text_hidden=te1 + te2, num_prefix=2, num_image_tokens=2),
    }


def build_sdxl_small(out_dir: str | Path, seed: int = 0, dtype: str = "fp32") -> Path:
    from pigment.models.tiny import DEFAULT_PREFERENCE_CONFIG

    return write_random_preset(
        out_dir, "sdxl-small", sdxl_small_parts(seed), {**DEFAULT_PREFERENCE_CONFIG, "soft_weight": 0.5}, seed,
        dtype,
        # SDXL's pipeline defaults (50 steps, guidance 5.0) at this UNet's native size (16 latents x 8)
        defaults={"num_inference_steps": 50, "guidance_scale": 5.0, "height": 128, "width": 128,
                  "num_images": 1, "dtype": "fp32"},
        retrain={"gate": "preference"},
    )
