"""The generic promotion gate: works on any preset (no toy world, no attribute probe).

A candidate adapter is promoted only if

- **preference accuracy** on held-out logged pairs (pairs of the round the trainer never saw) does not
  drop: the fraction of pairs whose chosen side gets the higher DPO implicit reward, the candidate's
  log-likelihood ratio to the preset model (Rafailov et al.; Wallace et al. for diffusion: the drop in
  denoising error). The preset itself scores 0.5 (its implicit reward is zero: a coin flip); the serving
  adapter is scored on the same pairs. Reported as ``joint``;
- **content** holds: CLIP text-image agreement (does each rendered image match its own prompt best among
  the set, zero-shot) on a fixed prompt set (manifest ``retrain.guard_prompts``; else the held-out pairs' contents) must not drop by
  more than ``retrain_max_fidelity_drop``. Reported as ``content_fidelity``.

``make_gate(settings, preset_dir, kind, heldout_file)`` returns ``evaluate(adapter_dir | None) -> metrics``.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pigment.models.loader import read_manifest, sampler_defaults


def guard_prompts(preset_dir: Path, contents: list[str], limit: int) -> list[str]:
    prompts = read_manifest(preset_dir).get("retrain", {}).get("guard_prompts") or sorted(set(contents))
    return [p for p in prompts if p][:limit]


def gate_sampler(preset_dir: Path) -> dict:
    """The sampler the guard renders with: the preset's defaults, fewer steps or a smaller square size where
    the manifest's ``retrain`` says so (``gate_steps``, ``gate_size``)."""
    d = sampler_defaults(preset_dir)
    retrain = read_manifest(preset_dir).get("retrain", {})
    size = retrain.get("gate_size")
    return {"num_inference_steps": int(retrain.get("gate_steps") or d["num_inference_steps"]),
            "guidance_scale": float(d["guidance_scale"]),
            "height": int(size or d["height"]), "width": int(size or d["width"])}


def _accuracy(margins: torch.Tensor) -> float:
    """Fraction of pairs with a positive implicit-reward margin, ties counted half."""
    if not len(margins):
        return 0.5
    return float(((margins > 0).float() + 0.5 * (margins == 0).float()).mean())


def clip_agreement(preset_dir: Path, prompts: list[str], segments: list[list[str]], unet_adapter=None,
                   seed: int = 0) -> float:
    """CLIP zero-shot agreement: the fraction of images (one per prompt, rendered from its segments) whose
    own prompt has the highest cosine among the prompt set. A raw cosine is no guard: a CLIP scores
    unrelated pairs alike (on the toy preset a wrecked UNet's noise scored higher than its shapes)."""
    from pigment.models.clip_embedder import ClipEmbedder
    from pigment.models.pipeline import Renderer, RenderInputs

    renderer = Renderer(preset_dir, unet_adapter=unet_adapter)
    clip = ClipEmbedder(preset_dir)
    sampler = gate_sampler(preset_dir)
    images = [renderer.render(RenderInputs(segments=seg, num_images=1, seed=seed + i, **sampler)).images[0]
              for i, seg in enumerate(segments)]
    classes = sorted(set(prompts))
    scores = clip.embed_images(images) @ clip.embed_texts(classes).T
    return float(np.mean([classes[int(np.argmax(row))] == p for row, p in zip(scores, prompts)]))


# -- unet_lora: Diffusion-DPO's implicit reward ------------------------------------------------------------
def unet_accuracy(preset_dir: Path, adapter: Path | None, heldout: Path, seed: int, draws: int = 4,
                  resolution: int = 0) -> float:
    """``resolution``: the size the round trained at (its config's), so the reward is read where it was learnt."""
    if adapter is None:
        return 0.5
    from pigment.training.train_diffusion_dpo import (
        DiffusionDPOConfig,
        DiffusionDPOTrainer,
        read_image_pairs,
    )

    trainer = DiffusionDPOTrainer(DiffusionDPOConfig(preset=str(preset_dir), init_adapter=str(adapter),
                                                     out=str(heldout.parent / "gate"), seed=seed,
                                                     resolution=resolution))
    trainer.prepare(read_image_pairs(heldout))
    rng = np.random.default_rng(seed)
    margins = []
    with torch.no_grad():
        for _ in range(draws):
            for idx in trainer.groups:
                t, noise = trainer.draw(rng, len(idx))
                margins.append(_dpo_margin(trainer, idx, t, noise))
    return _accuracy(torch.cat(margins))


def _dpo_margin(trainer, idx, t, noise) -> torch.Tensor:
    """-(err_model(w) - err_ref(w)) + (err_model(l) - err_ref(l)) per pair (positive: chosen preferred)."""
    b = len(idx)
    latents = torch.cat([trainer.lat_w[idx], trainer.lat_l[idx]])
    noise2, t2 = torch.cat([noise, noise]), torch.cat([t, t])
    cond = torch.stack([trainer.cond[i] for i in idx])
    cond = torch.cat([cond, cond])
    sched = trainer.noise_scheduler
    noisy = sched.add_noise(latents, noise2, t2)
    target = sched.get_velocity(latents, noise2, t2) if sched.config.prediction_type == "v_prediction" else noise2
    unet = trainer.accel.unwrap_model(trainer.unet)
    unet.disable_adapters()
    ref = trainer._err(unet(noisy, t2, encoder_hidden_states=cond).sample, target)
    unet.enable_adapters()
    err = trainer._err(unet(noisy, t2, encoder_hidden_states=cond).sample, target)
    return -((err[:b] - err[b:]) - (ref[:b] - ref[b:]))


# -- pigeon_lora: DPO's implicit reward on keyword lists ----------------------------------------------------
def keyword_accuracy(preset_dir: Path, adapter: Path | None, heldout: Path, seed: int) -> float:
    if adapter is None:
        return 0.5
    from pigment.training.train_pigeon import PigeonTrainConfig, PigeonTrainer, read_pairs

    meta = json.loads((Path(adapter) / "pigeon.json").read_text())
    trainer = PigeonTrainer(PigeonTrainConfig.load(
        None, preset=str(preset_dir), stage="dpo", init_adapter=str(adapter), pairs_file=str(heldout),
        auto_pairs=0, reference="base", keep_ratio=float(meta["keep_ratio"]), seed=seed,
        out=str(heldout.parent / "gate")))
    pairs = read_pairs(heldout)
    prompts = [trainer.prompt(p.history) for p in pairs]
    model = trainer.accel.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        pol_w = trainer.logps(prompts, [p.chosen for p in pairs])[0]
        pol_l = trainer.logps(prompts, [p.rejected for p in pairs])[0]
        with model.disable_adapter():
            ref_w = trainer.logps(prompts, [p.chosen for p in pairs])[0]
            ref_l = trainer.logps(prompts, [p.rejected for p in pairs])[0]
    return _accuracy((pol_w - ref_w) - (pol_l - ref_l))


def keyword_segments(preset_dir: Path, adapter: Path | None, rows: list[dict]) -> list[list[str]]:
    """What serving would render for each held-out history: content, then the keywords the LLM writes."""
    from pigment.models.preference import PreferenceEncoder

    encoder = PreferenceEncoder(preset_dir, adapter_dir=adapter)
    out = []
    for r in rows:
        kw = encoder.encode(r["history_captions"], target=r.get("content", ""), method="pmg_keywords").keywords
        out.append([r.get("content", ""), ", ".join(kw)] if kw else [r.get("content", "")])
    return out


def trained_resolution(settings) -> int:
    """The round's Diffusion-DPO resolution (``retrain_config``'s ``resolution``; 0: the images' own)."""
    from pigment.training.retrain import DIFFUSION_DPO_DEFAULTS, _trainer_overrides

    return int(_trainer_overrides(settings, DIFFUSION_DPO_DEFAULTS).get("resolution", 0))


def make_gate(settings, preset_dir: Path, kind: str, heldout: Path) -> Callable:
    rows = [json.loads(line) for line in Path(heldout).read_text().splitlines() if line.strip()]
    limit = settings.retrain_eval_samples
    seed = settings.retrain_eval_seed

    def evaluate(adapter_dir: Path | None) -> dict:
        gc.collect()  # the round's trainer (accelerate keeps reference cycles) before loading more models
        if kind == "pigeon_lora":
            joint = keyword_accuracy(preset_dir, adapter_dir, heldout, seed)
            sample = rows[:limit]
            fidelity = clip_agreement(preset_dir, [r.get("content", "") for r in sample],
                                      keyword_segments(preset_dir, adapter_dir, sample), seed=seed)
        else:
            joint = unet_accuracy(preset_dir, adapter_dir, heldout, seed, resolution=trained_resolution(settings))
            prompts = guard_prompts(preset_dir, [r.get("content", "") for r in rows], limit)
            fidelity = clip_agreement(preset_dir, prompts, [[p] for p in prompts], unet_adapter=adapter_dir,
                                      seed=seed)
        return {"joint": joint, "content_fidelity": fidelity, "gate": "preference", "n_heldout_pairs": len(rows),
                "seed": seed}

    evaluate.fresh_baseline = True  # scored on this round's held-out pairs: no recorded score applies
    return evaluate
