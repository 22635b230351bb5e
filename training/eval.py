"""`pigment eval`: score methods on a toy-world split, with baselines in the same run.

The task is PMG's: the request names the content (the held-out target's shape,
"a star") and leaves colour, background and size to the user's taste. Ground
truth comes from the world (the user's latent favourites, used only here) and
the attribute probe reads what was rendered:

- content_fidelity: the probe reads the requested shape;
- preference_accuracy: per open attribute, the probe reads the user's favourite
  value (at the target's time, for drifting users); ``joint`` = all of them;
- target_agreement: fraction of the four attributes matching the held-out target;
- ssim_target / lpips_target (and *_history): image similarity to the target and
  averaged over the history; cpis: CLIP image cosine to the history images;
  cps: CLIP image-text cosine to the target caption (the toy CLIP).

LPIPS needs a pretrained backbone; without ``--lpips-backbone`` it uses the
toy CLIP's vision tower with uniform layer weights, and says so in the output.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pigment.models.loader import (
    default_soft_weight,
    has_component,
    load_component,
    preset_defaults,
)
from pigment.training import toy_world as tw
from pigment.training.eval_reference import SUBJECT_METHODS
from tqdm import tqdm

OPEN_ATTRIBUTES = ("colour", "background", "size")
CONTENT_ATTRIBUTE = "shape"
BASELINES = ("non_personalized", "history_caption", "history_mode", "nearest_item", "oracle")
PMG_METHODS = ("pmg", "pmg_keywords", "pmg_soft")
# Rows scored only when their trained adapter directory is given (`--pigeon-sft DIR` ...);
# without it they are listed under "skipped", never replaced by another method.
ADAPTER_METHODS = ("pigeon_sft", "pigeon_dpo", "diffusion_dpo")
LLMGA_METHODS = ("llmga",)  # the prompt assistant: one written prompt (content + taste) per case
# Instruction editing is scored apart (its own metrics): `--methods edit`.
EDIT_METHOD = "edit"
EDIT_INSTRUCTIONS = {  # instruction kind -> templates ({value} = the new vocabulary value's words)
    "background": ("make the background {word}", "{word} background please"),
    "colour": ("make it {value}", "recolour it {value}"),
    "size": ("{comparative}", "make it {comparative}"),
    "shape": ("turn it into a {value}", "make it a {value}"),
}
# Subject-driven rows (eval_reference.py: held-out subjects x prompts x seeds) run only when named in --methods.


@dataclass
class Case:
    """One evaluation sample: a user's five history items, the held-out target, the truth."""

    user_id: str
    history: list[tw.Item]
    target: tw.Item
    favourites: dict[str, str]  # latent taste at the target's time (scoring only)

    @property
    def content(self) -> str:
        return tw.caption(self.target.attributes, keep={CONTENT_ATTRIBUTE})


def build_cases(world: tw.ToyWorld, split: str, limit: int | None, seed: int = 0) -> list[Case]:
    users = {u.user_id: u for u in world.users}
    samples = world.samples(split)
    if limit and len(samples) > limit:
        pick = np.random.default_rng(seed).choice(len(samples), limit, replace=False)
        samples = [samples[i] for i in sorted(pick)]
    cases = []
    for s in samples:
        user = users[s.user_id]
        taste = user.taste_at(s.start + tw.WINDOW - 1)
        cases.append(Case(s.user_id, [world.item_by_id[i] for i in s.history], world.item_by_id[s.target],
                          {a: fav for a, (fav, _) in taste.items()}))
    return cases


# ----------------------------------------------------------------------------- methods
# Each method maps a case to the conditioning it renders with: (segments, soft tokens)
# or, for retrieval, directly to an image.

def _segments(content: str, keywords: list[str]) -> list[str]:
    return [content, ", ".join(keywords)] if keywords else [content]


class Methods:
    def __init__(self, world: tw.ToyWorld, encoder=None, clip=None):
        self.world, self.encoder, self.clip = world, encoder, clip

    def non_personalized(self, case: Case):
        return _segments(case.content, []), None

    def history_caption(self, case: Case):
        most_common = Counter(it.caption for it in case.history).most_common(1)[0][0]
        return [case.content, most_common], None

    def history_mode(self, case: Case):
        """Each open attribute's most frequent value in the history: what five items say of a taste."""
        modes = [Counter(it.attributes[a] for it in case.history).most_common(1)[0][0] for a in OPEN_ATTRIBUTES]
        return _segments(case.content, [tw.keyword(a, v) for a, v in zip(OPEN_ATTRIBUTES, modes)]), None

    def oracle(self, case: Case):
        return _segments(case.content, [tw.keyword(a, case.favourites[a]) for a in OPEN_ATTRIBUTES]), None

    def pmg_like(self, method: str) -> Callable:
        def run(case: Case):
            pref = self.encoder.encode([it.caption for it in case.history], target=case.content, method=method)
            if pref.prompt is not None:  # llmga: the assistant's written prompt carries the taste
                return [pref.prompt], None
            segments = _segments(case.content, pref.keywords)
            # the weights serving uses (the preset's preference.json), so eval scores what users get
            weights = [1.0, float(self.encoder.cfg["keyword_weight"])][:len(segments)]
            return segments, pref.soft_tokens, weights, default_soft_weight(self.encoder.cfg, method)

        return run

    def nearest_item(self, case: Case) -> np.ndarray:
        """The catalog item with the requested content nearest (CLIP) to the history's mean embedding."""
        shape = case.target.attributes[CONTENT_ATTRIBUTE]
        pool = [it for it in self.world.items if it.attributes[CONTENT_ATTRIBUTE] == shape]
        hist = self.clip.embed_images([it.image for it in case.history]).mean(0)
        emb = self._item_embeddings(shape, pool)
        return pool[int(np.argmax(emb @ hist))].image

    def _item_embeddings(self, shape: str, pool: list[tw.Item]) -> np.ndarray:
        cache = self.__dict__.setdefault("_emb_cache", {})
        if shape not in cache:
            cache[shape] = self.clip.embed_images([it.image for it in pool])
        return cache[shape]


# ----------------------------------------------------------------------------- metrics
class Scorer:
    def __init__(self, preset_dir: Path, clip, lpips_backbone: str | None = None):
        self.probe = load_component(preset_dir, "probe")
        self.clip = clip
        if lpips_backbone:  # any local vision transformer directory (CLIP, ViT, DINO ...)
            from transformers import AutoModel

            model = AutoModel.from_pretrained(lpips_backbone, local_files_only=True).eval()
            self._lpips_model = getattr(model, "vision_model", model)
            self.lpips_note = f"backbone {lpips_backbone}, uniform layer weights"
        else:
            self._lpips_model = clip.model.vision_model
            self.lpips_note = "toy CLIP vision tower, uniform layer weights (uncalibrated LPIPS)"

    def lpips(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """LPIPS form: unit-normalised per-layer features, squared difference, spatial mean, layer mean."""
        with torch.no_grad():
            fa = self._lpips_model(pixel_values=self.clip._pixels(list(a)), output_hidden_states=True).hidden_states
            fb = self._lpips_model(pixel_values=self.clip._pixels(list(b)), output_hidden_states=True).hidden_states
        dists = []
        for x, y in zip(fa[1:], fb[1:]):
            x = torch.nn.functional.normalize(x, dim=-1)
            y = torch.nn.functional.normalize(y, dim=-1)
            dists.append(((x - y) ** 2).sum(-1).mean(-1))
        return torch.stack(dists).mean(0).numpy()

    def score(self, cases: list[Case], images: np.ndarray) -> dict:
        from skimage.metrics import structural_similarity

        read = self.probe.predict_values(images)
        content = np.mean([r[CONTENT_ATTRIBUTE] == c.target.attributes[CONTENT_ATTRIBUTE] for r, c in zip(read, cases)])
        pref = {a: float(np.mean([r[a] == c.favourites[a] for r, c in zip(read, cases)])) for a in OPEN_ATTRIBUTES}
        pref["joint"] = float(np.mean([all(r[a] == c.favourites[a] for a in OPEN_ATTRIBUTES) for r, c in zip(read, cases)]))
        agree = np.mean([np.mean([r[a] == c.target.attributes[a] for a in tw.ATTRIBUTES]) for r, c in zip(read, cases)])
        targets = np.stack([c.target.image for c in cases])
        ssim_t = [structural_similarity(g, t, channel_axis=2, data_range=255) for g, t in zip(images, targets)]
        ssim_h = [np.mean([structural_similarity(g, h.image, channel_axis=2, data_range=255) for h in c.history])
                  for g, c in zip(images, cases)]
        lp_t = self.lpips(images, targets)
        lp_h = np.mean([self.lpips(images, np.stack([c.history[j].image for c in cases])) for j in range(5)], axis=0)
        gen_emb = self.clip.embed_images(list(images))
        hist_emb = np.stack([self.clip.embed_images([h.image for h in c.history]) for c in cases])
        cap_emb = self.clip.embed_texts([c.target.caption for c in cases])
        return {
            "content_fidelity": float(content), "preference_accuracy": pref, "target_agreement": float(agree),
            "ssim_target": float(np.mean(ssim_t)), "ssim_history": float(np.mean(ssim_h)),
            "lpips_target": float(np.mean(lp_t)), "lpips_history": float(np.mean(lp_h)),
            "cpis": float(np.mean(np.einsum("nd,nkd->nk", gen_emb, hist_emb))),
            "cps": float(np.mean(np.sum(gen_emb * cap_emb, axis=1))),
        }


# ----------------------------------------------------------------------------- driver
def render_cases(renderer, conditionings, seed: int, steps: int, guidance: float, size: int,
                 progress: tqdm | None = None, batch_size: int = 32) -> np.ndarray:
    """One image per case, seed + case index, so every method sees the same noise.

    Cases with the same conditioning layout share a denoising loop (``render_batch``
    keeps one generator per image, so a batch draws exactly what single renders would).
    """
    from pigment.models.pipeline import RenderInputs

    groups: dict[tuple, list[tuple[int, RenderInputs]]] = {}
    for n, (segments, soft, *weights) in enumerate(conditionings):
        segment_weights, soft_weight = weights if weights else (None, 1.0)
        inputs = RenderInputs(segments=segments, soft_tokens=soft, num_images=1, seed=seed + n,
                              segment_weights=segment_weights, soft_weight=soft_weight,
                              num_inference_steps=steps, guidance_scale=guidance, height=size, width=size)
        groups.setdefault(renderer.batch_key(inputs), []).append((n, inputs))
    out: list[np.ndarray | None] = [None] * len(conditionings)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            for (n, _), result in zip(chunk, renderer.render_batch([inputs for _, inputs in chunk])):
                out[n] = np.asarray(result.images[0].convert("RGB"))
            if progress is not None:
                progress.update(len(chunk))
    return np.stack(out)


def evaluate(preset_dir: Path, split: str = "test-users", methods: list[str] | None = None, n_samples: int | None = None,
             seed: int = 0, world_seed: int = 0, steps: int | None = None, guidance: float | None = None,
             lpips_backbone: str | None = None, adapters: dict[str, str | None] | None = None) -> dict:
    from pigment.models.clip_embedder import ClipEmbedder
    from pigment.models.pipeline import Renderer
    from pigment.models.preference import PreferenceEncoder

    if not has_component(preset_dir, "probe"):
        raise SystemExit(f"preset {preset_dir} has no attribute probe: evaluate with the toy preset")
    adapters = {m: d for m, d in (adapters or {}).items() if d}
    subject_methods = [m for m in methods or [] if m in SUBJECT_METHODS]
    if subject_methods:
        other = [m for m in methods if m not in SUBJECT_METHODS]
        report = evaluate(preset_dir, split, other, n_samples, seed, world_seed, steps, guidance, lpips_backbone,
                          adapters) if other else {"preset": str(preset_dir), "methods": {}, "seconds": {}}
        return _subject_rows(report, preset_dir, subject_methods, adapters, seed, steps, guidance)
    available = list(BASELINES) + list(PMG_METHODS) + list(LLMGA_METHODS) + list(ADAPTER_METHODS) + [EDIT_METHOD]
    everything = not methods or methods == ["all"]
    methods = [m for m in available if (m not in ADAPTER_METHODS or m in adapters) and m != EDIT_METHOD
               ] if everything else methods
    unknown = sorted(set(methods) - set(available))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; allowed: {available} or 'all'")
    missing = [m for m in methods if m in ADAPTER_METHODS and m not in adapters]
    if missing:
        raise SystemExit(f"methods {missing} need their adapter directory (--{missing[0].replace('_', '-')} DIR)")
    skipped = {m: "not in --methods" if m in adapters else f"no adapter directory given (--{m.replace('_', '-')} DIR)"
               for m in ADAPTER_METHODS if m not in methods}
    defaults = preset_defaults(preset_dir)
    steps = steps or int(defaults.get("num_inference_steps", 20))
    guidance = guidance or float(defaults.get("guidance_scale", 3.0))
    size = int(defaults.get("height", 32))

    world = tw.ToyWorld(seed=world_seed)
    cases = build_cases(world, split, n_samples, seed)
    clip = ClipEmbedder(preset_dir)
    renderer = Renderer(preset_dir)
    encoder = PreferenceEncoder(preset_dir) if set(methods) & {*PMG_METHODS, *LLMGA_METHODS, "diffusion_dpo"} else None
    impl = Methods(world, encoder, clip)
    adapter_impl = _adapter_methods(preset_dir, methods, adapters, world, clip, renderer, impl)
    scorer = Scorer(preset_dir, clip, lpips_backbone)
    results, timings = {}, {}
    total = sum(len(cases) * (len(EDIT_INSTRUCTIONS) if m == EDIT_METHOD else 1) for m in methods if m != "nearest_item")
    with tqdm(total=total, desc="eval renders", unit="img") as bar:
        for method in methods:
            t0 = time.perf_counter()
            if method == EDIT_METHOD:
                results[method] = evaluate_edits(preset_dir, renderer, scorer.probe, cases, seed, steps, guidance,
                                                 size, bar)
                timings[method] = round(time.perf_counter() - t0, 2)
                continue
            if method == "nearest_item":
                images = np.stack([impl.nearest_item(c) for c in cases])
            elif method in adapter_impl:
                fn, method_renderer = adapter_impl[method]
                images = render_cases(method_renderer, [fn(c) for c in cases], seed, steps, guidance, size, bar)
            else:
                fn = impl.pmg_like(method) if method in (*PMG_METHODS, *LLMGA_METHODS) else getattr(impl, method)
                images = render_cases(renderer, [fn(c) for c in cases], seed, steps, guidance, size, bar)
            results[method] = scorer.score(cases, images)
            timings[method] = round(time.perf_counter() - t0, 2)
            bar.set_postfix(method=method, joint=round(results[method]["preference_accuracy"]["joint"], 3))
    return {
        "split": split, "n_samples": len(cases), "preset": str(preset_dir), "model_version": renderer.model_version,
        "sampler": {"num_inference_steps": steps, "guidance_scale": guidance, "size": size, "seed": seed},
        "world": {"seed": world_seed, "n_items": world.n_items, "n_users": world.n_users},
        "open_attributes": list(OPEN_ATTRIBUTES), "lpips": scorer.lpips_note, "clip": clip.model_id,
        "methods": results, "seconds": timings, "skipped": skipped,
        "adapters": {m: str(d) for m, d in adapters.items() if m in methods},
    }


def _subject_rows(report: dict, preset_dir: Path, subject_methods: list[str], adapters: dict, seed: int,
                  steps: int | None, guidance: float | None) -> dict:
    """Add the subject-driven rows (eval_reference.py) to ``report`` (the usual rows, or an empty report)."""
    from pigment.training.eval_reference import SUBJECT_ADAPTERS, evaluate_subjects

    missing = [m for m in subject_methods if m in SUBJECT_ADAPTERS and m not in adapters]
    if missing:
        raise SystemExit(f"methods {missing} need their adapter directory (--{missing[0].replace('_', '-')} DIR)")
    sampler = {k: v for k, v in (("num_inference_steps", steps), ("guidance_scale", guidance)) if v}
    t0 = time.perf_counter()
    with tqdm(desc="subject renders", unit="img") as bar:
        rows = evaluate_subjects(preset_dir, subject_methods, adapters, seed=seed, sampler=sampler, progress=bar)
    report["methods"].update(rows)
    report["seconds"]["subject_methods"] = round(time.perf_counter() - t0, 2)
    report["subject_protocol"] = ("toy world (not DreamBench): 6 held-out (shape, colour) subjects x 4 prompts "
                                  "(background, size) x 3 seeds, one fixed reference image each; the probe reads "
                                  "identity (subject_fidelity) and prompted attributes (prompt_fidelity)")
    report.setdefault("adapters", {}).update({m: str(adapters[m]) for m in subject_methods if m in adapters})
    return report

def edit_requests(cases: list[Case], seed: int) -> list[tuple[str, Case, str, str]]:
    """(kind, case, instruction, new value) for every case and instruction kind: a value other than the
    source's, and one of the kind's phrasings, both drawn from ``seed``."""
    rng = np.random.default_rng([seed, 21])
    out = []
    for kind, templates in EDIT_INSTRUCTIONS.items():
        for case in cases:
            old = case.target.attributes[kind]
            new = str(rng.choice([v for v in tw.ATTRIBUTES[kind] if v != old]))
            comparative = {"small": "smaller", "large": "larger"}.get(new, new)
            text = str(rng.choice(templates)).format(word=new, value=tw.keyword(kind, new), comparative=comparative)
            out.append((kind, case, text, new))
    return out


def evaluate_edits(preset_dir: Path, renderer, probe, cases: list[Case], seed: int, steps: int, guidance: float,
                   size: int, progress: tqdm | None = None) -> dict:
    """Instruction edits of held-out items, the serving path's pieces end to end: the instruction parsed with
    the preset's vocabulary, the region's mask found in the image, masked image-to-image with the preset's
    UNet. ``edit_success``: the probe reads the requested value; ``edit_preserved``: it reads every other
    attribute unchanged (as it read them on the source); per instruction kind and over all."""
    from pigment.models.edit import (
        EditConfig,
        EditNotUnderstood,
        edit_prompt,
        parse_instruction,
        region_mask,
    )
    from pigment.models.pipeline import RenderInputs
    from pigment.models.preference import KeywordVocabulary

    vocab = KeywordVocabulary(json.loads((preset_dir / "keywords.json").read_text()))
    config = EditConfig.load(preset_dir)
    pref = preset_dir / "preference.json"
    schema = json.loads(pref.read_text()).get("prompt_schema") if pref.is_file() else None
    requests = edit_requests(cases, seed)
    inputs, understood = [], []
    for n, (kind, case, text, new) in enumerate(requests):
        try:
            plan = parse_instruction(text, vocab, config)
        except EditNotUnderstood:
            understood.append(False)
            continue
        understood.append(plan.attribute == kind)
        image = case.target.image
        inputs.append((n, RenderInputs(
            segments=[edit_prompt(case.target.caption, plan, vocab, schema)], num_images=1, seed=seed + n,
            num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, init_image=image,
            mask=region_mask(image, plan.region, config), strength=plan.strength,
            repaint_whole=plan.repaint_whole)))
    edited: dict[int, np.ndarray] = {}
    groups: dict[tuple, list] = {}
    for n, x in inputs:
        groups.setdefault(renderer.batch_key(x), []).append((n, x))
    for group in groups.values():
        for i in range(0, len(group), 32):
            chunk = group[i:i + 32]
            for (n, _), out in zip(chunk, renderer.render_batch([x for _, x in chunk])):
                edited[n] = np.asarray(out.images[0].convert("RGB"))
            if progress is not None:
                progress.update(len(chunk))
    before = probe.predict_values(np.stack([c.target.image for _, c, _, _ in requests]))
    after = probe.predict_values(np.stack([edited.get(n, requests[n][1].target.image) for n in range(len(requests))]))
    rows: dict[str, list[tuple[bool, bool]]] = {}
    for n, (kind, _, _, new) in enumerate(requests):
        ok = n in edited and after[n][kind] == new
        kept = n in edited and all(after[n][a] == before[n][a] for a in after[n] if a != kind)
        rows.setdefault(kind, []).append((ok, kept))
    every = [r for rs in rows.values() for r in rs]
    return {
        "edit_success": {**{k: float(np.mean([r[0] for r in rs])) for k, rs in rows.items()},
                         "all": float(np.mean([r[0] for r in every]))},
        "edit_preserved": {**{k: float(np.mean([r[1] for r in rs])) for k, rs in rows.items()},
                           "all": float(np.mean([r[1] for r in every]))},
        "instructions_understood": float(np.mean(understood)),
        "n_per_kind": len(cases), "strength": config.strength, "regions": config.regions,
        "examples": [r[2] for r in requests[:: max(1, len(cases))]],
    }


def _adapter_methods(preset_dir: Path, methods: list[str], adapters: dict, world, clip, renderer, impl) -> dict:
    """method -> (case -> conditioning, renderer) for the trained-adapter rows.

    Pigeon adapters change the keywords (rendered like ``pmg_keywords``); the
    Diffusion-DPO LoRA changes the UNet, conditioned like ``pmg_keywords`` (its pairs' layout).
    """
    from pigment.models.pipeline import Renderer
    from pigment.models.preference import PreferenceEncoder

    out = {}
    for method in ("pigeon_sft", "pigeon_dpo"):
        if method in methods:
            encoder = PreferenceEncoder(preset_dir, adapter_dir=adapters[method])
            out[method] = (Methods(world, encoder, clip).pmg_like("pmg_keywords"), renderer)
    if "diffusion_dpo" in methods:
        out["diffusion_dpo"] = (impl.pmg_like("pmg_keywords"), Renderer(preset_dir, unet_adapter=adapters["diffusion_dpo"]))
    return out


def markdown_table(report: dict) -> str:
    subject = {n: m for n, m in report["methods"].items() if "subject_fidelity" in m}
    rest = {n: m for n, m in report["methods"].items() if n not in subject}
    out = _subject_table(subject) if subject else ""
    return out + (_pmg_table({**report, "methods": rest}) if rest else "")


def _subject_table(rows: dict) -> str:
    cols = ["subject_fidelity", "prompt_fidelity", "subject_joint", "prompt_joint", "acc_shape", "acc_colour",
            "acc_background", "acc_size"]
    lines = ["subject-driven rows (toy world, held-out subjects)", "", "| method | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{m[c]:.3f}" for c in cols) + " |" for n, m in rows.items()]
    return "\n".join(lines) + "\n\n"


def _pmg_table(report: dict) -> str:
    cols = ["content_fidelity", *(f"pref_{a}" for a in OPEN_ATTRIBUTES), "joint", "target_agreement",
            "ssim_target", "lpips_target", "cpis", "cps"]
    lines = [f"split `{report['split']}`, {report['n_samples']} samples, model `{report['model_version']}`", "",
             "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in report["methods"].items():
        if "content_fidelity" not in m:
            continue
        vals = [m["content_fidelity"], *(m["preference_accuracy"][a] for a in OPEN_ATTRIBUTES),
                m["preference_accuracy"]["joint"], m["target_agreement"], m["ssim_target"], m["lpips_target"],
                m["cpis"], m["cps"]]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    edit = report["methods"].get(EDIT_METHOD)
    if edit:
        kinds = [k for k in edit["edit_success"] if k != "all"] + ["all"]
        lines += ["", "| edit | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        for metric in ("edit_success", "edit_preserved"):
            lines.append(f"| {metric} | " + " | ".join(f"{edit[metric][k]:.3f}" for k in kinds) + " |")
    lines += [f"\n{name} skipped: {why}" for name, why in report.get("skipped", {}).items()]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    from pigment.services.common.settings import Settings

    preset = Path(args.preset) if args.preset else Settings().preset_dir
    n = 48 if args.quick and not args.n_samples else args.n_samples
    adapters = {"pigeon_sft": args.pigeon_sft, "pigeon_dpo": args.pigeon_dpo, "diffusion_dpo": args.diffusion_dpo,
                "reference_patchdpo": args.reference_patchdpo}
    report = evaluate(preset, args.split, args.methods.split(","), n, args.seed, args.world_seed, args.steps,
                      args.guidance, args.lpips_backbone, adapters)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    table = markdown_table(report)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="score methods on a toy-world split (JSON + markdown table)")
    p.add_argument("--split", default="test-users", choices=tw.SPLITS)
    p.add_argument("--methods", default="all",
                    help="comma list or 'all': " + ", ".join(BASELINES + PMG_METHODS + LLMGA_METHODS + ADAPTER_METHODS)
                   + "; 'edit' scores instruction editing (not in 'all'); subject-driven rows (named only): "
                   + ", ".join(SUBJECT_METHODS))
    p.add_argument("--out", default="eval-output/eval.json")
    p.add_argument("--quick", action="store_true", help="48 samples (a few minutes on CPU)")
    p.add_argument("--n-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--preset", default=None, help="preset directory (default: settings)")
    p.add_argument("--lpips-backbone", default=None)
    p.add_argument("--pigeon-sft", default=None, metavar="DIR", help="`pigment train pigeon --stage sft` out/adapter")
    p.add_argument("--pigeon-dpo", default=None, metavar="DIR", help="`pigment train pigeon --stage dpo` out/adapter")
    p.add_argument("--diffusion-dpo", default=None, metavar="DIR", help="`pigment train diffusion-dpo` out/unet_lora")
    p.add_argument("--reference-patchdpo", default=None, metavar="DIR", help="`pigment train patchdpo` out/unet_lora")
    p.set_defaults(func=lambda args, settings: run(args))
