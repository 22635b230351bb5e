"""`pigment train reference`: the reference projector (IP-Adapter-Plus style) on the toy world's subjects.

The UNet, VAE, text encoder and image encoder stay frozen; only the projector
(models/reference.py) trains, with the ordinary diffusion loss (the preset
scheduler's target: velocity or noise) on a *target* image of a subject given
the prompt for the target's other attributes plus tokens from *other* images of
the same subject. References and targets differ in background and size, so the
tokens must carry identity (shape, colour), not the scene. 10% of samples get
zero tokens, which is what the renderer's unconditional side sees.

Before that, a cheap alignment stage (``align_steps``, no UNet) regresses the
tokens onto the text encoder's output for the subject's identity caption ("a
red star"): the frozen UNet already reads that space, so the diffusion stage
starts from tokens it understands (BLIP-Diffusion aligns its subject embedding
to text the same way). On a shared 2-core CPU this is what makes the run short.

Outputs: ``out/reference_projector/`` (config + safetensors) and
``out/metrics.json``; ``--install`` adds the projector to the preset's manifest.
Checkpoints are safetensors; a run resumes from its last one.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from pigment.models.loader import load_component, preset_version, read_manifest, write_manifest
from pigment.models.reference import PROJECTOR, ImagePatches, ReferenceProjector
from pigment.training import toy_subjects as ts
from pigment.training.checkpoints import load_checkpoint, part, save_checkpoint
from pigment.training.config import load_config
from tqdm import tqdm


@dataclass
class ReferenceConfig:
    preset: str = "models/presets/toy"
    out: str = "runs/reference"
    image_encoder: str = "clip"       # the preset component giving the patch features (toy: reference_encoder;
    #                                   a real preset: image_encoder (CLIP-ViT) or dino_encoder (DINOv2))
    depth: int = 2                    # self-attention layers over the patches before the resampler
    feature_layer: int = -1           # which block of the image encoder gives the patches (-1: the last)
    num_tokens: int = 14              # the text encoder's segment length: the tokens read like one more segment
    align_steps: int = 3000           # stage 1: tokens regress onto the text encoding of the subject's caption
    steps: int = 200                  # stage 2: the diffusion loss through the frozen UNet
    batch_size: int = 32
    lr: float = 1e-3
    align_lr: float = 3e-3
    warmup_steps: int = 50
    max_references: int = 2           # 1..this many references per sample
    drop_reference: float = 0.1       # zero tokens (classifier-free guidance's unconditional side)
    images_per_subject: int = 48
    checkpoint_every: int = 250
    seed: int = 0

    @classmethod
    def load(cls, path: str | Path | None, **overrides) -> ReferenceConfig:
        return load_config(cls, path, **overrides)


def encode_prompts(text_encoder, tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """prompt -> [L, D] text encoder output, padded as the renderer pads it."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        h = text_encoder(ids)[0]
    return dict(zip(prompts, h))


def image_latents(vae, images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        out = [vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)]
    return torch.cat(out) * vae.config.scaling_factor


def diffusion_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return noise


class ReferenceTrainer:
    def __init__(self, cfg: ReferenceConfig, subjects: list[ts.Subject] | None = None):
        from diffusers import DDPMScheduler

        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        preset = Path(cfg.preset)
        self.vae = load_component(preset, "vae").requires_grad_(False)
        self.text_encoder = load_component(preset, "text_encoder").requires_grad_(False)
        self.tokenizer = load_component(preset, "tokenizer")
        self.unet = load_component(preset, "unet").requires_grad_(False)
        self.scheduler = DDPMScheduler.from_pretrained(str(preset / "scheduler"), local_files_only=True)
        self.patches = ImagePatches(preset, cfg.image_encoder)
        self.projector = ReferenceProjector(self.patches.dim, self.text_encoder.config.hidden_size, cfg.num_tokens,
                                            image_encoder=cfg.image_encoder, depth=cfg.depth,
                                            feature_layer=cfg.feature_layer)
        self.optimizer = torch.optim.AdamW(self.projector.parameters(), lr=cfg.lr, weight_decay=1e-2)
        self.subjects = subjects or ts.train_subjects()
        self.base_version = preset_version(preset)
        self.out = Path(cfg.out)
        self.step = 0
        self.history: list[dict] = []

    def prepare(self) -> None:
        """Render every training subject's images once; frozen encoders run once over them."""
        rng = np.random.default_rng([self.cfg.seed, 11])
        attrs, images = [], []
        for subject in self.subjects:
            a, im = ts.subject_images(subject, self.cfg.images_per_subject, rng)
            attrs.append(a)
            images.append(im)
        self.attrs = attrs
        flat = np.concatenate(images)
        n = self.cfg.images_per_subject
        self.latents = image_latents(self.vae, flat).reshape(len(self.subjects), n, *self.vae_latent_shape(flat))
        self.feats = self.patches(list(flat), layer=self.cfg.feature_layer).reshape(len(self.subjects), n, -1, self.patches.dim)
        prompts = {ts.prompt_text({k: a[k] for k in keep}) for sa in attrs for a in sa for keep in self._keeps()}
        self.text = encode_prompts(self.text_encoder, self.tokenizer, sorted(prompts))
        names = [ts.identity_caption(s) for s in self.subjects]
        identity = encode_prompts(self.text_encoder, self.tokenizer, names)
        self.identity = torch.stack([identity[n][:self.cfg.num_tokens] for n in names])

    def vae_latent_shape(self, flat: np.ndarray) -> tuple[int, ...]:
        with torch.no_grad():
            return tuple(image_latents(self.vae, flat[:1]).shape[1:])

    @staticmethod
    def _keeps() -> list[tuple[str, ...]]:
        return [ts.PROMPTED, ("background",), ("size",), ()]

    def batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(target latents [B,C,H,W], text [B,L,D], reference patches [B, R*P, D]) for one step."""
        b, n = self.cfg.batch_size, self.cfg.images_per_subject
        r = int(rng.integers(1, self.cfg.max_references + 1))
        subj = rng.integers(0, len(self.subjects), b)
        lat, text, refs = [], [], []
        for s in subj:
            pick = rng.choice(n, r + 1, replace=False)
            a = self.attrs[s][pick[0]]
            keep = self._keeps()[int(rng.choice(4, p=[0.7, 0.1, 0.1, 0.1]))]
            lat.append(self.latents[s, pick[0]])
            text.append(self.text[ts.prompt_text({k: a[k] for k in keep})])
            refs.append(self.feats[s, pick[1:]].reshape(-1, self.patches.dim))
        return torch.stack(lat), torch.stack(text), torch.stack(refs)

    def align_loss(self, rng: np.random.Generator) -> torch.Tensor:
        b, n = self.cfg.batch_size, self.cfg.images_per_subject
        r = int(rng.integers(1, self.cfg.max_references + 1))
        subj = rng.integers(0, len(self.subjects), b)
        refs = torch.stack([self.feats[s, rng.choice(n, r, replace=False)].reshape(-1, self.patches.dim)
                            for s in subj])
        return torch.nn.functional.mse_loss(self.projector(refs), self.identity[torch.from_numpy(subj)])

    def loss(self, rng: np.random.Generator) -> torch.Tensor:
        if self.step < self.cfg.align_steps:
            return self.align_loss(rng)
        x0, text, refs = self.batch(rng)
        tokens = self.projector(refs)
        keep = torch.from_numpy(rng.random(len(x0)) >= self.cfg.drop_reference).float()[:, None, None]
        cond = torch.cat([text, tokens * keep], dim=1)
        t = torch.from_numpy(rng.integers(0, self.scheduler.config.num_train_timesteps, len(x0))).long()
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
        pred = self.unet(self.scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        return torch.nn.functional.mse_loss(pred, diffusion_target(self.scheduler, x0, noise, t))

    def train(self, progress: bool = True) -> dict:
        cfg = self.cfg
        self.resume()
        t0 = time.perf_counter()
        total = cfg.align_steps + cfg.steps
        bar = tqdm(total=total, initial=self.step, desc="train reference", unit="step", disable=not progress)
        while self.step < total:
            rng = np.random.default_rng([cfg.seed, self.step])  # deterministic per step: resumable exactly
            stage_step, lr = ((self.step, cfg.align_lr) if self.step < cfg.align_steps
                              else (self.step - cfg.align_steps, cfg.lr))
            for pg in self.optimizer.param_groups:
                pg["lr"] = lr * min(1.0, (stage_step + 1) / max(1, cfg.warmup_steps))
            loss = self.loss(rng)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss diverged at step {self.step}: {loss.item()}")
            self.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.projector.parameters(), 1.0)
            self.optimizer.step()
            self.step += 1
            stage = "align" if self.step <= cfg.align_steps else "diffusion"
            self.history.append({"step": self.step, "stage": stage, "loss": round(loss.item(), 6)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if self.step % cfg.checkpoint_every == 0 or self.step in (cfg.align_steps, total):
                self.checkpoint()
        bar.close()
        return self.finish(time.perf_counter() - t0)

    def checkpoint(self) -> None:
        save_checkpoint(self.out / "checkpoint", {f"proj.{k}": v for k, v in self.projector.state_dict().items()},
                        self.optimizer, {"step": self.step, "history": self.history})

    def resume(self) -> None:
        loaded = load_checkpoint(self.out / "checkpoint", self.optimizer)
        if loaded is None:
            return
        tensors, meta = loaded
        self.projector.load_state_dict(part(tensors, "proj."))
        self.step, self.history = meta["step"], meta["history"]
        print(f"resumed from {self.out / 'checkpoint'} at step {self.step}")

    def finish(self, seconds: float) -> dict:
        self.projector.save_pretrained(self.out / PROJECTOR)
        stages = {}
        for stage in ("align", "diffusion"):
            losses = [h["loss"] for h in self.history if h["stage"] == stage]
            window = max(1, len(losses) // 10)
            if losses:
                stages[stage] = {"steps": len(losses), "loss_first": float(np.mean(losses[:window])),
                                 "loss_last": float(np.mean(losses[-window:]))}
        last = stages.get("diffusion") or stages.get("align") or {"loss_first": float("nan"), "loss_last": float("nan")}
        metrics = {"method": "reference", "steps": self.step, "seconds": round(seconds, 1),
                   "base_model_version": self.base_version, "subjects": [s.name for s in self.subjects],
                   "held_out_subjects": [s.name for s in ts.held_out_subjects()], "stages": stages,
                   "loss_first": last["loss_first"], "loss_last": last["loss_last"],
                   "projector": str(self.out / PROJECTOR), "config": asdict(self.cfg), "history": self.history}
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics


def install_component(preset_dir: str | Path, name: str, src: str | Path, kind: str, **extra) -> dict:
    """Copy a trained component into the preset and record it (with its sha256s) in the manifest."""
    preset_dir = Path(preset_dir)
    dest = preset_dir / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)
    manifest = read_manifest(preset_dir)
    components = {n: {k: v for k, v in e.items() if k != "files"} for n, e in manifest["components"].items()}
    components[name] = {"path": name, "kind": kind, **extra}
    return write_manifest(preset_dir, components, **{k: v for k, v in manifest.items() if k != "components"})


def run(args) -> int:
    cfg = ReferenceConfig.load(args.config, preset=args.preset, out=args.out, steps=args.steps)
    trainer = ReferenceTrainer(cfg)
    trainer.prepare()
    m = trainer.train()
    print(f"reference: {m['steps']} steps in {m['seconds']}s, loss {m['loss_first']:.4f} -> {m['loss_last']:.4f}; "
          f"projector in {m['projector']}")
    if args.install:
        command = f"pigment train reference --config {args.config} --install" if args.config else (
            f"pigment train reference --steps {cfg.steps} --out {cfg.out} --install")
        install_component(cfg.preset, PROJECTOR, m["projector"], PROJECTOR, training_command=command,
                          data_seed=cfg.seed)
        print(f"installed {PROJECTOR} into {cfg.preset}")
    return 0


def register(train_sub) -> None:
    p = train_sub.add_parser("reference", help="the reference-image projector (subject tokens) on the toy world")
    p.add_argument("--config", default=None, help="YAML with ReferenceConfig fields")
    p.add_argument("--preset", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--install", action="store_true", help="add the trained projector to the preset's manifest")
    p.set_defaults(func=lambda args, settings: run(args))
