"""The ``tiny`` preset: every component built from a config with a fixed seed.

Random weights prove the plumbing (shapes, save/load, manifest, serving) in
seconds; the trained ``toy`` preset is what shows personalization. Each part is
saved with ``save_pretrained`` and read back through ``loader.load_component``,
the same code path that loads SD 1.5, Llama or CLIP from a directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pigment.models.loader import write_manifest

# A closed vocabulary is enough for random-weight models; tokenizers are trained
# locally from it, never downloaded.
VOCAB_WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "or", "small", "medium", "large", "tiny", "big", "red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black", "grey", "star", "circle", "square", "triangle", "heart", "cross", "diamond", "ring", "dark", "light", "striped", "dotted", "background", "history", "keywords", "user", "likes", "items", "image", "photo", "poster"]
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def build_word_tokenizer(words: list[str], model_max_length: int):
    """A word-level fast tokenizer trained on ``words`` (+ digits and punctuation)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [" ".join(words), " ".join(str(i) for i in range(10)) + " . , : ; - ( )"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIAL))
    bos, eos = tok.token_to_id("[BOS]"), tok.token_to_id("[EOS]")
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", bos), ("[EOS]", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=model_max_length,
    )


def build_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    """Build, save and manifest the tiny preset under ``out_dir``; returns it."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from pigment.models.preference_head import PreferenceHead
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    text_dim, llm_dim = 32, 64

    tokenizer = build_word_tokenizer(VOCAB_WORDS, model_max_length=16)
    llm_tokenizer = build_word_tokenizer(VOCAB_WORDS, model_max_length=256)
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, projection_dim=text_dim, **special))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=8)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(llm_tokenizer), hidden_size=llm_dim, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, **special))
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, **special),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32))
    head = PreferenceHead(llm_hidden=llm_dim, text_hidden=text_dim, num_prefix=2, num_image_tokens=2)

    parts = {
        "unet": unet, "vae": vae, "scheduler": scheduler, "text_encoder": text_encoder, "tokenizer": tokenizer,
        "llm": llm, "llm_tokenizer": llm_tokenizer, "clip": clip, "clip_tokenizer": tokenizer,
        "preference_head": head,
    }
    for name, part in parts.items():
        part.save_pretrained(out / name)
    # As a tuned preset ships them: a smaller soft weight beside the keywords than alone.
    pref = {**DEFAULT_PREFERENCE_CONFIG, "soft_weight": 0.5}
    (out / "preference.json").write_text(json.dumps(pref, indent=2))
    command = f"python -c 'from pigment.models.tiny import build_tiny; build_tiny(DIR, seed={seed})'"
    write_manifest(
        out,
        {name: {"path": name, "kind": name, "training_command": command, "data_seed": seed} for name in parts},
        preset="tiny",
        version="tiny-1",
        defaults={"num_inference_steps": 10, "guidance_scale": 3.0, "height": 32, "width": 32, "num_images": 2},
    )
    return out


DEFAULT_PREFERENCE_CONFIG = {
    # The keyword request and its answer's format are preset data: a plain keyword LLM (the toy's) reads
    # ``keyword_template`` and answers a numbered list; an instruction-tuned one (``chat_template``: true)
    # reads ``keyword_instruction`` through its tokenizer's chat template and answers free text.
    "keyword_template": "history:\n{history}\nkeywords:\n",
    "keyword_format": "numbered",
    "chat_template": False,
    "keyword_instruction": "List short visual keywords this user likes, separated by commas. History:\n{history}",
    "history_line": "{i}. {caption}",
    "max_keywords": 8,
    "max_new_tokens": 24,
    "max_caption_chars": 200,
    "keyword_weight": 1.0,
    "soft_weight": 1.0,        # soft tokens beside the keywords (pmg)
    "soft_weight_alone": 1.0,  # soft tokens as the only user signal (pmg_soft)
    # What each signal means (models/personalize.py DEFAULT_SIGNAL_WEIGHTS when absent): kind -> weight.
    "signal_weights": None,
    "min_readable_fraction": 0.5,  # below this share of known tokens the history is not read (flagged)
    "feedback_evidence_cap": 4.0,  # |feedback evidence| per keyword saturates here
    # Forgetting (models/personalize.py feedback_evidence): at change points, not by age. A round whose best
    # rating falls this many stars below earlier rounds' best (with a contradicting pick: any fall) or a
    # contradicting pick the ratings back starts over; 0 turns change points off.
    "feedback_change_drop": 1.0,
    "feedback_round_decay": 1.0,  # < 1: feedback also weighs this much less for every later pick
    "feedback_explore_decay": 0.3,  # the candidates to explore are planned on evidence aged this fast
}
