"""``python -m pigment_client``: a few calls from a shell, answers as protobuf JSON (one object per line).

python -m pigment_client --target HOST:PORT [--api-key KEY] generate USER [PROMPT] [--images N] [--steps N]
python -m pigment_client get-generation ID [--png FILE]
python -m pigment_client feedback USER GENERATION_ID like|dislike|pick|click|rating [--value V] [--other ID]
python -m pigment_client history USER
python -m pigment_client interactions USER ITEM_ID:KIND ...
python -m pigment_client item ITEM_ID CAPTION [--tenant T]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from google.protobuf import json_format

from pigment_client.client import FEEDBACK_KINDS, PigmentClient


def _print(message) -> None:
    print(json_format.MessageToJson(message, indent=None))


def run(args, client: PigmentClient) -> None:
    if args.command == "generate":
        _print(
            client.generate(
                args.user,
                args.prompt,
                request_id=args.request_id,
                num_images=args.images,
                num_inference_steps=args.steps,
            )
        )
    elif args.command == "get-generation":
        generation = client.get_generation(
            args.generation_id, delivery="inline" if args.png else "none"
        )
        if args.png:
            Path(args.png).write_bytes(generation.image.png)
            generation.image.ClearField("png")  # the bytes went to the file, not the terminal
        _print(generation)
    elif args.command == "feedback":
        duplicate = client.log_feedback(
            args.user,
            args.generation_id,
            args.kind,
            value=args.value,
            other_generation_ids=args.other,
            feedback_id=args.feedback_id,
        )
        print(f'{{"duplicate": {str(duplicate).lower()}}}')
    elif args.command == "history":
        for entry in client.get_history(args.user):
            _print(entry)
    elif args.command == "item":
        from pigment_client.v1 import history_pb2

        item = history_pb2.Item(item_id=args.item_id, caption=args.caption, tenant=args.tenant)
        print(f'{{"upserted": {client.upsert_items([item])}}}')
    elif args.command == "interactions":
        pairs = [tuple(p.split(":", 1)) if ":" in p else (p, "view") for p in args.pairs]
        print(f'{{"logged": {client.log_interactions(args.user, pairs, tenant=args.tenant)}}}')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pigment_client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", default=os.environ.get("PIGMENT_TARGET", "127.0.0.1:50051"))
    p.add_argument("--api-key", default=os.environ.get("PIGMENT_API_KEY"))
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate")
    g.add_argument("user")
    g.add_argument("prompt", nargs="?", default="")
    g.add_argument("--images", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--request-id")
    g = sub.add_parser("get-generation")
    g.add_argument("generation_id")
    g.add_argument("--png", help="write the image here")
    g = sub.add_parser("feedback")
    g.add_argument("user")
    g.add_argument("generation_id")
    g.add_argument("kind", choices=sorted(FEEDBACK_KINDS))
    g.add_argument("--value", type=float, default=0.0)
    g.add_argument("--other", action="append", default=[])
    g.add_argument("--feedback-id")
    g = sub.add_parser("history")
    g.add_argument("user")
    g = sub.add_parser("interactions")
    g.add_argument("user")
    g.add_argument("pairs", nargs="+", help="ITEM_ID:KIND")
    g.add_argument("--tenant", default="")
    g = sub.add_parser("item")
    g.add_argument("item_id")
    g.add_argument("caption")
    g.add_argument("--tenant", default="")
    args = p.parse_args(argv)
    try:
        with PigmentClient(args.target, args.api_key) as client:
            run(args, client)
    except Exception as exc:
        import grpc

        if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
