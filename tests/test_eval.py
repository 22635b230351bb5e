"""`pigment eval` on the shipped toy preset: the output contract, on a few samples (not the numbers)."""

from __future__ import annotations

import json
import subprocess
import sys

from pigment.services.common.settings import REPO_PRESETS

TOY = REPO_PRESETS / "toy"


def test_eval_writes_the_contract(tmp_path):
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "pigment.services.cli", "eval", "--split", "test-users", "--preset", str(TOY),
           "--methods", "non_personalized,history_caption,history_mode,nearest_item,oracle,pmg,pmg_keywords,pmg_soft",
           "--n-samples", "3", "--steps", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["split"] == "test-users" and report["n_samples"] == 3
    for name in ("non_personalized", "history_caption", "history_mode", "nearest_item", "oracle", "pmg", "pmg_keywords",
                 "pmg_soft"):
        m = report["methods"][name]
        for key in ("content_fidelity", "target_agreement", "ssim_target", "lpips_target", "cpis", "cps"):
            assert isinstance(m[key], float), (name, key)
        assert set(m["preference_accuracy"]) == {"colour", "background", "size", "joint"}
        assert 0.0 <= m["preference_accuracy"]["joint"] <= 1.0
    # the nearest catalog item always has the requested content: the probe must read it
    assert report["methods"]["nearest_item"]["content_fidelity"] == 1.0
    assert "| oracle |" in out.with_suffix(".md").read_text()
