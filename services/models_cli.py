"""`pigment models build | manifest | verify` (presets) and `list | register | promote | rollback` (registry).

Each action is its own sub-parser, so options and component names mix in any order:
``pigment models manifest --dir DIR unet vae text_encoder tokenizer scheduler --size 512x512``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pigment.models.build import ARCHS  # light: the builders import torch inside
from pigment.services.common.errors import InvalidInput


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)

    p = sub.add_parser("build", help="a preset of real architectures from configs, random weights, nothing "
                                     "downloaded (tokenizers built locally)")
    p.add_argument("--arch", choices=ARCHS, default="tiny")
    p.add_argument("--dir", type=Path, default=None, help="where to write it (default data_dir/presets/ARCH)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="how the weights are stored")

    p = sub.add_parser("build-tiny", help="same as `build --arch tiny`")
    p.add_argument("--dir", type=Path, default=None)

    p = sub.add_parser("manifest", help="record a checkpoint directory: sha256 of every file + sampler defaults")
    p.add_argument("--dir", type=Path, required=True, help="the preset directory (one sub-directory per component)")
    p.add_argument("components", nargs="+", metavar="NAME[=KIND]",
                   help="sub-directories to record, e.g. unet vae text_encoder tokenizer scheduler llm "
                        "llm_tokenizer clip clip_tokenizer (KIND defaults to NAME)")
    p.add_argument("--version", default=None, help="version label (default: the directory name)")
    p.add_argument("--steps", type=int, default=None, help="default num_inference_steps")
    p.add_argument("--guidance", type=float, default=None, help="default guidance_scale")
    p.add_argument("--size", default=None, metavar="HxW", help="default image size, e.g. 512x512")
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default render precision")
    p.add_argument("--retrieval-threshold", type=float, default=None, help="tuned for this preset's CLIP")
    p.add_argument("--gate", default=None, help="the promotion gate retrains use by default (preference | toy)")

    p = sub.add_parser("verify", help="check every component against the manifest and load it")
    p.add_argument("--dir", type=Path, default=None)

    for action, words in (("list", "[KIND]"), ("register", "KIND PATH"), ("promote", "VERSION"),
                          ("rollback", "KIND")):
        p = sub.add_parser(action, help=f"adapter registry: {action} {words}")
        p.add_argument("components", nargs="*", metavar=words)
        p.add_argument("--version", default=None)
        p.add_argument("--parent", default=None, help="for register: the version this one was trained from")
        p.add_argument("--notes", default="", help="for register/promote/rollback: why")


def run(args, settings) -> int:
    from pigment.services import registry

    if args.action in registry.REGISTRY_ACTIONS:
        return registry.cli_action(args, settings)
    if args.action in ("build", "build-tiny"):
        from pigment.models.build import build_preset

        arch = getattr(args, "arch", "tiny")
        out = build_preset(arch, args.dir or settings.data_dir / "presets" / arch, seed=getattr(args, "seed", 0),
                           dtype=getattr(args, "dtype", "fp32"))
        print(f"{arch} preset written to {out}")
    elif args.action == "manifest":
        manifest(args)
    else:
        verify(args.dir or settings.preset_dir, settings)
    return 0


def manifest(args) -> None:
    from pigment.models import loader

    pairs = [c.split("=", 1) if "=" in c else (c, c) for c in args.components]
    unknown = sorted({kind for _, kind in pairs} - set(loader.KINDS))
    if unknown:
        raise InvalidInput(f"unknown component kind(s) {unknown}: allowed {', '.join(sorted(loader.KINDS))} "
                           "(write NAME=KIND for another directory name)")
    missing = [name for name, _ in pairs if not (args.dir / name).is_dir()]
    if missing:
        raise InvalidInput(f"no sub-directory {missing} under {args.dir}")
    components = {name: {"path": name, "kind": kind} for name, kind in pairs}
    defaults = loader.derived_defaults(args.dir, components)
    if args.size:
        try:
            height, width = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise InvalidInput(f"--size={args.size!r} is malformed: write HxW, e.g. 512x512") from None
        defaults.update(height=height, width=width)
    for key, value in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance),
                       ("num_images", args.num_images), ("dtype", args.dtype)):
        if value is not None:
            defaults[key] = value
    meta = {"preset": args.dir.name, "version": args.version or args.dir.name, "defaults": defaults}
    if args.retrieval_threshold is not None:
        meta["retrieval"] = {"threshold": args.retrieval_threshold}
    if args.gate:
        meta["retrain"] = {"gate": args.gate}
    try:
        loader.write_manifest(args.dir, components, **meta)
    except loader.ModelIntegrityError as exc:  # e.g. an empty component directory
        raise InvalidInput(str(exc)) from None
    print(f"wrote {args.dir / loader.MANIFEST}: {len(components)} components, defaults {json.dumps(defaults)}")


def verify(preset: Path, settings) -> None:
    from pigment.models import loader

    report = loader.verify_preset(preset, settings.verified_files)
    for name in loader.read_manifest(preset)["components"]:
        loader.load_component(preset, name)
        print(f"ok  {name}")
    print(f"verified {report['files']} files ({report['hashed']} hashed, {report['bytes_hashed']} bytes, "
          f"{report['seconds']} s)")
