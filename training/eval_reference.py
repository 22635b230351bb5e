"""Subject-driven rows of `pigment eval` (DreamBench's protocol in the toy world; toy_subjects.py).

Held-out subjects x several prompts x several seeds; the attribute probe reads
each render: ``subject_fidelity`` (the reference's shape and colour, the
DINO/CLIP-I analogue) and ``prompt_fidelity`` (the prompted background and size,
the CLIP-T analogue). Rows:

- ``reference``: prompt + reference tokens from the preset's projector;
- ``reference_patchdpo``: the same with the PatchDPO UNet LoRA (``--reference-patchdpo DIR``);
- ``subject_caption`` (a ceiling): prompt + the subject written out ("a red star"), no image;
- ``prompt_only`` (a floor): the prompt alone; it cannot know the subject.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pigment.training import toy_subjects as ts

SUBJECT_METHODS = ("reference", "reference_patchdpo", "subject_caption", "prompt_only")
SUBJECT_ADAPTERS = ("reference_patchdpo",)


def case_inputs(cases: list[ts.SubjectCase], encoder, method: str, seed: int, sampler: dict) -> list:
    """RenderInputs per case; each subject's reference tokens are computed once."""
    from pigment.models.pipeline import RenderInputs

    tokens: dict[str, np.ndarray] = {}
    out = []
    for n, c in enumerate(cases):
        segments, ref = [c.prompt], None
        if method == "subject_caption":
            segments.append(ts.identity_caption(c.subject))
        elif method != "prompt_only":
            if c.subject.name not in tokens:
                tokens[c.subject.name] = encoder.tokens(list(c.references))
            ref = tokens[c.subject.name]
        out.append(RenderInputs(segments=segments, reference_tokens=ref, num_images=1, seed=seed + n, **sampler))
    return out


def render_all(renderer, inputs: list, batch_size: int = 32, progress=None) -> np.ndarray:
    images = []
    for i in range(0, len(inputs), batch_size):
        for result in renderer.render_batch(inputs[i:i + batch_size]):
            images.append(np.asarray(result.images[0].convert("RGB")))
        if progress is not None:
            progress.update(len(inputs[i:i + batch_size]))
    return np.stack(images)


def evaluate_subjects(preset_dir: Path, methods: list[str], adapters: dict[str, str], seed: int = 0,
                      sampler: dict | None = None, prompts_per_subject: int = 4, seeds: int = 3,
                      subjects: list[ts.Subject] | None = None, progress=None) -> dict:
    """method -> fidelity dict (toy_subjects.fidelity) on held-out subjects."""
    from pigment.models.loader import load_component
    from pigment.models.pipeline import Renderer
    from pigment.models.reference import ReferenceEncoder, has_reference

    if {"reference", "reference_patchdpo"} & set(methods) and not has_reference(preset_dir):
        raise SystemExit(f"preset {preset_dir} has no reference_projector: `pigment train reference --install`")
    cases = ts.eval_cases(subjects or ts.held_out_subjects(), prompts_per_subject, seeds, seed=seed)
    probe = load_component(preset_dir, "probe")
    encoder = ReferenceEncoder(preset_dir) if has_reference(preset_dir) else None
    base = Renderer(preset_dir)
    results = {}
    for method in methods:
        renderer = Renderer(preset_dir, unet_adapter=adapters[method]) if method in SUBJECT_ADAPTERS else base
        inputs = case_inputs(cases, encoder, method, seed, sampler or {})
        images = render_all(renderer, inputs, progress=progress)
        results[method] = {**ts.fidelity(cases, probe.predict_values(images)), "n_images": len(cases),
                           "n_subjects": len({c.subject for c in cases}), "prompts_per_subject": prompts_per_subject,
                           "seeds": seeds}
    return results
