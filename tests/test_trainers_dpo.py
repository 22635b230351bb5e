"""Pigeon (SFT + DPO on the keyword LLM) and Diffusion-DPO (UNet LoRA) trainers on the tiny preset.

A few steps each: losses move the right way, DPO starts at log 2 (policy ==
reference), checkpoints resume exactly, and the adapters load into the serving
classes and change what they produce.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from pigment.training import toy_world as tw

COMBOS = [("large", "red", "star", "dark"), ("small", "blue", "circle", "light"), ("large", "red", "heart", "dark"),
          ("small", "green", "square", "grey"), ("large", "purple", "cross", "dark"), ("small", "red", "star", "light")]


def _caption(size, colour, shape, background):
    return tw.caption({"size": size, "colour": colour, "shape": shape, "background": background})


def _pmg_records(n: int) -> list[dict]:
    """n PMG unified JSON records (captions only) over a few fixed items."""
    items = [{"item_id": f"i{k}", "caption": _caption(*c), "image_path": ""} for k, c in enumerate(COMBOS)]
    return [{"user_id": f"u{r}", "history_items_info": [items[(r + j) % 6] for j in range(5)],
             "target_item_info": items[(r + 5) % 6]} for r in range(n)]


def _pairs_jsonl(path) -> str:
    caps = [_caption(*c) for c in COMBOS]
    rows = [{"history_captions": caps[i:i + 5], "content": "a star", "chosen_keywords": ["red", "dark background", "large"],
             "rejected_keywords": ["blue", "light background"]} for i in range(2)]
    rows += [{"history_captions": caps[:5], "content": "a circle", "chosen_keywords": "1. red 2. large",
              "rejected_keywords": ["green", "small"]},
             {"history_captions": caps[1:], "content": "a heart", "chosen_keywords": ["blue", "small"],
              "rejected_keywords": ["purple", "dark background"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def pigeon_data(tiny_preset, tmp_path_factory):
    root = tmp_path_factory.mktemp("pigeon")
    (root / "records.json").write_text(json.dumps(_pmg_records(4)))
    return {"preset": str(tiny_preset), "root": root, "records": str(root / "records.json"),
            "pairs": _pairs_jsonl(root / "pairs.jsonl")}


def _sft_cfg(d, out, **kw):
    from pigment.training.train_pigeon import PigeonTrainConfig

    base = {"preset": d["preset"], "out": str(out), "data_format": "pmg_json", "data_path": d["records"],
            "batch_size": 4, "steps": 20, "lr": 3e-2, "warmup_steps": 1, "n_val": 0, "checkpoint_every": 10}
    return PigeonTrainConfig(**{**base, **kw})


def _dpo_cfg(d, out, adapter, **kw):
    base = {"stage": "dpo", "init_adapter": str(adapter), "pairs_file": d["pairs"], "auto_pairs": 0, "steps": 10,
            "lr": 1e-2}
    return _sft_cfg(d, out, **{**base, **kw})


@pytest.fixture(scope="module")
def sft_run(pigeon_data):
    from pigment.training.train_pigeon import build_trainer

    out = pigeon_data["root"] / "sft"
    return out, build_trainer(_sft_cfg(pigeon_data, out)).train()


@pytest.fixture(scope="module")
def dpo_run(pigeon_data, sft_run):
    from pigment.training.train_pigeon import build_trainer

    out = pigeon_data["root"] / "dpo"
    return out, build_trainer(_dpo_cfg(pigeon_data, out, sft_run[0] / "adapter")).train()


# ----------------------------------------------------------------------------- Pigeon
def test_mask_generator_keeps_the_top_fraction_and_gets_a_gradient():
    from pigment.models.preference import MaskGenerator

    torch.manual_seed(0)
    mask = MaskGenerator(16, max_positions=32)
    embeds = torch.randn(2, 12, 16)
    types = torch.zeros(2, 12, dtype=torch.long)
    types[:, 2:10] = 1  # 8 history tokens per row
    attn = torch.ones(2, 12, dtype=torch.long)
    out, hard = mask(embeds, types, attn, keep_ratio=0.8)
    assert hard.sum(-1).tolist() == [7, 7]  # ceil(0.8 * 8)
    dropped = (types == 1) & ~hard
    assert torch.all(out[dropped] == 0) and torch.allclose(out[~dropped], embeds[~dropped])
    out.pow(2).sum().backward()  # straight-through: the relaxed mask carries a gradient to the scorer
    assert mask.layer.self_attn.in_proj_weight.grad.abs().sum() > 0


def test_pigeon_sft_overfits_a_fixed_batch(sft_run):
    out, metrics = sft_run
    losses = [h["loss"] for h in metrics["history"]]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.3, losses
    files = {p.name for p in (out / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "mask_generator.safetensors", "pigeon.json"} <= files
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]  # never pickle
    assert json.loads((out / "metrics.json").read_text())["method"] == "pigeon_sft"


def test_pigeon_adapter_loads_into_serving_and_changes_keywords(sft_run, pigeon_data):
    from pigment.models.preference import PreferenceEncoder

    base = PreferenceEncoder(pigeon_data["preset"])
    tuned = PreferenceEncoder(pigeon_data["preset"], adapter_dir=sft_run[0] / "adapter")
    records = _pmg_records(4)
    prompts = [base.build_prompt([h["caption"] for h in r["history_items_info"]])[0] for r in records]
    assert base.generate_keywords_batch(prompts) != tuned.generate_keywords_batch(prompts)
    assert tuned.model_version != base.model_version  # distinct cache keys
    # soft tokens come from the plain LLM: the Pigeon LoRA must not leak into them
    with torch.no_grad():
        np.testing.assert_allclose(base.soft_tokens(prompts[0]), tuned.soft_tokens(prompts[0]), atol=1e-6)


def test_pigeon_dpo_starts_at_log2_and_rewards_rise(dpo_run):
    out, metrics = dpo_run
    hist = metrics["history"]
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    # policy == reference: every margin is zero up to float rounding (so accuracy there is a coin toss)
    assert hist[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert hist[-1]["reward_accuracy"] == 1.0 and hist[-1]["reward_margin"] > 0.05
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert metrics["pairs"] == 4 and metrics["pair_sources"] == {"logged": 4}
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "pairs.jsonl").is_file()


def test_pigeon_dpo_resumes_exactly(pigeon_data, sft_run, dpo_run, capsys):
    from pigment.training.train_pigeon import build_trainer

    out = pigeon_data["root"] / "dpo-resume"
    build_trainer(_dpo_cfg(pigeon_data, out, sft_run[0] / "adapter", steps=2, checkpoint_every=1)).train()
    metrics = build_trainer(_dpo_cfg(pigeon_data, out, sft_run[0] / "adapter", steps=4)).train()
    assert "resumed" in capsys.readouterr().out
    assert [h["step"] for h in metrics["history"]] == [1, 2, 3, 4]
    uninterrupted = [h["loss"] for h in dpo_run[1]["history"][:4]]
    assert [h["loss"] for h in metrics["history"]] == pytest.approx(uninterrupted, abs=1e-5)


def test_pigeon_auto_pairs_choose_best_and_worst_by_clip(pigeon_data, sft_run, monkeypatch):
    from pigment.models.clip_embedder import ClipEmbedder
    from pigment.training import train_pigeon as tp

    canned = iter(["1. red 2. dark background", "1. blue 2. light background", "1. green", "1. red 2. dark background"])
    monkeypatch.setattr(tp, "pigeon_generate", lambda *a, **k: [next(canned)])
    cfg = _dpo_cfg(pigeon_data, pigeon_data["root"] / "auto", sft_run[0] / "adapter", auto_pairs=1,
                   candidate_keep_ratios=[0.6, 0.8, 1.0], candidate_samples=1)
    trainer = tp.PigeonTrainer(cfg)
    sample = tp.load_samples(cfg, limit=1)[0]
    (pair,) = trainer.auto_pairs([sample])
    clip = ClipEmbedder(pigeon_data["preset"])
    hist = clip.embed_texts(sample.history).mean(0)
    cands = [["red", "dark background"], ["blue", "light background"], ["green"]]  # the duplicate is dropped
    score = clip.embed_texts([", ".join(c) for c in cands]) @ hist
    assert pair.chosen == cands[int(np.argmax(score))] and pair.rejected == cands[int(np.argmin(score))]
    assert pair.source == "auto"


# ----------------------------------------------------------------------------- Diffusion-DPO
@pytest.fixture(scope="module")
def ddpo(tiny_preset, tmp_path_factory):
    from pigment.training.train_diffusion_dpo import (
        DiffusionDPOConfig,
        DiffusionDPOTrainer,
        make_toy_pairs,
        read_image_pairs,
    )

    root = tmp_path_factory.mktemp("ddpo")
    records = make_toy_pairs(tiny_preset, root / "pairs.jsonl", cases=1, candidates=2, steps=2)
    assert len(records) == 1 and records[0]["scores"]["chosen"] > records[0]["scores"]["rejected"]
    cfg = DiffusionDPOConfig(preset=str(tiny_preset), out=str(root / "run"), pairs=str(root / "pairs.jsonl"),
                             steps=8, batch_size=1, lr=1e-3, warmup_steps=1)
    trainer = DiffusionDPOTrainer(cfg)
    trainer.prepare(read_image_pairs(cfg.pairs))
    draws = [trainer.draw(np.random.default_rng([7, k]), 1) for k in range(4)]
    idx = np.array([0])
    with torch.no_grad():
        before = [trainer.loss(idx, t, e)[0].item() for t, e in draws]
    # a fixed pair at fixed timesteps and noise (cycled), so "decreases" is a property of the optimiser, not luck
    trainer.draw = lambda rng, n: draws[trainer.step % len(draws)]
    metrics = trainer.train()
    with torch.no_grad():
        after = [trainer.loss(idx, t, e)[0].item() for t, e in draws]
    return root, metrics, before, after


def test_diffusion_dpo_starts_at_log2_and_decreases(ddpo):
    root, metrics, before, after = ddpo
    assert before == pytest.approx([math.log(2)] * 4, abs=1e-6)  # LoRA B = 0: policy == reference
    assert metrics["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert np.mean(after) < np.mean(before) - 1e-3, (before, after)
    assert metrics["steps"] == 8 and "implicit_accuracy_last" in metrics
    assert (root / "run" / "unet_lora" / "pytorch_lora_weights.safetensors").is_file()


def test_diffusion_dpo_lora_loads_into_renderer_and_changes_the_image(ddpo, tiny_preset):
    from pigment.models.pipeline import Renderer, RenderInputs

    inputs = RenderInputs(segments=["a star"], num_inference_steps=3, seed=1)
    plain = Renderer(tiny_preset)
    tuned = Renderer(tiny_preset, unet_adapter=ddpo[0] / "run" / "unet_lora")
    a = np.asarray(plain.render(inputs).images[0], dtype=np.int16)
    b = np.asarray(tuned.render(inputs).images[0], dtype=np.int16)
    assert np.abs(a - b).max() > 0
    assert tuned.model_version != plain.model_version


def test_diffusion_dpo_continues_from_an_init_adapter(ddpo, tiny_preset, tmp_path):
    """init_adapter: the policy starts as that LoRA (its own rank), the reference stays the plain UNet."""
    from peft import get_peft_model_state_dict
    from pigment.training.train_diffusion_dpo import (
        LORA_FILE,
        DiffusionDPOConfig,
        DiffusionDPOTrainer,
        read_image_pairs,
    )
    from safetensors.torch import load_file

    root = ddpo[0]
    init = root / "run" / "unet_lora"
    cfg = DiffusionDPOConfig(preset=str(tiny_preset), out=str(tmp_path / "more"), pairs=str(root / "pairs.jsonl"),
                             steps=1, batch_size=1, warmup_steps=1, lora_r=2, init_adapter=str(init))
    trainer = DiffusionDPOTrainer(cfg)
    saved = load_file(init / LORA_FILE)
    state = get_peft_model_state_dict(trainer.accel.unwrap_model(trainer.unet))
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)  # rank 8, not 2
    trainer.prepare(read_image_pairs(cfg.pairs))
    with torch.no_grad():
        loss = trainer.loss(np.array([0]), *trainer.draw(np.random.default_rng(0), 1))[0].item()
    assert loss != pytest.approx(math.log(2), abs=1e-6)  # policy != reference from the first step
    trainer.train()
    assert json.loads((tmp_path / "more" / "unet_lora" / "adapter.json").read_text())["init_adapter"] == str(init)


def test_pmg_lora_and_pigeon_adapter_share_one_llm(pigeon_data, sft_run, tmp_path):
    """Both LoRAs load as named adapters on one LLM; each applies only to its own output."""
    import shutil

    from pigment.models.preference import PreferenceEncoder
    from pigment.training.train_pmg import PMGTrainConfig, PMGTrainer, install, load_records

    preset = tmp_path / "tiny"
    shutil.copytree(pigeon_data["preset"], preset)
    cfg = PMGTrainConfig(preset=str(preset), out=str(tmp_path / "pmg"), steps=2, batch_size=4, max_samples=8,
                         lora_r=2, lr=0.05)
    trainer = PMGTrainer(cfg)
    trainer.prepare(load_records(cfg))
    trainer.train()
    install(tmp_path / "pmg" / "preference_head", preset, "test")

    adapter = sft_run[0] / "adapter"
    both = PreferenceEncoder(preset, adapter_dir=adapter)
    assert set(both.llm.peft_config) == {"pmg", "pigeon"}
    prompts = [("history:\n1. a large red star on a dark background\n2. a small blue circle on a light background\n"
                "keywords:\n")]
    pigeon_only = PreferenceEncoder(pigeon_data["preset"], adapter_dir=adapter)  # no PMG LoRA in this preset
    pmg_only = PreferenceEncoder(preset)
    for _ in range(2):  # order must not matter: each call selects its own adapter
        assert both.generate_keywords_batch(prompts) == pigeon_only.generate_keywords_batch(prompts)
        np.testing.assert_allclose(both.soft_tokens(prompts[0]), pmg_only.soft_tokens(prompts[0]), atol=1e-5)
