"""`pigment train pmg --config FILE`: PMG's implicit preference (soft tokens), trained.

Only the preference head trains (prefix vectors, image tokens, projection; and,
optionally, a LoRA on the LLM via peft). LLM, VAE, text encoder and UNet stay
frozen; the gradient flows through the frozen UNet into the head. PMG's loss is
the ordinary denoising loss on the target image given the content prompt,
(sometimes) the keyword prompt, and the soft tokens. We add, and on the toy world
use alone (``distill_weight: 1``), a distillation form of it: match what the same
UNet predicts when told the target's caption. Its target has no noise variance, so
the head learns an object's colour and size and not only the background (the
plain loss taught it little else). Half of the steps drop the keyword segment, so
the soft tokens work alone (``pmg_soft``) and beside the keywords (``pmg``).

Data: PMG unified JSON records (``user_id``, ``history_items_info``,
``target_item_info``) or the toy world directly. Runs on CPU here and on one or
many GPUs through Accelerate; checkpoints are safetensors (never pickle) and a
run resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from pigment.models.loader import load_component
from pigment.models.preference import PMG_LORA
from pigment.training.checkpoints import load_checkpoint, part, save_checkpoint
from pigment.training.config import load_config
from tqdm import tqdm


@dataclass
class PMGTrainConfig:
    preset: str = "models/presets/toy"
    out: str = "runs/pmg"
    data_format: str = "toy"          # toy | pmg_json
    data_path: str = ""               # for pmg_json: the records file (images resolved relative to it)
    world_seed: int = 0
    split: str = "train"
    content_from: str = "toy_shape"   # toy_shape: "a star" from the target caption; caption: the whole caption
    num_prefix: int = 2
    num_image_tokens: int = 2
    steps: int = 400
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-3                  # PMG uses 5e-6 on a 7B LLM; a tiny head from scratch needs more
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    keyword_dropout: float = 0.5
    distill_weight: float = 0.0       # share of the loss matching the UNet told the target's caption (see loss)
    lora_r: int = 0                   # > 0: LoRA on the LLM's q/v projections
    lora_alpha: int = 16
    mixed_precision: str = "no"       # no | bf16 | fp16 (Accelerate)
    checkpoint_every: int = 100
    seed: int = 0
    max_samples: int = 4000
    extra: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None, **overrides) -> PMGTrainConfig:
        return load_config(cls, path, **overrides)


@dataclass
class Record:
    history: list[str]      # captions, oldest first
    content: str            # what the request names
    target_image: np.ndarray  # uint8 H,W,3
    target_caption: str = ""  # the target item's own caption (the distillation teacher's text)


def load_records(cfg: PMGTrainConfig) -> list[Record]:
    from pigment.training import toy_world as tw

    def content_of(caption: str) -> str:
        if cfg.content_from == "caption":
            return caption
        return tw.caption(tw.parse_caption(caption), keep={"shape"})

    if cfg.data_format == "toy":
        world = tw.ToyWorld(seed=cfg.world_seed)
        rows = [([world.item_by_id[i].caption for i in s.history], world.item_by_id[s.target])
                for s in world.samples(cfg.split)]
        records = [Record(h, content_of(t.caption), t.image, t.caption) for h, t in rows]
    elif cfg.data_format == "pmg_json":
        from PIL import Image

        base = Path(cfg.data_path).parent
        records = []
        for r in json.loads(Path(cfg.data_path).read_text()):
            target = r["target_item_info"]
            image = np.asarray(Image.open(base / target["image_path"]).convert("RGB"))
            records.append(Record([h["caption"] for h in r["history_items_info"]], content_of(target["caption"]), image,
                                  target["caption"]))
    else:
        raise SystemExit(f"data_format must be toy or pmg_json, got {cfg.data_format!r}")
    rng = np.random.default_rng(cfg.seed)
    if len(records) > cfg.max_samples:
        records = [records[i] for i in sorted(rng.choice(len(records), cfg.max_samples, replace=False))]
    return records


class PMGTrainer:
    def __init__(self, cfg: PMGTrainConfig):
        from accelerate import Accelerator
        from diffusers import DDPMScheduler
        from pigment.models.preference import PreferenceEncoder
        from pigment.models.preference_head import PreferenceHead

        self.cfg = cfg
        self.accel = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
        torch.manual_seed(cfg.seed)
        preset = Path(cfg.preset)
        self.encoder = PreferenceEncoder(preset)  # LLM, tokenizer, prompt templates, keyword validation
        self.llm = self.encoder.llm.requires_grad_(False)
        self.unet = load_component(preset, "unet").requires_grad_(False)
        self.vae = load_component(preset, "vae").requires_grad_(False)
        self.text_encoder = load_component(preset, "text_encoder").requires_grad_(False)
        self.tokenizer = load_component(preset, "tokenizer")
        sched_dir = preset / "scheduler"
        self.noise_scheduler = DDPMScheduler.from_pretrained(str(sched_dir), local_files_only=True)
        self.head = PreferenceHead(self.llm.config.hidden_size, self.text_encoder.config.hidden_size,
                                   cfg.num_prefix, cfg.num_image_tokens)
        params = list(self.head.parameters())
        if cfg.lora_r > 0:  # injected into the encoder's LLM in place, so soft_tokens_batch sees it
            from peft import LoraConfig, get_peft_model

            self.llm = get_peft_model(self.llm, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                           target_modules=["q_proj", "v_proj"], lora_dropout=0.05))
            params += [p for p in self.llm.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.head, self.optimizer = self.accel.prepare(self.head, self.optimizer)
        self.out = Path(cfg.out)
        self.step = 0
        self.history: list[dict] = []

    # -- data preparation (frozen parts run once) ------------------------------
    @torch.no_grad()
    def prepare(self, records: list[Record]) -> None:
        self.records = records
        images = torch.from_numpy(np.stack([r.target_image for r in records])).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = []
        for i in tqdm(range(0, len(images), 256), desc="encode targets (VAE)", leave=False):
            latents.append(self.vae.encode(images[i:i + 256]).latent_dist.mean)
        self.latents = torch.cat(latents) * self.vae.config.scaling_factor
        self.prompts = [self.encoder.build_prompt(r.history)[0] for r in records]
        unique = sorted(set(self.prompts))
        raw: dict[str, list[str]] = {}
        for i in tqdm(range(0, len(unique), 64), desc="LLM keywords", leave=False):
            chunk = unique[i:i + 64]
            raw.update(zip(chunk, self.encoder.generate_keywords_batch(chunk)))
        self.keywords = [self.encoder.vocab.validate(raw[p], r.content)[0] for p, r in zip(self.prompts, records)]
        self.with_keywords = np.array([i for i, kw in enumerate(self.keywords) if kw], dtype=np.int64)
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode_text(self, text: str) -> torch.Tensor:
        if text not in self._text_cache:
            ids = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            self._text_cache[text] = self.text_encoder(ids)[0][0]
        return self._text_cache[text]

    def soft_tokens(self, prompts: list[str]) -> torch.Tensor:
        # The encoder's own prompt layout (BOS, left padding), so training matches serving exactly.
        self.encoder.head = self.head
        return self.encoder.soft_tokens_batch(prompts)

    # -- one step -----------------------------------------------------------------
    def loss(self, idx: np.ndarray, use_keywords: bool, rng: np.random.Generator) -> torch.Tensor:
        soft = self.soft_tokens([self.prompts[i] for i in idx])
        conds = []
        for n, i in enumerate(idx):
            parts = [self.encode_text(self.records[i].content)]
            if use_keywords:  # the serving layout of `pmg`; without it, that of `pmg_soft`
                parts.append(self.encode_text(", ".join(self.keywords[i])))
            conds.append(torch.cat([*parts, soft[n]]))
        cond = torch.stack(conds)
        latents = self.latents[idx]
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
        t = torch.from_numpy(rng.integers(0, self.noise_scheduler.config.num_train_timesteps, len(idx))).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = self.unet(noisy, t, encoder_hidden_states=cond).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        if self.cfg.distill_weight > 0:
            # The same UNet, told in words what the target looks like, predicts what the soft tokens
            # should make it predict. Unlike the sampled noise this target carries no noise variance, so
            # small regions (an object's colour, its size) are not drowned by the background's share.
            with torch.no_grad():
                teacher = torch.stack([torch.cat([self.encode_text(self.records[i].content),
                                                  self.encode_text(self.records[i].target_caption)]) for i in idx])
                teacher_pred = self.unet(noisy, t, encoder_hidden_states=teacher).sample
            w = self.cfg.distill_weight
            loss = (1 - w) * loss + w * torch.nn.functional.mse_loss(pred.float(), teacher_pred.float())
        return loss

    def train(self) -> dict:
        cfg = self.cfg
        self.resume()
        t0 = time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train pmg", unit="step")
        while self.step < cfg.steps:
            rng = np.random.default_rng([cfg.seed, self.step])  # deterministic per step: resumable exactly
            use_keywords = self.with_keywords.size > 0 and rng.random() >= cfg.keyword_dropout
            pool = self.with_keywords if use_keywords else np.arange(len(self.records))
            idx = rng.choice(pool, min(cfg.batch_size, len(pool)), replace=False)
            with self.accel.accumulate(self.head):
                loss = self.loss(idx, use_keywords, rng)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss diverged at step {self.step}: {loss.item()}")
                self.accel.backward(loss)
                self.accel.clip_grad_norm_(self.params, cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad()
            self.step += 1
            self.history.append({"step": self.step, "loss": round(loss.item(), 5)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.checkpoint()
        bar.close()
        return self.finish(time.perf_counter() - t0)

    # -- checkpoints (safetensors only) -----------------------------------------------
    def checkpoint(self) -> None:
        head = self.accel.unwrap_model(self.head)
        tensors = {f"head.{k}": v for k, v in head.state_dict().items()}
        if self.cfg.lora_r > 0:
            from peft import get_peft_model_state_dict

            tensors.update({f"lora.{k}": v for k, v in get_peft_model_state_dict(self.llm).items()})
        save_checkpoint(self.out / "checkpoint", tensors, self.optimizer, {"step": self.step, "history": self.history})

    def resume(self) -> None:
        loaded = load_checkpoint(self.out / "checkpoint", self.optimizer)
        if loaded is None:
            return
        tensors, meta = loaded
        self.accel.unwrap_model(self.head).load_state_dict(part(tensors, "head."))
        if self.cfg.lora_r > 0:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.llm, part(tensors, "lora."))
        self.step, self.history = meta["step"], meta["history"]
        print(f"resumed from {self.out / 'checkpoint'} at step {self.step}")

    def finish(self, seconds: float) -> dict:
        head_dir = self.out / "preference_head"
        self.accel.unwrap_model(self.head).save_pretrained(head_dir)
        if self.cfg.lora_r > 0:  # served with the head: PreferenceEncoder loads it as the "pmg" adapter
            self.llm.peft_config["default"].base_model_name_or_path = "llm"  # the preset's, not this machine's path
            self.llm.save_pretrained(str(head_dir / PMG_LORA), safe_serialization=True)
        losses = [h["loss"] for h in self.history]
        window = max(1, len(losses) // 10)
        metrics = {
            "method": "pmg", "steps": self.step, "seconds": round(seconds, 1), "samples": len(self.records),
            "loss_first": float(np.mean(losses[:window])), "loss_last": float(np.mean(losses[-window:])),
            "config": asdict(self.cfg), "history": self.history,
        }
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics


def install(head_dir: Path, preset_dir: Path, command: str, data_seed: int = 0) -> None:
    """Make a trained head the preset's ``preference_head`` (manifest re-hashed)."""
    import shutil

    from pigment.models.loader import read_manifest, refresh_component

    target = preset_dir / "preference_head"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(head_dir, target)
    if "preference_head" in read_manifest(preset_dir)["components"]:
        refresh_component(preset_dir, "preference_head", training_command=command, data_seed=data_seed)
    else:
        from pigment.models.loader import write_manifest

        manifest = read_manifest(preset_dir)
        comps = {n: {k: v for k, v in e.items() if k != "files"} for n, e in manifest["components"].items()}
        comps["preference_head"] = {"path": "preference_head", "kind": "preference_head", "training_command": command,
                                    "data_seed": data_seed}
        write_manifest(preset_dir, comps, **{k: v for k, v in manifest.items() if k != "components"})


def run(args) -> int:
    cfg = PMGTrainConfig.load(args.config, preset=args.preset, out=args.out, steps=args.steps)
    trainer = PMGTrainer(cfg)
    trainer.prepare(load_records(cfg))
    metrics = trainer.train()
    print(f"pmg: {metrics['steps']} steps in {metrics['seconds']}s, loss {metrics['loss_first']:.4f} -> "
          f"{metrics['loss_last']:.4f}; head in {Path(cfg.out) / 'preference_head'}")
    if args.install:
        install(Path(cfg.out) / "preference_head", Path(cfg.preset),
                f"pigment train pmg --config {args.config or '-'} --steps {cfg.steps}", cfg.world_seed)
        print(f"installed into {cfg.preset}")
    return 0


def register(train_sub) -> None:
    p = train_sub.add_parser("pmg", help="train PMG soft tokens (prefix, image tokens, projection)")
    p.add_argument("--config", default=None, help="YAML with PMGTrainConfig fields")
    p.add_argument("--preset", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--install", action="store_true", help="make the result the preset's preference_head")
    p.set_defaults(func=lambda args, settings: run(args))
