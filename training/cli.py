"""`pigment eval`, `pigment train ...` and `pigment demo` (registered into services/cli.py as a plug-in)."""

from __future__ import annotations

import importlib

# subcommand module -> its `register(subparsers)`; train commands register under `pigment train`.
EVAL = "pigment.training.eval"
TRAINERS = ("pigment.training.train_pmg", "pigment.training.train_decision",
            "pigment.training.train_pigeon", "pigment.training.train_diffusion_dpo",
            "pigment.training.train_reference", "pigment.training.train_patchdpo")


def register(sub) -> None:
    importlib.import_module(EVAL).register(sub)
    p = sub.add_parser("demo", help="seed the toy world's demo users, generate for each over gRPC, write demo-output/")
    p.add_argument("--out", default="demo-output")
    p.add_argument("--num-images", type=int, default=4)
    p.set_defaults(func=cmd_demo)
    train = sub.add_parser("train", help="train a method's weights").add_subparsers(dest="trainer", required=True)
    for module in TRAINERS:
        try:
            importlib.import_module(module).register(train)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def cmd_demo(args, settings) -> int:
    from pathlib import Path

    from pigment.training.demo import run_demo

    run_demo(settings, Path(args.out), num_images=args.num_images)
    return 0
