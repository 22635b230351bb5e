"""`pigment train diffusion-dpo --config FILE --pairs FILE`: Diffusion-DPO on a UNet LoRA.

Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization":
for a pair (conditioning c, chosen image x_w, rejected image x_l), both images
get the same timestep t and the same noise e; with policy errors
``d_pol(x) = ||target - eps_pol(x_t, t, c)||^2`` (mean over latent elements) and
the frozen reference's ``d_ref``, the loss is

    -log sigmoid(-beta/2 * ((d_pol(x_w) - d_ref(x_w)) - (d_pol(x_l) - d_ref(x_l))))

The target is the noise, or the velocity for v-prediction schedulers (read from
the scheduler's ``prediction_type``). The policy is a peft LoRA on the UNet's
attention projections (to_q, to_k, to_v, to_out.0); the reference is the same
UNet with the adapter disabled (``unet.disable_adapters()``), so no second UNet
is held. The LoRA's B starts at zero, so the loss starts at exactly log 2.
``init_adapter`` continues a trained LoRA instead (e.g. the serving one, when
retraining from feedback); the reference is still the UNet without any LoRA.

Pairs, JSONL, one per line::

    {"content": "a star", "keywords": ["red", "dark background"],
     "chosen_image": "images/0_chosen.png", "rejected_image": "images/0_rejected.png"}

(image paths relative to the JSONL file, or ``chosen_png_b64`` / ``rejected_png_b64``;
an explicit ``segments`` list overrides content + keywords). The conditioning is
built exactly as the renderer builds it: each segment encoded separately by the
text encoder, concatenated along the token axis. ``make_toy_pairs`` writes such a
file for the toy world: N candidates per (user, content) rendered with the
current model, scored by CLIP image similarity to the user's history images
(the evaluation's joint accuracy reads the attribute probe, a different model),
best = chosen, worst = rejected.

Outputs: ``out/unet_lora/pytorch_lora_weights.safetensors`` (diffusers LoRA
format; ``Renderer(preset, unet_adapter=out/unet_lora)`` serves it) and
``out/metrics.json`` (loss, implicit reward accuracy). Checkpoints are
safetensors and a run resumes from its last one.
"""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from pigment.models.loader import load_component, preset_version
from pigment.training.checkpoints import load_checkpoint, part, save_checkpoint
from pigment.training.config import load_config
from PIL import Image
from tqdm import tqdm

LORA_DIR = "unet_lora"
LORA_FILE = "pytorch_lora_weights.safetensors"
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class DiffusionDPOConfig:
    preset: str = "models/presets/toy"
    out: str = "runs/diffusion_dpo"
    pairs: str = ""                   # the pairs JSONL (CLI: --pairs)
    lora_r: int = 8
    lora_alpha: int = 8
    init_adapter: str = ""            # an out/unet_lora dir to continue (its own rank and alpha win)
    beta: float = 2500.0              # Wallace et al.: 2000-5000 for SD 1.5 / SDXL
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-4                  # LoRA; the paper fine-tunes the full UNet at 1e-8 x batch 2048
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mixed_precision: str = "no"       # no | bf16 | fp16 (Accelerate)
    checkpoint_every: int = 50
    resolution: int = 0               # train at this square size (images resized; 0: as stored); a CPU can
    #                                   afford an SD 1.5 UNet's backward pass at 256, not at 512
    seed: int = 0

    @classmethod
    def load(cls, path: str | Path | None, **overrides) -> DiffusionDPOConfig:
        return load_config(cls, path, **overrides)


@dataclass
class ImagePair:
    segments: list[str]
    chosen: np.ndarray    # uint8 H,W,3
    rejected: np.ndarray


def segments_of(content: str, keywords: list[str]) -> list[str]:
    """The serving layout: the content prompt, then the keyword prompt (when there are keywords)."""
    return [content, ", ".join(keywords)] if keywords else [content]


def _image(record: dict, side: str, base: Path) -> np.ndarray:
    if f"{side}_png_b64" in record:
        data = io.BytesIO(base64.b64decode(record[f"{side}_png_b64"]))
    elif f"{side}_image" in record:
        data = base / record[f"{side}_image"]
    else:
        raise SystemExit(f"pair needs {side}_image (a path) or {side}_png_b64: {sorted(record)}")
    return np.asarray(Image.open(data).convert("RGB"))


def read_image_pairs(path: str | Path) -> list[ImagePair]:
    path = Path(path)
    pairs = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            segments = r.get("segments") or segments_of(r.get("content", ""), list(r.get("keywords", [])))
            pairs.append(ImagePair(segments, _image(r, "chosen", path.parent), _image(r, "rejected", path.parent)))
    if not pairs:
        raise SystemExit(f"no pairs in {path}")
    return pairs


class DiffusionDPOTrainer:
    method = "diffusion_dpo"  # subclasses (train_patchdpo.py) change the data and the per-image error

    def __init__(self, cfg: DiffusionDPOConfig):
        from accelerate import Accelerator
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        self.cfg = cfg
        self.accel = Accelerator(mixed_precision=cfg.mixed_precision)
        torch.manual_seed(cfg.seed)
        preset = Path(cfg.preset)
        self.device = self.accel.device
        self.vae = load_component(preset, "vae").requires_grad_(False).to(self.device)
        self.text_encoder = load_component(preset, "text_encoder").requires_grad_(False).to(self.device)
        self.tokenizer = load_component(preset, "tokenizer")
        self.noise_scheduler = DDPMScheduler.from_pretrained(str(preset / "scheduler"), local_files_only=True)
        unet = load_component(preset, "unet").requires_grad_(False)
        if getattr(unet.config, "addition_embed_type", None):  # SDXL's text_time: pooled embeds + time ids
            raise ValueError(f"{preset}: the UNet takes added conditions ({unet.config.addition_embed_type!r}); "
                             "Diffusion-DPO here trains SD-style UNets (text hidden states only)")
        if cfg.init_adapter:  # the file's metadata carries the LoRA config; the reference stays the plain UNet
            unet.load_lora_adapter(cfg.init_adapter, prefix=None, weight_name=LORA_FILE, adapter_name="default",
                                   use_safetensors=True, local_files_only=True)
        else:
            unet.add_adapter(LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                        target_modules=TARGET_MODULES))
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.unet, self.optimizer = self.accel.prepare(unet, self.optimizer)
        self.base_version = preset_version(preset)
        self.out = Path(cfg.out)
        self.step = 0
        self.history: list[dict] = []

    # -- data (frozen VAE and text encoder run once) ---------------------------------------------
    @torch.no_grad()
    def prepare(self, pairs: list[ImagePair]) -> None:
        self.pairs = pairs
        self.lat_w = self._latents([p.chosen for p in pairs])
        self.lat_l = self._latents([p.rejected for p in pairs])
        cache: dict[str, torch.Tensor] = {}
        self.cond = []
        for p in pairs:
            for seg in p.segments:
                if seg not in cache:
                    ids = self.tokenizer(seg, padding="max_length", max_length=self.tokenizer.model_max_length,
                                         truncation=True, return_tensors="pt").input_ids
                    cache[seg] = self.text_encoder(ids.to(self.device))[0][0]
            self.cond.append(torch.cat([cache[s] for s in p.segments]))
        # pairs with equal token counts batch together
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(self.cond):
            groups.setdefault(int(c.shape[0]), []).append(i)
        self.groups = [np.array(g) for g in groups.values()]

    def _latents(self, images: list[np.ndarray]) -> torch.Tensor:
        size = self.cfg.resolution
        if size and any(im.shape[:2] != (size, size) for im in images):
            images = [np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images]
        x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1).to(self.device)
        out = [self.vae.encode(x[i:i + 64]).latent_dist.mean for i in range(0, len(x), 64)]
        return torch.cat(out) * self.vae.config.scaling_factor

    # -- loss --------------------------------------------------------------------------------------
    def loss(self, idx: np.ndarray, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Diffusion-DPO loss of pairs ``idx`` at timesteps ``t`` [B] with noise [B, C, H, W] (shared by w and l)."""
        b = len(idx)
        latents = torch.cat([self.lat_w[idx], self.lat_l[idx]])
        noise, t = noise.to(self.device), t.to(self.device)
        noise2, t2 = torch.cat([noise, noise]), torch.cat([t, t])
        cond = torch.stack([self.cond[i] for i in idx])
        cond = torch.cat([cond, cond])
        noisy = self.noise_scheduler.add_noise(latents, noise2, t2)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise2, t2)
        else:
            target = noise2
        unet = self.accel.unwrap_model(self.unet)
        with torch.no_grad():  # reference = the same UNet, adapter off (first: disabling freezes the LoRA)
            unet.disable_adapters()
            ref_err = self.errors(self.unet(noisy, t2, encoder_hidden_states=cond).sample, target, idx)
            unet.enable_adapters()
        err = self.errors(self.unet(noisy, t2, encoder_hidden_states=cond).sample, target, idx)
        model_diff, ref_diff = err[:b] - err[b:], ref_err[:b] - ref_err[b:]
        inside = -0.5 * self.cfg.beta * (model_diff - ref_diff)
        loss = -torch.nn.functional.logsigmoid(inside).mean()
        return loss, {"implicit_accuracy": round(float((inside > 0).float().mean()), 4),
                      "mse_chosen": round(float(err[:b].detach().mean()), 6),
                      "mse_rejected": round(float(err[b:].detach().mean()), 6),
                      "ref_diff": round(float(ref_diff.mean()), 6)}

    def errors(self, pred: torch.Tensor, target: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        """Per-image error [2B] of chosen (first B) and rejected (last B) predictions."""
        return self._err(pred, target)

    @staticmethod
    def _err(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((pred.float() - target.float()) ** 2).mean(dim=list(range(1, pred.ndim)))

    def draw(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps and noise for ``n`` pairs, from ``rng`` (deterministic per step)."""
        t = torch.from_numpy(rng.integers(0, self.noise_scheduler.config.num_train_timesteps, n)).long()
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        return t, torch.randn((n, *self.lat_w.shape[1:]), generator=gen)

    # -- loop ---------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        self.resume()
        t0 = time.perf_counter()
        sizes = np.array([len(g) for g in self.groups], dtype=float)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {self.method}", unit="step")
        while self.step < cfg.steps:
            rng = np.random.default_rng([cfg.seed, self.step])  # deterministic per step: resumable exactly
            group = self.groups[int(rng.choice(len(self.groups), p=sizes / sizes.sum()))]
            idx = rng.choice(group, min(cfg.batch_size, len(group)), replace=False)
            for pg in self.optimizer.param_groups:
                pg["lr"] = cfg.lr * min(1.0, (self.step + 1) / max(1, cfg.warmup_steps))
            loss, extra = self.loss(idx, *self.draw(rng, len(idx)))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss diverged at step {self.step}: {loss.item()}")
            self.accel.backward(loss)
            self.accel.clip_grad_norm_(self.params, cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.step += 1
            self.history.append({"step": self.step, "loss": round(loss.item(), 6), **extra})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", acc=extra["implicit_accuracy"])
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.checkpoint()
        bar.close()
        return self.finish(time.perf_counter() - t0)

    # -- checkpoints (safetensors only) --------------------------------------------------------------
    def checkpoint(self) -> None:
        from peft import get_peft_model_state_dict

        lora = get_peft_model_state_dict(self.accel.unwrap_model(self.unet))
        save_checkpoint(self.out / "checkpoint", {f"lora.{k}": v for k, v in lora.items()}, self.optimizer,
                        {"step": self.step, "history": self.history})

    def resume(self) -> None:
        from peft import set_peft_model_state_dict

        loaded = load_checkpoint(self.out / "checkpoint", self.optimizer)
        if loaded is None:
            return
        tensors, meta = loaded
        set_peft_model_state_dict(self.accel.unwrap_model(self.unet), part(tensors, "lora."))
        self.step, self.history = meta["step"], meta["history"]
        print(f"resumed from {self.out / 'checkpoint'} at step {self.step}")

    def finish(self, seconds: float) -> dict:
        lora_dir = self.out / LORA_DIR
        self.accel.unwrap_model(self.unet).save_lora_adapter(str(lora_dir), weight_name=LORA_FILE)
        (lora_dir / "adapter.json").write_text(json.dumps(
            {"method": self.method, "base_model_version": self.base_version, "steps": self.step,
             "beta": self.cfg.beta, "target_modules": TARGET_MODULES, "init_adapter": self.cfg.init_adapter or None},
            indent=2))
        losses = [h["loss"] for h in self.history]
        acc = [h["implicit_accuracy"] for h in self.history]
        window = max(1, len(losses) // 10)
        metrics = {"method": self.method, "steps": self.step, "seconds": round(seconds, 1),
                   "pairs": len(self.pairs), "reference": "the UNet with the LoRA disabled",
                   "prediction_type": self.noise_scheduler.config.prediction_type,
                   "loss_first": float(np.mean(losses[:window])), "loss_last": float(np.mean(losses[-window:])),
                   "implicit_accuracy_first": float(np.mean(acc[:window])),
                   "implicit_accuracy_last": float(np.mean(acc[-window:])),
                   "adapter": str(lora_dir), "config": asdict(self.cfg), "history": self.history}
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics


# ----------------------------------------------------------------------------- automatic pairs
def make_toy_pairs(preset: str | Path, out_path: str | Path, cases: int = 64, candidates: int = 4,
                   split: str = "train", world_seed: int = 0, seed: int = 0, steps: int | None = None,
                   guidance: float | None = None) -> list[dict]:
    """Render ``candidates`` images per toy-world (user, content) with the current model (content +
    PMG keywords), score them by CLIP image cosine to the user's history images; best vs worst."""
    from pigment.models.clip_embedder import ClipEmbedder
    from pigment.models.loader import preset_defaults
    from pigment.models.pipeline import Renderer, RenderInputs
    from pigment.models.preference import PreferenceEncoder
    from pigment.training import toy_world as tw

    if candidates < 2:
        raise SystemExit("need at least 2 candidates per case to make a pair")
    out_path = Path(out_path)
    image_dir = out_path.parent / f"{out_path.stem}-images"
    image_dir.mkdir(parents=True, exist_ok=True)
    world = tw.ToyWorld(seed=world_seed)
    samples = world.samples(split)
    pick = np.random.default_rng(seed).choice(len(samples), min(cases, len(samples)), replace=False)
    defaults = preset_defaults(preset)
    renderer, encoder, clip = Renderer(preset), PreferenceEncoder(preset), ClipEmbedder(preset)
    records = []
    for n, i in enumerate(tqdm(sorted(pick), desc="diffusion-dpo pairs", unit="case")):
        s = samples[i]
        history = [world.item_by_id[h] for h in s.history]
        content = tw.caption(world.item_by_id[s.target].attributes, keep={"shape"})
        keywords = encoder.encode([h.caption for h in history], target=content, method="pmg_keywords").keywords
        size = int(defaults.get("height", 32))
        inputs = RenderInputs(segments=segments_of(content, keywords), num_images=candidates, seed=seed + n * candidates,
                              num_inference_steps=steps or int(defaults.get("num_inference_steps", 20)),
                              guidance_scale=guidance or float(defaults.get("guidance_scale", 3.0)),
                              height=size, width=size)
        images = [np.asarray(im.convert("RGB")) for im in renderer.render(inputs).images]
        hist = clip.embed_images([h.image for h in history]).mean(0)
        score = clip.embed_images(images) @ (hist / np.linalg.norm(hist))
        best, worst = int(np.argmax(score)), int(np.argmin(score))
        if best == worst:
            continue
        rec = {"user_id": s.user_id, "content": content, "keywords": keywords,
               "scores": {"chosen": float(score[best]), "rejected": float(score[worst])}, "scorer": clip.model_id}
        for side, k in (("chosen", best), ("rejected", worst)):
            name = f"{n:05d}_{side}.png"
            (image_dir / name).write_bytes(tw.png_bytes(images[k]))
            rec[f"{side}_image"] = f"{image_dir.name}/{name}"
        records.append(rec)
    out_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def run(args) -> int:
    return run_dpo(args, DiffusionDPOConfig, DiffusionDPOTrainer, make_toy_pairs, read_image_pairs, "diffusion-dpo")


def run_dpo(args, config_cls, trainer_cls, make_pairs, read_pairs, label: str) -> int:
    """The `pigment train` entry shared by the Diffusion-DPO family (diffusion-dpo, patchdpo)."""
    cfg = config_cls.load(args.config, preset=args.preset, out=args.out, steps=args.steps, pairs=args.pairs)
    if not cfg.pairs:
        raise SystemExit("give --pairs FILE (or `pairs:` in the config)")
    if args.make_pairs:
        recs = make_pairs(cfg.preset, cfg.pairs, cases=args.make_pairs, candidates=args.candidates, seed=cfg.seed)
        print(f"wrote {len(recs)} pairs to {cfg.pairs}")
    trainer = trainer_cls(cfg)
    trainer.prepare(read_pairs(cfg.pairs))
    m = trainer.train()
    print(f"{label}: {m['steps']} steps in {m['seconds']}s, loss {m['loss_first']:.4f} -> {m['loss_last']:.4f}, "
          f"implicit accuracy {m['implicit_accuracy_first']:.2f} -> {m['implicit_accuracy_last']:.2f}; "
          f"LoRA in {m['adapter']}")
    return 0


def register(train_sub) -> None:
    register_dpo(train_sub, "diffusion-dpo", "Diffusion-DPO on a UNet LoRA from chosen/rejected image pairs",
                 "DiffusionDPOConfig", "pairs JSONL (content, keywords, chosen/rejected image)",
                 "first write N automatic toy-world pairs to --pairs (CLIP-to-history best vs worst)", run)


def register_dpo(train_sub, name: str, help: str, config_name: str, pairs_help: str, make_pairs_help: str,
                 run_fn) -> None:
    p = train_sub.add_parser(name, help=help)
    p.add_argument("--config", default=None, help=f"YAML with {config_name} fields")
    p.add_argument("--pairs", default=None, help=pairs_help)
    p.add_argument("--preset", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--make-pairs", type=int, default=0, metavar="N", help=make_pairs_help)
    p.add_argument("--candidates", type=int, default=4, help="with --make-pairs: images rendered per case")
    p.set_defaults(func=lambda args, settings: run_fn(args))
