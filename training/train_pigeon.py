"""`pigment train pigeon --stage sft|dpo --config FILE`: Pigeon's recipe on the keyword LLM.

The preference model is the preset's LLM that writes keywords (prompt = the PMG
template over the history captions, answer = numbered keywords). As in Pigeon,
a mask generator scores every history token and keeps the top ``keep_ratio``
[0.8] (the rest become zero vectors); the masked embeddings go into the LLM as
``inputs_embeds``, with a LoRA (peft, q/v, r 8, alpha 16, dropout 0.05). Unlike
upstream, the mask generator learns: the embeddings are multiplied by a
straight-through relaxed mask (see ``MaskGenerator`` in models/preference.py).

- Stage 1, ``sft``: cross-entropy on the target item's keyword tokens only
  (target = the item the user chose next; toy world train split, or PMG JSON).
- Stage 2, ``dpo``: pairs (prompt, chosen keywords, rejected keywords) from a
  JSONL of logged feedback (``pairs_file``: {history_captions, content,
  chosen_keywords, rejected_keywords}) and/or automatic pairs: the SFT model
  writes candidates at several mask ratios (greedy) and by sampling; a scorer
  that is not the evaluation metric (CLIP text cosine of the keywords to the
  mean CLIP text embedding of the history captions) picks best = chosen,
  worst = rejected. Loss ``-log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) -
  (log pi(y_l) - log ref(y_l))))`` with log-likelihoods summed over keyword tokens.

Reference model: by default a frozen copy of the SFT adapter (LoRA + mask
generator), as Pigeon does: the policy starts from SFT, so the KL anchor must be
SFT too (the base LLM with the adapter disabled would anchor DPO to a model that
did not write the candidates, and the loss would not start at log 2). The
reference is frozen, so its log-likelihoods of every pair are computed once,
before the first update (TRL's ``precompute_ref_log_probs``), and stored in the
checkpoint: no second model in memory, exact on resume. ``reference: base``
computes them with peft's ``disable_adapter()`` instead.

Outputs (``out/adapter``): adapter_model.safetensors + adapter_config.json
(peft), mask_generator.safetensors, pigeon.json; ``out/metrics.json``; DPO also
writes the pairs it used to ``out/pairs.jsonl``. Serving loads the adapter with
``PreferenceEncoder(preset, adapter_dir=out/adapter)``.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from pigment.models.loader import load_component
from pigment.models.preference import (
    PIGEON_META,
    MaskGenerator,
    masked_embeds,
    pad_batch,
    parse_keywords,
    pigeon_generate,
    pigeon_tokens,
    save_pigeon_adapter,
)
from pigment.training.checkpoints import load_checkpoint, part, save_checkpoint
from pigment.training.config import load_config
from tqdm import tqdm

STAGES = ("sft", "dpo")


@dataclass
class PigeonTrainConfig:
    preset: str = "models/presets/toy"
    out: str = "runs/pigeon"
    stage: str = "sft"                 # sft | dpo
    data_format: str = "toy"           # toy | pmg_json (targets' keywords parsed from toy captions)
    data_path: str = ""
    world_seed: int = 0
    split: str = "train"
    max_samples: int = 4000
    keep_ratio: float = 0.8            # fraction of history tokens kept (Pigeon: 0.8)
    mask_temperature: float = 0.05     # relaxed-mask sharpness (cosine scores live in [-1, 1])
    train_mask: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    init_adapter: str = ""             # an adapter dir to start from (DPO: the SFT output's `adapter`)
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3                   # Pigeon: 1e-5 (SFT) / 5e-6 (DPO) on Llama-7B; a tiny LLM needs more
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mixed_precision: str = "no"        # no | bf16 | fp16 (Accelerate)
    checkpoint_every: int = 50
    seed: int = 0
    n_val: int = 64                    # SFT: validation samples scored at the end
    # -- DPO
    beta: float = 0.1
    reference: str = "sft"             # sft: frozen copy of init_adapter | base: adapter disabled
    pairs_file: str = ""               # JSONL of logged pairs (training/pairs.py)
    auto_pairs: int = 64               # samples turned into automatic pairs (0: none)
    candidate_keep_ratios: list = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    candidate_samples: int = 2         # sampled candidates per sample (at keep_ratio), besides greedy
    candidate_temperature: float = 1.0

    @classmethod
    def load(cls, path: str | Path | None, **overrides) -> PigeonTrainConfig:
        cfg = load_config(cls, path, **overrides)
        if cfg.stage not in STAGES:
            raise SystemExit(f"stage must be one of {STAGES}, got {cfg.stage!r}")
        if cfg.reference not in ("sft", "base"):
            raise SystemExit(f"reference must be sft or base, got {cfg.reference!r}")
        return cfg


@dataclass
class Sample:
    history: list[str]      # captions, oldest first
    content: str            # what the request names ("a star")
    keywords: list[str]     # the chosen item's keywords (SFT target)


@dataclass
class Pair:
    history: list[str]
    content: str
    chosen: list[str]
    rejected: list[str]
    source: str = "logged"

    def to_json(self) -> dict:
        return {"history_captions": self.history, "content": self.content, "chosen_keywords": self.chosen,
                "rejected_keywords": self.rejected, "source": self.source}


def format_answer(keywords: list[str]) -> str:
    """The LLM's answer format: "1. red 2. dark background 3. large"."""
    return " ".join(f"{i + 1}. {k}" for i, k in enumerate(keywords))


def load_samples(cfg: PigeonTrainConfig, split: str | None = None, limit: int | None = None) -> list[Sample]:
    from pigment.training import toy_world as tw

    def content_of(caption: str) -> str:
        return tw.caption(tw.parse_caption(caption), keep={"shape"})

    if cfg.data_format == "toy":
        world = tw.ToyWorld(seed=cfg.world_seed)
        items = world.item_by_id
        samples = [Sample([items[i].caption for i in s.history], content_of(items[s.target].caption),
                          items[s.target].keywords) for s in world.samples(split or cfg.split)]
    elif cfg.data_format == "pmg_json":
        samples = []
        for r in json.loads(Path(cfg.data_path).read_text()):
            target = r["target_item_info"]["caption"]
            attrs = tw.parse_caption(target)
            if attrs:
                samples.append(Sample([h["caption"] for h in r["history_items_info"]], content_of(target),
                                      tw.item_keywords(attrs)))
    else:
        raise SystemExit(f"data_format must be toy or pmg_json, got {cfg.data_format!r}")
    limit = limit or cfg.max_samples
    if len(samples) > limit:
        pick = np.random.default_rng(cfg.seed).choice(len(samples), limit, replace=False)
        samples = [samples[i] for i in sorted(pick)]
    return samples


def read_pairs(path: str | Path) -> list[Pair]:
    """Logged pairs, JSONL: {history_captions, content, chosen_keywords, rejected_keywords} per line."""
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        r = json.loads(line)
        kws = [r["chosen_keywords"], r["rejected_keywords"]]
        kws = [parse_keywords(k) if isinstance(k, str) else list(k) for k in kws]
        if not kws[0] or not kws[1] or kws[0] == kws[1]:
            raise SystemExit(f"{path}:{n + 1}: chosen and rejected keywords must be non-empty and differ")
        pairs.append(Pair(list(r["history_captions"]), r.get("content", ""), kws[0], kws[1],
                          r.get("source", "logged")))
    return pairs


class PigeonTrainer:
    def __init__(self, cfg: PigeonTrainConfig):
        from accelerate import Accelerator
        from pigment.models.loader import preset_version
        from pigment.models.preference import PreferenceEncoder

        self.cfg = cfg
        self.accel = Accelerator(mixed_precision=cfg.mixed_precision)
        torch.manual_seed(cfg.seed)
        self.encoder = PreferenceEncoder(cfg.preset)  # LLM, tokenizer, prompt template, keyword vocabulary
        self.tok = self.encoder.tokenizer
        self.template = self.encoder.cfg["keyword_template"]
        self.base_version = preset_version(cfg.preset)
        llm = self.encoder.llm
        if isinstance(llm, PeftModel):  # it carries the PMG head's LoRA, which Pigeon never sees
            llm = load_component(cfg.preset, "llm")
        self.model, self.mask = self._build(llm.requires_grad_(False))
        self.mask.requires_grad_(cfg.train_mask)
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += [p for p in self.mask.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.model, self.mask, self.optimizer = self.accel.prepare(self.model, self.mask, self.optimizer)
        self.out = Path(cfg.out)
        self.step = 0
        self.history: list[dict] = []
        self.ref: dict[str, torch.Tensor] = {}

    def _build(self, llm):
        from peft import LoraConfig, PeftModel, get_peft_model

        cfg = self.cfg
        if cfg.init_adapter:
            meta = json.loads((Path(cfg.init_adapter) / PIGEON_META).read_text())
            model = PeftModel.from_pretrained(llm, cfg.init_adapter, is_trainable=True)
            return model, MaskGenerator.from_pretrained(cfg.init_adapter, meta["mask"]).train()
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        mask = MaskGenerator(llm.config.hidden_size, int(getattr(llm.config, "max_position_embeddings", 2048)),
                             cfg.mask_temperature)
        return get_peft_model(llm, lora), mask

    # -- likelihoods ------------------------------------------------------------------
    def prompt(self, history: list[str]) -> str:
        return self.encoder.build_prompt(history)[0]  # sanitised and truncated exactly as serving does

    def logps(self, prompts: list[str], answers: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-likelihood of each answer's tokens (keywords + EOS) and the token counts."""
        rows = [pigeon_tokens(self.tok, p, self.template, format_answer(a)) for p, a in zip(prompts, answers)]
        batch = pad_batch(rows, self.tok.pad_token_id, "right")
        batch = {k: v.to(self.accel.device) for k, v in batch.items()}
        embeds = masked_embeds(self.model, self.mask, batch, self.cfg.keep_ratio)
        logits = self.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        valid = labels != -100
        lp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (lp * valid).sum(-1), valid.sum(-1)

    # -- data ---------------------------------------------------------------------------
    def prepare_sft(self, samples: list[Sample]) -> None:
        self.samples = samples
        self.prompts = [self.prompt(s.history) for s in samples]

    def prepare_dpo(self, pairs: list[Pair]) -> None:
        if not pairs:
            raise SystemExit("no preference pairs: give pairs_file and/or auto_pairs > 0")
        self.pairs = pairs
        self.prompts = [self.prompt(p.history) for p in pairs]
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "pairs.jsonl"
        if not path.is_file():
            path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in pairs))

    @torch.no_grad()
    def auto_pairs(self, samples: list[Sample]) -> list[Pair]:
        """Candidates from the current (SFT) model at every mask ratio and by sampling; CLIP picks best/worst."""
        from pigment.models.clip_embedder import ClipEmbedder

        cfg, model = self.cfg, self.accel.unwrap_model(self.model).eval()
        prompts = [self.prompt(s.history) for s in samples]
        max_new = int(self.encoder.cfg["max_new_tokens"])
        runs = [(r, False) for r in cfg.candidate_keep_ratios] + [(cfg.keep_ratio, True)] * cfg.candidate_samples
        cands: list[list[list[str]]] = [[] for _ in samples]
        for n, (ratio, sample) in enumerate(tqdm(runs, desc="pigeon candidates", leave=False)):
            torch.manual_seed(cfg.seed * 7919 + n)
            texts = pigeon_generate(model, self.mask, self.tok, prompts, self.template, max_new, ratio,
                                    do_sample=sample, temperature=cfg.candidate_temperature)
            for c, text in zip(cands, texts):
                kws = list(dict.fromkeys(parse_keywords(text)))[: int(self.encoder.cfg["max_keywords"])]
                if kws and kws not in c:
                    c.append(kws)
        clip = ClipEmbedder(cfg.preset)
        pairs = []
        for s, c in zip(samples, cands):
            if len(c) < 2:
                continue
            hist = clip.embed_texts(s.history).mean(0)
            score = clip.embed_texts([", ".join(k) for k in c]) @ (hist / np.linalg.norm(hist))
            best, worst = int(np.argmax(score)), int(np.argmin(score))
            if score[best] > score[worst]:
                pairs.append(Pair(s.history, s.content, c[best], c[worst], "auto"))
        return pairs

    @torch.no_grad()
    def reference_logps(self) -> None:
        """Log-likelihoods of every pair under the frozen reference, before any update."""
        if self.ref:
            return
        model = self.accel.unwrap_model(self.model).eval()
        chosen, rejected = [], []
        ctx = model.disable_adapter() if self.cfg.reference == "base" else nullcontext()
        with ctx:
            for i in range(0, len(self.pairs), 32):
                chunk = range(i, min(i + 32, len(self.pairs)))
                chosen.append(self.logps([self.prompts[j] for j in chunk], [self.pairs[j].chosen for j in chunk])[0])
                rejected.append(self.logps([self.prompts[j] for j in chunk], [self.pairs[j].rejected for j in chunk])[0])
        self.ref = {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}

    # -- losses ---------------------------------------------------------------------------
    def sft_loss(self, idx: np.ndarray) -> tuple[torch.Tensor, dict]:
        lp, n = self.logps([self.prompts[i] for i in idx], [self.samples[i].keywords for i in idx])
        loss = -lp.sum() / n.sum()
        return loss, {}

    def dpo_loss(self, idx: np.ndarray) -> tuple[torch.Tensor, dict]:
        prompts = [self.prompts[i] for i in idx]
        answers = [self.pairs[i].chosen for i in idx] + [self.pairs[i].rejected for i in idx]
        lp, _ = self.logps(prompts + prompts, answers)
        pol_w, pol_l = lp[: len(idx)], lp[len(idx):]
        t = torch.as_tensor(idx)
        reward_w = self.cfg.beta * (pol_w - self.ref["chosen"][t])
        reward_l = self.cfg.beta * (pol_l - self.ref["rejected"][t])
        loss = -torch.nn.functional.logsigmoid(reward_w - reward_l).mean()
        margin = (reward_w - reward_l).detach()
        return loss, {"reward_accuracy": round(float((margin > 0).float().mean()), 4),
                      "reward_margin": round(float(margin.mean()), 5),
                      "reward_chosen": round(float(reward_w.detach().mean()), 5),
                      "reward_rejected": round(float(reward_l.detach().mean()), 5)}

    # -- loop ---------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        self.resume()
        if cfg.stage == "dpo":
            self.reference_logps()
        n_data = len(self.samples) if cfg.stage == "sft" else len(self.pairs)
        loss_fn = self.sft_loss if cfg.stage == "sft" else self.dpo_loss
        t0 = time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train pigeon {cfg.stage}", unit="step")
        while self.step < cfg.steps:
            rng = np.random.default_rng([cfg.seed, self.step])  # deterministic per step: resumable exactly
            torch.manual_seed(cfg.seed * 1_000_003 + self.step)  # LoRA dropout
            idx = rng.choice(n_data, min(cfg.batch_size, n_data), replace=False)
            # DPO runs without dropout (as TRL): policy == reference at step 0, so the loss starts at log 2
            self.model.train(cfg.stage == "sft")
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * min(1.0, (self.step + 1) / max(1, cfg.warmup_steps))
            loss, extra = loss_fn(idx)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss diverged at step {self.step}: {loss.item()}")
            self.accel.backward(loss)
            self.accel.clip_grad_norm_(self.params, cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.step += 1
            self.history.append({"step": self.step, "loss": round(loss.item(), 6), **extra})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", **{k: v for k, v in extra.items() if k == "reward_accuracy"})
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.checkpoint()
        bar.close()
        return self.finish(time.perf_counter() - t0)

    # -- checkpoints (safetensors only) ----------------------------------------------------------
    def checkpoint(self) -> None:
        from peft import get_peft_model_state_dict

        model, mask = self.accel.unwrap_model(self.model), self.accel.unwrap_model(self.mask)
        tensors = {f"lora.{k}": v for k, v in get_peft_model_state_dict(model).items()}
        tensors.update({f"mask.{k}": v for k, v in mask.state_dict().items()})
        tensors.update({f"ref.{k}": v for k, v in self.ref.items()})
        save_checkpoint(self.out / "checkpoint", tensors, self.optimizer,
                        {"step": self.step, "stage": self.cfg.stage, "history": self.history})

    def resume(self) -> None:
        from peft import set_peft_model_state_dict

        ckpt = self.out / "checkpoint"
        if (ckpt / "trainer.json").is_file():
            stage = json.loads((ckpt / "trainer.json").read_text()).get("stage")
            if stage != self.cfg.stage:
                raise SystemExit(f"{ckpt} holds a {stage} run; use another `out` for stage {self.cfg.stage}")
        loaded = load_checkpoint(ckpt, self.optimizer)
        if loaded is None:
            return
        tensors, meta = loaded
        set_peft_model_state_dict(self.accel.unwrap_model(self.model), part(tensors, "lora."))
        self.accel.unwrap_model(self.mask).load_state_dict(part(tensors, "mask."))
        self.ref = part(tensors, "ref.")
        self.step, self.history = meta["step"], meta["history"]
        print(f"resumed from {ckpt} at step {self.step}")

    # -- outputs --------------------------------------------------------------------------------------
    def finish(self, seconds: float) -> dict:
        cfg = self.cfg
        model, mask = self.accel.unwrap_model(self.model), self.accel.unwrap_model(self.mask)
        save_pigeon_adapter(self.out / "adapter", model, mask, cfg.keep_ratio, stage=cfg.stage,
                            base_model_version=self.base_version, steps=self.step,
                            reference=(cfg.reference if cfg.stage == "dpo" else None))
        losses = [h["loss"] for h in self.history]
        window = max(1, len(losses) // 10)
        metrics = {"method": f"pigeon_{cfg.stage}", "steps": self.step, "seconds": round(seconds, 1),
                   "loss_first": float(np.mean(losses[:window])), "loss_last": float(np.mean(losses[-window:])),
                   "adapter": str(self.out / "adapter"), "config": asdict(cfg), "history": self.history}
        if cfg.stage == "dpo":
            metrics.update(self._dpo_summary(window))
        else:
            metrics.update(self.validate())
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return metrics

    def _dpo_summary(self, window: int) -> dict:
        acc = [h["reward_accuracy"] for h in self.history]
        margin = [h["reward_margin"] for h in self.history]
        sources: dict[str, int] = {}
        for p in self.pairs:
            sources[p.source] = sources.get(p.source, 0) + 1
        return {"pairs": len(self.pairs), "pair_sources": sources,
                "reference": ("frozen copy of the initial adapter (log-likelihoods precomputed)"
                              if self.cfg.reference == "sft" else "base LLM (peft disable_adapter)"),
                "reward_accuracy_first": float(np.mean(acc[:window])), "reward_accuracy_last": float(np.mean(acc[-window:])),
                "reward_margin_first": float(np.mean(margin[:window])), "reward_margin_last": float(np.mean(margin[-window:]))}

    @torch.no_grad()
    def validate(self) -> dict:
        """SFT: loss and keyword recall (target keywords found in the greedy answer) on the val split."""
        cfg = self.cfg
        if cfg.n_val <= 0:
            return {}
        val = load_samples(cfg, "val", cfg.n_val) if cfg.data_format == "toy" else self.samples[: cfg.n_val]
        model = self.accel.unwrap_model(self.model).eval()
        prompts = [self.prompt(s.history) for s in val]
        lp, n = self.logps(prompts, [s.keywords for s in val])
        texts = pigeon_generate(model, self.mask, self.tok, prompts, self.template,
                                int(self.encoder.cfg["max_new_tokens"]), cfg.keep_ratio)
        recall = [len(set(parse_keywords(t)) & set(s.keywords)) / len(s.keywords) for t, s in zip(texts, val)]
        return {"val_samples": len(val), "val_loss": float(-lp.sum() / n.sum()), "val_keyword_recall": float(np.mean(recall))}


def build_trainer(cfg: PigeonTrainConfig) -> PigeonTrainer:
    """A trainer with its data prepared (DPO: logged + automatic pairs, reused from ``out`` on resume)."""
    if cfg.stage == "dpo" and cfg.reference == "sft" and not cfg.init_adapter:
        print("dpo without init_adapter: the policy starts as a fresh LoRA, identical to the base LLM")
    trainer = PigeonTrainer(cfg)
    if cfg.stage == "sft":
        trainer.prepare_sft(load_samples(cfg))
        return trainer
    saved = Path(cfg.out) / "pairs.jsonl"
    if saved.is_file():
        pairs = read_pairs(saved)
    else:
        pairs = read_pairs(cfg.pairs_file) if cfg.pairs_file else []
        if cfg.auto_pairs > 0:
            pairs += trainer.auto_pairs(load_samples(cfg, limit=cfg.auto_pairs))
    trainer.prepare_dpo(pairs)
    return trainer


def run(args) -> int:
    cfg = PigeonTrainConfig.load(args.config, stage=args.stage, preset=args.preset, out=args.out, steps=args.steps,
                                 init_adapter=args.init_adapter, pairs_file=args.pairs)
    metrics = build_trainer(cfg).train()
    line = f"pigeon {cfg.stage}: {metrics['steps']} steps in {metrics['seconds']}s, loss {metrics['loss_first']:.4f}"
    line += f" -> {metrics['loss_last']:.4f}"
    if cfg.stage == "dpo":
        line += f", reward accuracy {metrics['reward_accuracy_first']:.2f} -> {metrics['reward_accuracy_last']:.2f}"
    print(f"{line}; adapter in {metrics['adapter']}")
    return 0


def register(train_sub) -> None:
    p = train_sub.add_parser("pigeon", help="Pigeon: masked history tokens + LoRA on the keyword LLM (SFT, then DPO)")
    p.add_argument("--stage", choices=STAGES, default=None, help="sft (stage 1) or dpo (stage 2)")
    p.add_argument("--config", default=None, help="YAML with PigeonTrainConfig fields")
    p.add_argument("--preset", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--init-adapter", default=None, help="adapter dir to start from (DPO: the SFT run's out/adapter)")
    p.add_argument("--pairs", default=None, help="JSONL of logged pairs (history_captions, content, chosen/rejected)")
    p.set_defaults(func=lambda args, settings: run(args))
