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


def test_pmg_lora_is_saved_resumed_and_served_for_soft_tokens_only(tiny_preset, tmp_path):
    from peft import get_peft_model_state_dict
    from pigment.models.preference import PreferenceEncoder

    preset = tmp_path / "tiny"
    shutil.copytree(tiny_preset, preset)
    cfg = PMGTrainConfig(preset=str(preset), out=str(tmp_path / "run"), steps=2, batch_size=4, max_samples=8,
                         checkpoint_every=1, lora_r=2, lr=0.05)
    records = load_records(cfg)
    first = PMGTrainer(cfg)
    first.prepare(records)
    first.train()
    trained = {k: v.clone() for k, v in get_peft_model_state_dict(first.llm).items()}
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # the LoRA moved

    second = PMGTrainer(cfg)  # resuming restores the LoRA, not only the head
    second.resume()
    resumed = get_peft_model_state_dict(second.llm)
    assert trained.keys() == resumed.keys() and all(np.allclose(trained[k], resumed[k]) for k in trained)

    lora_cfg = json.loads((tmp_path / "run" / "preference_head" / "llm_lora" / "adapter_config.json").read_text())
    assert lora_cfg["base_model_name_or_path"] == "llm"  # no path of the training machine in the shipped files
    prompt = "history:\n1. a large red star on a dark background\nkeywords:\n"
    plain = PreferenceEncoder(preset)
    install(tmp_path / "run" / "preference_head", preset, "test")
    served = PreferenceEncoder(preset)
    assert "pmg" in served.llm.peft_config
    with served.adapter(None):  # the same head without its LoRA gives other soft tokens
        without = served.soft_tokens(prompt)
    assert not np.allclose(served.soft_tokens(prompt), without, atol=1e-6)
    # Keywords come from the plain LLM: the PMG LoRA never steers them.
    assert served.generate_keywords_batch([prompt]) == plain.generate_keywords_batch([prompt])


def test_distillation_pulls_the_student_to_the_caption_teacher(tiny_preset, tmp_path):
    """With distill_weight 1 the loss is the gap to the UNet told the target's caption: training
    shrinks it on a fixed batch, and a teacher told another caption is matched worse."""
    import torch

    cfg = PMGTrainConfig(preset=str(tiny_preset), out=str(tmp_path / "run"), steps=25, batch_size=4, max_samples=4,
                         checkpoint_every=100, lr=0.05, distill_weight=1.0, keyword_dropout=1.0)
    trainer = PMGTrainer(cfg)
    trainer.prepare(load_records(cfg))
    assert all(r.target_caption.startswith("a ") for r in trainer.records)
    idx = np.arange(4)

    def gap() -> float:
        with torch.no_grad():
            return trainer.loss(idx, False, np.random.default_rng(0)).item()

    before = gap()
    trainer.train()
    after = gap()
    assert after < 0.8 * before
    for r in trainer.records:  # a teacher told something else: the student no longer matches it
        r.target_caption = "a small grey cross on a light background"
    assert gap() > after
