"""The toy world's subject-driven task (DreamBench's shape): keep a subject's identity, follow the prompt.

A *subject* is a (shape, colour) pair: its identity. Its reference images are
renders of it with any background and size (each with its own jitter). A prompt
asks for the other attributes ("a large shape on a light background") and never
names the subject, so only the reference can say which shape and colour to draw.
The six "diagonal" subjects (the i-th shape in the i-th colour) are held out of
every training run: each shape and each colour is seen in training, never these
pairs. Evaluation renders several prompts per subject and several seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pigment.training import toy_world as tw

IDENTITY = ("shape", "colour")
PROMPTED = ("background", "size")


@dataclass(frozen=True)
class Subject:
    shape: str
    colour: str

    @property
    def attrs(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour}

    @property
    def name(self) -> str:
        return f"{self.colour}_{self.shape}"


def all_subjects() -> list[Subject]:
    return [Subject(s, c) for s in tw.ATTRIBUTES["shape"] for c in tw.ATTRIBUTES["colour"]]


def held_out_subjects() -> list[Subject]:
    return [Subject(s, c) for s, c in zip(tw.ATTRIBUTES["shape"], tw.ATTRIBUTES["colour"])]


def train_subjects() -> list[Subject]:
    held = set(held_out_subjects())
    return [s for s in all_subjects() if s not in held]


def prompt_text(prompted: dict[str, str]) -> str:
    """"a large shape on a light background": the prompted attributes only, never the subject."""
    return tw.caption({"shape": "shape", **prompted}, keep=set(prompted))


def identity_caption(subject: Subject) -> str:
    """"a red star": the subject in words (the reference projector's alignment target, never a prompt)."""
    return tw.caption(subject.attrs | {"background": "", "size": ""}, keep=set(IDENTITY))


def all_prompts() -> list[dict[str, str]]:
    return [{"background": b, "size": z} for b in tw.ATTRIBUTES["background"] for z in tw.ATTRIBUTES["size"]]


def subject_images(subject: Subject, n: int, rng: np.random.Generator) -> tuple[list[dict[str, str]], np.ndarray]:
    """``n`` renders of the subject with random background and size, each jittered."""
    attrs = [{**subject.attrs, "background": str(rng.choice(tw.ATTRIBUTES["background"])),
              "size": str(rng.choice(tw.ATTRIBUTES["size"]))} for _ in range(n)]
    return attrs, np.stack([tw.render_item(a, rng) for a in attrs])


@dataclass
class SubjectCase:
    """One evaluation render: a subject's reference images, a prompt, a seed offset."""

    subject: Subject
    references: np.ndarray          # uint8 R,32,32,3
    prompted: dict[str, str]
    seed: int

    @property
    def prompt(self) -> str:
        return prompt_text(self.prompted)


def eval_cases(subjects: list[Subject], prompts_per_subject: int = 4, seeds: int = 2, references: int = 1,
               seed: int = 0) -> list[SubjectCase]:
    """Each subject: fixed reference image(s) (Kosmos-G setting) x prompts x seeds. Prompts ask for a
    background and size the reference does not have where possible, so copying it does not pass."""
    rng = np.random.default_rng([seed, 7])
    cases = []
    for subject in subjects:
        ref_attrs, refs = subject_images(subject, references, rng)
        choices = [p for p in all_prompts() if p["background"] != ref_attrs[0]["background"]]
        pick = rng.choice(len(choices), min(prompts_per_subject, len(choices)), replace=False)
        for i in pick:
            cases += [SubjectCase(subject, refs, choices[int(i)], k) for k in range(seeds)]
    return cases


def fidelity(cases: list[SubjectCase], read: list[dict[str, str]]) -> dict[str, float]:
    """subject_fidelity: share of identity attributes the probe reads as the reference's (DINO/CLIP-I analogue);
    prompt_fidelity: share of prompted attributes read as asked (CLIP-T analogue); *_joint: all of them."""
    subj = [[r[a] == c.subject.attrs[a] for a in IDENTITY] for c, r in zip(cases, read)]
    prom = [[r[a] == c.prompted[a] for a in PROMPTED] for c, r in zip(cases, read)]
    out = {"subject_fidelity": float(np.mean(subj)), "prompt_fidelity": float(np.mean(prom)),
           "subject_joint": float(np.mean([all(x) for x in subj])),
           "prompt_joint": float(np.mean([all(x) for x in prom]))}
    for a in IDENTITY + PROMPTED:
        truth = [(c.subject.attrs | c.prompted)[a] for c in cases]
        out[f"acc_{a}"] = float(np.mean([r[a] == t for r, t in zip(read, truth)]))
    return out
