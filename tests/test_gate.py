"""The generic promotion gate (held-out DPO implicit reward + CLIP content guard) decides like the toy
world's evaluator on the toy preset: a harmless candidate passes both, a harmful one fails both, and a
candidate that Diffusion-DPO really improved is promoted by both, each scoring it up."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_settings
from pigment.training.gate import _accuracy, make_gate
from pigment.training.retrain import RetrainCore, split_heldout, toy_gate
from pigment.training.train_diffusion_dpo import (
    DiffusionDPOConfig,
    DiffusionDPOTrainer,
    read_image_pairs,
)

TOY = Path(__file__).resolve().parents[1] / "models" / "presets" / "toy"
LORA_FILE = "pytorch_lora_weights.safetensors"


def write_lora(out: Path, scale: float) -> Path:
    """A UNet LoRA in the trainer's format: B = 0 is the identity; large random B wrecks the UNet."""
    from peft import LoraConfig
    from pigment.models.loader import load_component
    from pigment.training.train_diffusion_dpo import TARGET_MODULES

    unet = load_component(TOY, "unet")
    torch.manual_seed(0)  # LoRA A's gaussian init
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGET_MODULES))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    unet.save_lora_adapter(str(out), weight_name=LORA_FILE)
    return out


def heldout_pairs(path: Path) -> Path:
    """Image pairs as a round writes them (two renders of one content, one picked)."""
    from pigment.models.pipeline import Renderer, RenderInputs

    renderer = Renderer(TOY)
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, content in enumerate(["a star", "a circle", "a heart", "a ring"]):
        images = renderer.render(RenderInputs(segments=[content], num_images=2, seed=i)).images
        names = []
        for k, img in enumerate(images):
            names.append(f"images/{i}_{k}.png")
            img.save(path.parent / names[-1])
        rows.append({"content": content, "keywords": [], "segments": [content], "chosen_image": names[0],
                     "rejected_image": names[1]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ties_count_half_and_the_heldout_split_is_disjoint():
    assert _accuracy(torch.tensor([1.0, -1.0, 0.0, 2.0])) == pytest.approx(0.625)
    train, held = split_heldout(list(range(10)))
    assert held == [3, 7] and not set(train) & set(held) and len(train) + len(held) == 10


def test_generic_gate_agrees_in_sign_with_the_toy_evaluator(tmp_path):
    settings = make_settings(tmp_path, TOY, retrain_eval_samples=8, retrain_eval_seed=1)
    core = RetrainCore(settings, None, preset_dir=TOY)
    heldout = heldout_pairs(tmp_path / "run" / "heldout.jsonl")
    gates = {"toy": toy_gate(settings, TOY, "unet_lora"), "preference": make_gate(settings, TOY, "unet_lora", heldout)}
    candidates = {"harmless": write_lora(tmp_path / "zero", 0.0), "harmful": write_lora(tmp_path / "wreck", 3.0)}
    verdicts, fidelity = {}, {}
    for gate, evaluate in gates.items():
        baseline = evaluate(None)
        fidelity[(gate, None)] = baseline["content_fidelity"]
        for name, adapter in candidates.items():
            score = evaluate(adapter)
            verdicts[(gate, name)] = core.regression(score, baseline)
            fidelity[(gate, name)] = score["content_fidelity"]
            print(gate, name, {k: score[k] for k in ("joint", "content_fidelity")}, "baseline",
                  {k: baseline[k] for k in ("joint", "content_fidelity")}, verdicts[(gate, name)] or "promote")
    assert verdicts[("toy", "harmless")] == "" and verdicts[("preference", "harmless")] == ""
    assert verdicts[("toy", "harmful")] != ""
    assert verdicts[("preference", "harmful")] != ""
    # the CLIP guard alone would have caught it (the gate reports the first reason it finds)
    assert fidelity[("preference", None)] - fidelity[("preference", "harmful")] > settings.retrain_max_fidelity_drop
    assert np.isfinite(gates["preference"](candidates["harmful"])["joint"])


def test_a_round_with_the_preference_gate_holds_out_pairs_it_never_trains_on(tmp_path):
    """Logged picks -> 3 train + 1 held-out pair -> the real Diffusion-DPO trainer -> the generic gate."""
    from pigment.services.store.db import make_sessionmaker
    from pigment.services.store.migrate import upgrade
    from test_retrain import image_picks

    (tmp_path / "quick.yaml").write_text("steps: 2\nbatch_size: 2\nwarmup_steps: 1\n")
    settings = make_settings(tmp_path, TOY, retrain_min_pairs=2, retrain_eval_samples=4, retrain_gate="preference",
                             retrain_config=tmp_path / "quick.yaml")
    upgrade(settings.database_url)
    sessions = make_sessionmaker(settings.database_url)
    image_picks(settings, sessions, "u1", 2)
    image_picks(settings, sessions, "u2", 2)
    result = RetrainCore(settings, sessions).run("unet_lora")
    assert result.status in ("promoted", "rejected"), result.reason
    run_dir = Path(result.run_dir)
    train = [json.loads(x) for x in (run_dir / "pairs.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (run_dir / "heldout" / "pairs.jsonl").read_text().splitlines()]
    assert (len(train), len(held), result.n_pairs) == (3, 1, 4)
    # the held-out copies live in their own directory (the training copies reuse the same file names)
    assert all((run_dir / "heldout" / held[0][k]).is_file() for k in ("chosen_image", "rejected_image"))
    m = result.metrics
    assert m["gate"] == "preference" and m["baseline"]["joint"] == 0.5 and m["candidate"]["n_heldout_pairs"] == 1
    assert m["train"]["pairs"] == 3


def damaged_preset(tmp_path: Path, scale: float) -> Path:
    """The toy preset with a random low-rank change fused into its UNet: it draws shapes and colours worse."""
    import shutil

    from pigment.models import loader
    from pigment.models.pipeline import load_unet_lora

    preset = tmp_path / "damaged"
    shutil.copytree(TOY, preset)
    unet = loader.load_component(TOY, "unet")
    load_unet_lora(unet, write_lora(tmp_path / "damage", scale))
    unet.unload_lora()  # the fused weights stay; the LoRA layers go
    unet.save_pretrained(preset / "unet")
    loader.refresh_component(preset, "unet")
    return preset


def better_worse_pairs(path: Path, better: Path, worse: Path, seeds: list[int]) -> Path:
    """Pairs laid out as serving renders them (content, then keywords): the intact toy UNet's image is
    chosen, the damaged one's rejected (same conditioning, same seed, 6 steps)."""
    from pigment.models.pipeline import Renderer, RenderInputs
    from pigment.training import toy_world as tw

    renderers = {"chosen": Renderer(better), "rejected": Renderer(worse)}
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        for i in range(8):
            attrs = {k: str(rng.choice(v)) for k, v in tw.ATTRIBUTES.items()}
            segments = [f"a {attrs['shape']}", ", ".join(tw.keyword(k, attrs[k]) for k in ("colour", "background",
                                                                                            "size"))]
            row = {"content": segments[0], "keywords": [], "segments": segments}
            for side, renderer in renderers.items():
                inputs = RenderInputs(segments=segments, num_images=1, seed=1000 * seed + i, num_inference_steps=6)
                row[f"{side}_image"] = f"images/{seed}_{i}_{side}.png"
                renderer.render(inputs).images[0].save(path.parent / row[f"{side}_image"])
            rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_candidate_dpo_really_improved_is_promoted_by_both_gates(tmp_path):
    """Diffusion-DPO on pairs where the chosen image is clearly better (the intact UNet's against a damaged
    UNet's) repairs part of the damage: the toy evaluator (attribute probe) and the generic gate (held-out
    implicit reward + CLIP guard) both score the candidate up and promote it."""
    preset = damaged_preset(tmp_path, 0.5)
    train = better_worse_pairs(tmp_path / "train" / "pairs.jsonl", TOY, preset, [0, 1, 2])
    heldout = better_worse_pairs(tmp_path / "heldout" / "pairs.jsonl", TOY, preset, [9])
    trainer = DiffusionDPOTrainer(DiffusionDPOConfig(preset=str(preset), out=str(tmp_path / "dpo"), steps=40,
                                                     batch_size=8, lr=1e-3, warmup_steps=1, checkpoint_every=1000))
    trainer.prepare(read_image_pairs(train))
    candidate = Path(trainer.train()["adapter"])
    settings = make_settings(tmp_path, preset, retrain_eval_samples=8, retrain_eval_seed=1)
    core = RetrainCore(settings, None, preset_dir=preset)
    gates = {"toy": toy_gate(settings, preset, "unet_lora"), "preference": make_gate(settings, preset, "unet_lora",
                                                                                       heldout)}
    gains = {}
    for gate, evaluate in gates.items():
        baseline, score = evaluate(None), evaluate(candidate)
        verdict = core.regression(score, baseline)
        gains[gate] = {k: score[k] - baseline[k] for k in ("joint", "content_fidelity")}
        print(gate, "baseline", {k: baseline[k] for k in gains[gate]}, "candidate", {k: score[k] for k in gains[gate]},
              verdict or "promote")
        assert verdict == "", (gate, verdict)
    # same sign: each gate scores the repair up on some metric and down on none
    for gate, gain in gains.items():
        assert min(gain.values()) >= 0 and max(gain.values()) > 0, (gate, gain)
    assert gains["preference"]["joint"] > 0.1  # held-out pairs: the candidate prefers the better image
