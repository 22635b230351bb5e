"""`pigment eval` and `pigment train ...` subcommands (registered into services/cli.py)."""

from __future__ import annotations

import importlib

# subcommand module -> its `register(subparsers)`; train commands register under `pigment train`.
EVAL = "pigment.training.eval"
TRAINERS = ("pigment.training.train_pmg", "pigment.training.train_decision",
            "pigment.training.train_pigeon", "pigment.training.train_diffusion_dpo")


def register(sub) -> None:
    importlib.import_module(EVAL).register(sub)
    train = sub.add_parser("train", help="train a method's weights").add_subparsers(dest="trainer", required=True)
    for module in TRAINERS:
        try:
            importlib.import_module(module).register(train)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
