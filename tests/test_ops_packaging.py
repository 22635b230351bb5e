"""Packaging: roles install without the render stack, CPU and GPU variants are exclusive, the lock covers it all."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ML_STACK = ("torch", "diffusers", "transformers", "onnxruntime", "faiss", "peft", "accelerate", "onnx", "skimage",
            "tokenizers", "safetensors", "tensorrt")


def name_of(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_base_install_has_no_ml_stack_and_gpu_replaces_cpu():
    p = project()
    base = {name_of(r) for r in p["dependencies"]}
    assert not base & {"torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "faiss-cpu", "peft"}
    extras = {k: {name_of(r) for r in v} for k, v in p["optional-dependencies"].items()}
    assert "torch" in extras["models"] and "diffusers" in extras["render"]
    assert extras["cpu"] == {"onnxruntime", "faiss-cpu"}
    assert not extras["gpu"] & extras["cpu"] and not any(r in extras["gpu"] for r in ("onnxruntime", "faiss-cpu"))
    for role in ("models", "render", "train"):  # the variant is chosen by cpu | gpu, never baked into a role
        assert not extras[role] & (extras["cpu"] | extras["gpu"]), role
    assert set(p["optional-dependencies"]["all"][0].split("[")[1].rstrip("]").split(",")) == {"render", "train", "cpu"}


def test_make_installs_cpu_torch_first_then_every_extra_it_needs():
    make = (ROOT / "Makefile").read_text()
    torch_at, all_at = make.index("pip install -q torch==2.13.0"), make.index("pip install -q -e '.[all,dev]'")
    assert torch_at < all_at


def test_lock_pins_every_dependency_of_the_cpu_images():
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    p = project()
    wanted = [*p["dependencies"], *(r for k in ("models", "render", "cpu", "dev") for r in p["optional-dependencies"][k])]
    missing = sorted({name_of(r) for r in wanted if not r.startswith("pigment")} - set(pins))
    assert not missing, f"not in requirements.lock: {missing}"
    assert pins["torch"] == "2.13.0+cpu"
    assert not {"onnxruntime-gpu", "faiss-gpu-cu12"} & set(pins)


def test_roles_import_and_start_without_the_ml_stack():
    """gateway servicers, beat's Celery app, the CLI, topology, metrics, tracing, notify and migrations."""
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in ML_STACK)
    code = (f"import sys; {blocked}\n"
            "import pigment.services.render.worker, pigment.services.cli, pigment.services.topology\n"
            "import pigment.services.gateway.servicer, pigment.services.history.servicer\n"
            "import pigment.services.preference.servicer, pigment.services.common.server\n"
            "import pigment.services.common.metrics, pigment.services.common.tracing, pigment.services.common.logs\n"
            "import pigment.services.store.notify, pigment.services.store.migrate\n"
            "from pigment.services.cli import build_parser; build_parser().parse_args(['worker', 'render'])\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
