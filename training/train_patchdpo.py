"""`pigment train patchdpo`: patch-weighted Diffusion-DPO on a UNet LoRA for reference-image generation.

PatchDPO (Huang et al., 2024) observes that a subject generator is usually wrong
in a few local patches, so a whole-image preference is too coarse. Here:

1. Data (``make_patch_pairs``): for a training subject (never a held-out one),
   render N candidates with the current reference conditioning (prompt +
   projector tokens); estimate each candidate's per-patch quality against the
   reference; the best-scoring candidate is chosen, the worst rejected.
2. Patch quality (``patch_quality``): a *frozen* vision backbone's patch
   features, the same encoder (and block) the reference projector reads (``ImagePatches``; on the toy
   preset its ``reference_encoder``, which sees shape; the toy CLIP tower did not, so its quality carried
   no shape signal, bench/RESULTS.md): each generated
   foreground patch scores its best cosine to any foreground patch of the
   reference; background patches (close to the image's own corner patches)
   score 1, since the prompt, not the reference, decides the background. Not
   the toy attribute probe: it is the evaluator, and training on the evaluator
   would flatter the numbers (METHODS.md). On the toy preset the tower's patch
   grid (32 px / 4 px = 8x8) is the latent grid; other presets resize to it.
3. Loss: Diffusion-DPO (train_diffusion_dpo.py: same timestep and noise for
   chosen and rejected, the UNet without LoRA as the frozen reference) with the
   per-image error a *patch-weighted* mean: the chosen image weighted by its
   quality (learn its good patches), the rejected one by 1 - quality (unlearn
   its bad patches); each map has mean 1, with a floor so no patch is ignored.

Pairs JSONL: ``{"segments": [...], "reference_images": [paths], "chosen_image", "rejected_image",
"chosen_quality": [[...]], "rejected_quality": [[...]]}`` (paths relative to the file).
Outputs as Diffusion-DPO's: ``out/unet_lora/`` (servable with ``Renderer(unet_adapter=...)`` or the
registry's unet_lora kind) and ``out/metrics.json``; resumable from safetensors checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pigment.training.train_diffusion_dpo import (
    DiffusionDPOConfig,
    DiffusionDPOTrainer,
    ImagePair,
    register_dpo,
    run_dpo,
)
from PIL import Image
from tqdm import tqdm

BACKGROUND_COS = 0.9  # a patch this close to the image's corner patches is background
WEIGHT_FLOOR = 0.1


@dataclass
class PatchPair(ImagePair):
    references: list[np.ndarray]
    chosen_quality: np.ndarray    # [g, g] in [0, 1]
    rejected_quality: np.ndarray


# ----------------------------------------------------------------------------- patch quality
def _grid(feats: torch.Tensor) -> torch.Tensor:
    """[1 + g*g, D] (CLS first) -> unit-norm patch features [g*g, D]."""
    return torch.nn.functional.normalize(feats[1:].float(), dim=-1)


def foreground(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """[g*g] bool: patches unlike the mean of the four corner patches."""
    corners = patches.reshape(grid, grid, -1)[[0, 0, -1, -1], [0, -1, 0, -1]].mean(0)
    return patches @ torch.nn.functional.normalize(corners, dim=-1) < BACKGROUND_COS


def patch_quality(generated: torch.Tensor, references: list[torch.Tensor], grid: int) -> np.ndarray:
    """Raw per-patch quality [g, g] in [-1, 1] of one generated image against its reference(s)."""
    gen = _grid(generated)
    ref = torch.cat([_grid(r)[foreground(_grid(r), grid)] for r in references])
    if not len(ref):  # a reference with nothing but background: nothing to compare
        return np.ones((grid, grid), np.float32)
    best = (gen @ ref.T).max(dim=1).values
    return torch.where(foreground(gen, grid), best, torch.ones_like(best)).reshape(grid, grid).numpy()


def calibrate(raw: list[np.ndarray]) -> tuple[float, float]:
    """The 5th and 95th percentile of foreground patch scores: the [0, 1] range of ``normalise``."""
    values = np.concatenate([q[q < 1.0] for q in raw] or [np.zeros(1)])
    return float(np.percentile(values, 5)), float(np.percentile(values, 95))


def normalise(raw: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((raw - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def image_score(quality: np.ndarray) -> float:
    """Mean quality of the non-background patches (0 for an image with no subject at all)."""
    fg = quality[quality < 1.0]
    return float(fg.mean()) if len(fg) else 0.0


def image_similarity(generated: torch.Tensor, references: list[torch.Tensor]) -> float:
    """Whole-image similarity: cosine of the encoder's pooled/CLS token to the references' (DreamBench's DINO score)."""
    return float(np.mean([torch.nn.functional.cosine_similarity(generated[0].float(), r[0].float(), dim=0).item()
                          for r in references]))


def patch_weights(quality: np.ndarray, chosen: bool) -> np.ndarray:
    """The loss weight map: quality for the chosen image, 1 - quality for the rejected; mean 1."""
    w = (quality if chosen else 1.0 - quality) + WEIGHT_FLOOR
    return (w / w.mean()).astype(np.float32)


# ----------------------------------------------------------------------------- trainer
@dataclass
class PatchDPOConfig(DiffusionDPOConfig):
    out: str = "runs/patchdpo"
    beta: float = 2500.0
    # Which candidate is chosen / rejected (the patch maps weight the loss either way): "patch", the mean patch
    # quality; "global", the pooled-token cosine. On the toy reference_encoder, among 200 training cases x 6
    # candidates, "global" put a probe-correct subject over a wrong one in 13 pairs and never the reverse, "patch"
    # 7 against 1: a wrong shape still matches the reference patch by patch (bench/RESULTS.md).
    ranking: str = "patch"
    # Keep this share of cases, those with the largest chosen-rejected gap: most candidates of a case are all
    # right, and such pairs teach nothing about identity (top 30% by global gap: 10 of the 13 informative pairs).
    # Measured on the toy preset, "global" + 0.3 gave cleaner pairs but no better LoRA than "patch" + 1.0, the
    # shipped config (bench/out/patchdpo_sweep.json).
    pair_keep: float = 1.0


class PatchDPOTrainer(DiffusionDPOTrainer):
    method = "patchdpo"

    def __init__(self, cfg: PatchDPOConfig):
        from pigment.models.reference import ReferenceEncoder

        super().__init__(cfg)
        self.reference = ReferenceEncoder(cfg.preset, device=str(self.device))

    @torch.no_grad()
    def prepare(self, pairs: list[PatchPair]) -> None:
        """The text conditioning of the base class, then the pair's reference tokens, as the renderer appends them;
        the weight maps are resized to the latent grid."""
        super().prepare(pairs)
        tokens = [torch.as_tensor(self.reference.tokens(p.references), device=self.device) for p in pairs]
        self.cond = [torch.cat([c, t.to(c.dtype)]) for c, t in zip(self.cond, tokens)]
        size = self.lat_w.shape[-2:]
        maps = [[patch_weights(p.chosen_quality, True), patch_weights(p.rejected_quality, False)] for p in pairs]
        w = torch.from_numpy(np.array(maps))  # [N, 2, g, g]
        w = torch.nn.functional.interpolate(w, size=tuple(size), mode="bilinear", align_corners=False)
        self.weights = (w / w.mean(dim=(2, 3), keepdim=True)).to(self.device)

    def errors(self, pred: torch.Tensor, target: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        """Patch-weighted squared error: chosen images by their quality, rejected by 1 - quality."""
        w = self.weights[torch.as_tensor(idx)]
        w = torch.cat([w[:, 0], w[:, 1]]).unsqueeze(1)  # [2B, 1, h, w]
        return (((pred.float() - target.float()) ** 2) * w).mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------- data
def _png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="PNG")


def read_patch_pairs(path: str | Path) -> list[PatchPair]:
    path = Path(path)
    load = lambda rel: np.asarray(Image.open(path.parent / rel).convert("RGB"))
    pairs = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            pairs.append(PatchPair(r["segments"], load(r["chosen_image"]), load(r["rejected_image"]),
                                   [load(x) for x in r["reference_images"]], np.array(r["chosen_quality"], np.float32),
                                   np.array(r["rejected_quality"], np.float32)))
    if not pairs:
        raise SystemExit(f"no pairs in {path}")
    return pairs


def make_patch_pairs(preset: str | Path, out_path: str | Path, cases: int = 64, candidates: int = 4,
                     seed: int = 0, subjects=None, ranking: str = "patch", keep: float = 1.0) -> list[dict]:
    """Render ``candidates`` per (training subject, prompt) with reference conditioning; score patches; write the
    best-vs-worst pair of the ``keep`` share of cases with the largest gap (``ranking``: see PatchDPOConfig)."""
    from pigment.models.pipeline import Renderer, RenderInputs
    from pigment.models.reference import ImagePatches, ReferenceEncoder
    from pigment.training import toy_subjects as ts

    if ranking not in ("patch", "global"):
        raise SystemExit(f"ranking must be 'patch' or 'global', not {ranking!r}")
    if candidates < 2:
        raise SystemExit("need at least 2 candidates per case to make a pair")
    out_path = Path(out_path)
    image_dir = out_path.parent / f"{out_path.stem}-images"
    image_dir.mkdir(parents=True, exist_ok=True)
    renderer, encoder = Renderer(preset), ReferenceEncoder(preset)
    # the projector's encoder and block: a quality model blind to what the projector reads could not fix it
    patches = ImagePatches(preset, encoder.projector.config["image_encoder"])
    layer = encoder.projector.config.get("feature_layer", -1)
    rng = np.random.default_rng([seed, 5])
    subjects = subjects or ts.train_subjects()
    drawn = []
    for n in tqdm(range(cases), desc="patchdpo candidates", unit="case"):
        subject = subjects[int(rng.integers(len(subjects)))]
        ref_attrs, refs = ts.subject_images(subject, 1, rng)
        prompts = [p for p in ts.all_prompts() if p["background"] != ref_attrs[0]["background"]]
        prompt = ts.prompt_text(prompts[int(rng.integers(len(prompts)))])
        inputs = RenderInputs(segments=[prompt], reference_tokens=encoder.tokens(list(refs)), num_images=candidates,
                              seed=seed * 100_003 + n * candidates)
        images = np.stack([np.asarray(im.convert("RGB")) for im in renderer.render(inputs).images])
        ref_feats, gen_feats = patches(list(refs), layer=layer), patches(list(images), layer=layer)
        raw = [patch_quality(g, list(ref_feats), patches.grid) for g in gen_feats]
        drawn.append((subject.name, prompt, refs, images, raw, [image_similarity(g, list(ref_feats)) for g in gen_feats]))
    lo, hi = calibrate([q for *_, raw, _ in drawn for q in raw])
    scored = []
    for n, (name, prompt, refs, images, raw, similarity) in enumerate(drawn):
        quality = [normalise(q, lo, hi) for q in raw]
        scores = similarity if ranking == "global" else [image_score(q) for q in quality]
        best, worst = int(np.argmax(scores)), int(np.argmin(scores))
        if scores[best] - scores[worst] >= 1e-3:
            scored.append((scores[best] - scores[worst], n, name, prompt, refs, images, quality, scores, best, worst))
    scored.sort(key=lambda x: -x[0])
    records = []
    for _, n, name, prompt, refs, images, quality, scores, best, worst in scored[:int(np.ceil(keep * len(scored)))]:
        rec = {"subject": name, "segments": [prompt], "scores": {"chosen": scores[best], "rejected": scores[worst]},
               "chosen_quality": quality[best].round(4).tolist(), "rejected_quality": quality[worst].round(4).tolist(),
               "calibration": [lo, hi], "reference_images": []}
        for side, image in (("chosen", images[best]), ("rejected", images[worst]), ("reference", refs[0])):
            name = f"{n:05d}_{side}.png"
            _png(image_dir / name, image)
            if side == "reference":
                rec["reference_images"].append(f"{image_dir.name}/{name}")
            else:
                rec[f"{side}_image"] = f"{image_dir.name}/{name}"
        records.append(rec)
    out_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def run(args) -> int:
    cfg = PatchDPOConfig.load(args.config)  # the pair options; run_dpo reads the rest
    make = partial(make_patch_pairs, ranking=cfg.ranking, keep=cfg.pair_keep)
    return run_dpo(args, PatchDPOConfig, PatchDPOTrainer, make, read_patch_pairs, "patchdpo")


def register(train_sub) -> None:
    register_dpo(train_sub, "patchdpo", "PatchDPO: patch-weighted Diffusion-DPO for reference-image generation",
                 "PatchDPOConfig", "pairs JSONL (prompt, reference, chosen/rejected + patch quality)",
                 "first write N toy-world pairs to --pairs (training subjects, reference-encoder patch quality)", run)
