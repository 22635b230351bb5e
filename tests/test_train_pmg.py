"""`pigment train pmg` on the tiny preset: a few steps, resume, install, and serve the result."""

from __future__ import annotations

import json
import shutil

import numpy as np

from pigment.training.train_pmg import PMGTrainConfig, PMGTrainer, install, load_records


def test_pmg_trains_resumes_and_installs(tiny_preset, tmp_path):
    from pigment.models.loader import load_component
    from pigment.models.preference import PreferenceEncoder

    preset = tmp_path / "tiny"
    shutil.copytree(tiny_preset, preset)
    cfg = PMGTrainConfig(preset=str(preset), out=str(tmp_path / "run"), steps=2, batch_size=4, max_samples=12,
                         checkpoint_every=1)
    records = load_records(cfg)
    assert len(records) == 12 and records[0].content.startswith("a ") and len(records[0].history) == 5

    first = PMGTrainer(cfg)
    first.prepare(records)
    m1 = first.train()
    assert m1["steps"] == 2 and np.isfinite(m1["loss_last"])

    cfg.steps = 4  # a new process picks the run up from its checkpoint
    second = PMGTrainer(cfg)
    second.prepare(records)
    m2 = second.train()
    assert [h["step"] for h in m2["history"]] == [1, 2, 3, 4]
    assert m2["history"][:2] == m1["history"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 4

    before = PreferenceEncoder(preset).soft_tokens("history:\n1. a red star\nkeywords:\n")
    install(tmp_path / "run" / "preference_head", preset, "test")
    load_component(preset, "preference_head")  # the manifest was re-hashed
    after = PreferenceEncoder(preset).soft_tokens("history:\n1. a red star\nkeywords:\n")
    assert not np.allclose(before, after)
