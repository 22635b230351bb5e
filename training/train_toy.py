"""Train the `toy` preset (the embedded default) on CPU and write it with its manifest.

    python -m pigment.training.train_toy --out models/presets/toy
    python -m pigment.training.train_toy --out models/presets/toy --only llm --steps llm=800

Stages (in order): probe, vae, vae_decoder (decoder-only fine-tune), unet (+ text_encoder,
tokenizer, scheduler; constant learning rate), unet_anneal (continues them with the rate
annealed: probe shape accuracy 0.56 -> 0.95), unet_focus (continues them on items that
oversample the values the annealed renderer draws worst: small, grey, stars), clip, llm,
reference_encoder (the reference path's image backbone, models/subject_encoder.py). Each writes its components as
safetensors + config json and merges its numbers into ``training_metrics.json``; the
manifest (sha256 of every file, training command, data seed, sampler defaults) is
rewritten at the end from whatever components the directory holds, keeping entries that
other commands added (the PMG head).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shlex
import sys
from functools import partial
from pathlib import Path

import torch
from pigment.models.loader import read_manifest, write_manifest
from pigment.training.toy_world import keywords_table

STAGES = ("probe", "vae", "vae_decoder", "unet", "unet_anneal", "unet_focus", "clip", "llm", "reference_encoder")
DEFAULT_STEPS = {"probe": 1200, "vae": 900, "vae_decoder": 1200, "unet": 3000, "unet_anneal": 3000,
                 "unet_focus": 1500, "clip": 600, "llm": 2000, "reference_encoder": 600}
# Stages that continue another stage's component, in order (their commands follow its in the manifest).
FOLLOW_UPS = {"vae": ("vae_decoder",), "unet": ("unet_anneal", "unet_focus"), "unet_anneal": ("unet_focus",)}
# Conditioning weights chosen on the `val` split (bench/RESULTS.md): beside the keywords, pmg joint
# 0.824 at soft weight 0.25, 0.817 at 0.5, 0.722 at 1.0; alone, pmg_soft is best at its trained scale
# (0.305 at 1.0, 0.285 at 1.5, 0.230 at 2.0). The serving default of 1.0 is for untuned checkpoints.
CONDITIONING_WEIGHTS = {"keyword_weight": 1.0, "soft_weight": 0.25, "soft_weight_alone": 1.0}
# component -> (stage that trains it, kind)
COMPONENTS = {
    "probe": ("probe", "probe"), "vae": ("vae", "vae"), "unet": ("unet", "unet"),
    "text_encoder": ("unet", "text_encoder"), "tokenizer": ("unet", "tokenizer"),
    "scheduler": ("unet", "scheduler"), "clip": ("clip", "clip"),
    "clip_tokenizer": ("clip", "clip_tokenizer"), "llm": ("llm", "llm"),
    "llm_tokenizer": ("llm", "llm_tokenizer"), "reference_encoder": ("reference_encoder", "reference_encoder"),
}
METRICS = "training_metrics.json"


def merge_metrics(out: Path, stage: str, metrics: dict | None) -> None:
    """Replace (``None``: drop) one stage's entry; a lock file lets stages run as parallel processes."""
    path = out / METRICS
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        text = fh.read()
        allm = json.loads(text) if text.strip() else {}
        if metrics is None:
            allm.pop(stage, None)
        else:
            allm[stage] = metrics
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(allm, indent=2, sort_keys=True) + "\n")


def save_renderer(pipe, out: Path) -> None:
    pipe.unet.save_pretrained(out / "unet")
    pipe.text_encoder.save_pretrained(out / "text_encoder")
    pipe.tokenizer.save_pretrained(out / "tokenizer")
    pipe.scheduler.save_pretrained(out / "scheduler")


def run_probe(out: Path, steps: int, seed: int, progress: bool) -> dict:
    from pigment.training.train_probe import train_probe
    return train_probe(out, steps=steps, seed=seed, progress=progress)


def run_vae(out: Path, steps: int, seed: int, progress: bool) -> dict:
    from pigment.training.train_renderer import train_vae, vae_probe_accuracy
    vae, metrics = train_vae(steps, seed=seed, progress=progress)
    vae.save_pretrained(out / "vae")
    if (out / "probe").is_dir():
        metrics["probe_on_reconstructions"] = vae_probe_accuracy(vae, _probe(out))
    return metrics


def run_vae_decoder(out: Path, steps: int, seed: int, progress: bool) -> dict:
    """Decoder-only fine-tune of ``out/vae`` (encoder frozen, so UNet latents are unchanged)."""
    from diffusers import AutoencoderKL
    from pigment.training.train_renderer import finetune_decoder, vae_probe_accuracy
    vae = AutoencoderKL.from_pretrained(out / "vae", local_files_only=True)
    metrics = finetune_decoder(vae, steps, seed=seed, progress=progress)
    vae.save_pretrained(out / "vae")
    if (out / "probe").is_dir():
        metrics["probe_on_reconstructions"] = vae_probe_accuracy(vae, _probe(out))
    return metrics


def _probe(out: Path):
    from pigment.models.probe import AttributeProbe
    return AttributeProbe.from_pretrained(out / "probe")


def run_unet(out: Path, steps: int, seed: int, progress: bool, eval_every: int = 300,
             stage: str = "unet") -> dict:
    """Train text encoder + UNet from scratch, or continue those in ``out``: ``unet_anneal`` (the
    rate annealed) and ``unet_focus`` (annealed from a lower rate on items oversampling ``FOCUS``)."""
    from diffusers import AutoencoderKL
    from pigment.training.train_renderer import FOCUS, build_pipeline, evaluate_renderer, train_unet
    vae = AutoencoderKL.from_pretrained(out / "vae", local_files_only=True).eval()
    probe = _probe(out) if (out / "probe").is_dir() else None
    best = {"joint": -1.0, "step": 0}
    init, focus, lr, start = None, None, {}, None
    if stage in ("unet_anneal", "unet_focus"):
        from pigment.models.loader import load_component
        init = build_pipeline(vae, *(load_component(out, n) for n in ("text_encoder", "tokenizer", "unet", "scheduler")))
        if stage == "unet_focus":
            focus, lr = FOCUS, {"lr": 5e-4}
        if probe is not None:  # kept only if it improves on what it continues (scored as the run scores)
            start = best["joint"] = evaluate_renderer(init, probe, n=64, focus=focus)["joint"]

    def checkpoint(pipe, step, acc):
        if acc["joint"] >= best["joint"]:
            best.update(joint=acc["joint"], step=step)
            save_renderer(pipe, out)
        partial = json.loads((out / METRICS).read_text()).get(stage, {})
        history = partial.get("eval_history", []) + [{"step": step, **acc}]
        merge_metrics(out, stage, {**partial, "eval_history": history, "kept_step": best["step"]})

    pipe, metrics = train_unet(vae, steps, seed=seed, probe=probe, eval_every=eval_every if probe else 0,
                               on_eval=checkpoint, progress=progress, log=lambda m: print(m, flush=True),
                               init=init, focus=focus, **lr)
    if probe is None:
        save_renderer(pipe, out)
    metrics["kept_step"] = best["step"] if probe is not None else steps
    if start is not None:
        metrics["start_joint"] = start
    return metrics


def run_clip(out: Path, steps: int, seed: int, progress: bool) -> dict:
    from pigment.training.train_clip import train_clip
    return train_clip(out, steps=steps, seed=seed, progress=progress)


def run_llm(out: Path, steps: int, seed: int, progress: bool) -> dict:
    from pigment.training.train_keyword_llm import train_keyword_llm
    return train_keyword_llm(out, steps=steps, seed=seed, progress=progress)


def run_reference_encoder(out: Path, steps: int, seed: int, progress: bool) -> dict:
    from pigment.training.train_subject_encoder import train_subject_encoder
    return train_subject_encoder(out, steps=steps, seed=seed, progress=progress)


RUNNERS = {"probe": run_probe, "vae": run_vae, "vae_decoder": run_vae_decoder, "unet": run_unet,
           "unet_anneal": partial(run_unet, stage="unet_anneal"), "unet_focus": partial(run_unet, stage="unet_focus"),
           "clip": run_clip, "llm": run_llm, "reference_encoder": run_reference_encoder}


def write_preset_manifest(out: Path, seed: int) -> dict:
    """Rewrite ``manifest.json`` from the component dirs present; commands come from the metrics."""
    from pigment.training.train_keyword_llm import PREFERENCE
    from pigment.training.train_renderer import DEFAULTS
    (out / "keywords.json").write_text(json.dumps(keywords_table(), indent=2) + "\n")
    # The LLM's prompt format is this trainer's; conditioning weights already set (after PMG evals) are
    # kept, and a new preset starts from the ones chosen for the shipped zoo.
    pref_path = out / "preference.json"
    kept = json.loads(pref_path.read_text()) if pref_path.is_file() else {}
    pref_path.write_text(json.dumps({**CONDITIONING_WEIGHTS, **kept, **PREFERENCE}, indent=2) + "\n")
    metrics = json.loads((out / METRICS).read_text()) if (out / METRICS).is_file() else {}
    # Components trained elsewhere (the PMG head: `pigment train pmg --install`) keep their entries.
    previous = read_manifest(out)["components"] if (out / "manifest.json").is_file() else {}
    comps = {name: {k: v for k, v in entry.items() if k != "files"} for name, entry in previous.items()
             if name not in COMPONENTS and (out / entry["path"]).is_dir()}
    for name, (stage, kind) in COMPONENTS.items():
        if not (out / name).is_dir():
            continue
        commands = [metrics.get(stage, {}).get("command", "")]
        # e.g. the decoder fine-tune rewrites vae/
        commands += [metrics[f].get("command", "") for f in FOLLOW_UPS.get(stage, ()) if f in metrics]
        comps[name] = {"path": name, "kind": kind, "data_seed": seed,
                       "training_command": " && ".join(c for c in commands if c)}
    # Top-level entries other commands added (sampler dtype, the edit table, retrain settings) are kept too.
    meta = read_manifest(out) if (out / "manifest.json").is_file() else {}
    meta = {k: v for k, v in meta.items() if k != "components"}
    return write_manifest(out, comps, **{**meta, "preset": "toy", "version": "toy-1",
                                         "defaults": {**meta.get("defaults", {}), **DEFAULTS},
                                         "files": {**meta.get("files", {}), "keywords": "keywords.json",
                                                   "preference": "preference.json", "metrics": METRICS}})


def parse_steps(spec: str | None) -> dict[str, int]:
    steps = dict(DEFAULT_STEPS)
    for part in filter(None, (spec or "").split(",")):
        stage, _, n = part.partition("=")
        if stage not in STAGES or not n.isdigit():
            raise SystemExit(f"--steps wants stage=N,... with stage in {STAGES}; got {part!r}")
        steps[stage] = int(n)
    return steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/presets/toy")
    ap.add_argument("--only", default=",".join(STAGES), help=f"comma list of {STAGES}")
    ap.add_argument("--steps", default=None, help="per-stage steps, e.g. unet=2000,llm=400")
    ap.add_argument("--seed", type=int, default=0, help="data seed (the toy world / item sampler)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--eval", type=int, default=0, metavar="N",
                    help="after writing the manifest, score N probe-checked renders per setting")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = [s for s in args.only.split(",") if s]
    if bad := [s for s in only if s not in STAGES]:
        raise SystemExit(f"unknown stage(s) {bad}; allowed: {STAGES}")
    steps = parse_steps(args.steps)
    for stage in STAGES:
        if stage not in only:
            continue
        command = (f"python -m pigment.training.train_toy --out {shlex.quote(str(args.out))} "
                   f"--only {stage} --steps {stage}={steps[stage]} --seed {args.seed}")
        merge_metrics(out, stage, {"command": command, "status": "running"})
        for follow_up in FOLLOW_UPS.get(stage, ()):  # a retrained component voids what continued the old one
            merge_metrics(out, follow_up, None)
        metrics = RUNNERS[stage](out, steps[stage], args.seed, not args.no_progress)
        merge_metrics(out, stage, {**metrics, "command": command, "status": "done"})
        # after every stage, so the next one (e.g. unet_anneal) loads this one's output through the loader
        write_preset_manifest(out, args.seed)
        print(f"[{stage}] {json.dumps(metrics)[:600]}", flush=True)
    if args.eval:
        from pigment.training.train_renderer import evaluate_preset
        metrics = evaluate_preset(out, n=args.eval)
        merge_metrics(out, "renderer_eval", metrics)
        print(f"[renderer_eval] {json.dumps(metrics)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
