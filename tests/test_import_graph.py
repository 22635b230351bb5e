"""Imports run one way: models at the bottom, services and training above it, the toy world a plug-in.

Checked on the source with ``ast`` (every import statement, including the lazy ones inside functions),
and at run time: every serving module imports with ``pigment.training`` made unimportable.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"services": "pigment.services", "models": "pigment.models", "training": "pigment.training"}
TOY_NAMES = ("toy_world", "ToyWorld", "toy_evaluator", "audience")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts[1:])
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGES[rel.parts[0]], *parts])


def parse(source: str) -> ast.Module:
    """``ast.parse``, retried: CPython 3.11.7 raises "AST constructor recursion depth mismatch" when another
    thread (a stack left running by an earlier test) builds an AST at the same time (gh-106905)."""
    for attempt in range(5):
        try:
            return ast.parse(source)
        except SystemError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def imports_of(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names (``from a import b`` gives a and a.b)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def graph(top: str) -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted((ROOT / top).rglob("*.py"))}


def test_services_never_import_training_nor_name_the_toy_world():
    bad = {m: sorted(d for d in deps if d.startswith("pigment.training") or any(t in d for t in TOY_NAMES))
           for m, deps in graph("services").items()}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_models_import_neither_services_nor_training():
    bad = {m: sorted(d for d in deps if d.startswith(("pigment.services", "pigment.training")))
           for m, deps in graph("models").items()}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_no_import_cycle_inside_services():
    g = graph("services")
    edges = {m: {d for d in deps if d in g and d != m} for m, deps in g.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                if nxt == goal:
                    return True
                seen.add(nxt)
                todo.append(nxt)
        return False

    cycles = sorted((a, b) for a in edges for b in edges[a] if reaches(b, a))
    assert not cycles, cycles


def test_every_serving_module_imports_without_training():
    modules = sorted(m for m in graph("services") if not m.endswith("worker"))  # worker: loads plug-ins by name
    code = "import sys, importlib; sys.modules['pigment.training'] = None\n" + "".join(
        f"importlib.import_module({m!r})\n" for m in modules) + "print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
