"""pigment from Python with the pigment-client package (pip install ./clients/python): a user with a history,
two personalized images, one fetched by id, and a like.

    python examples/python/quickstart.py --target 127.0.0.1:50051 [--api-key pgm_...] [--out DIR]

Prints one JSON line: the generation ids, the PNG's size, and whether the feedback was a replay.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pigment_client import PigmentClient
from pigment_client.v1 import history_pb2


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--api-key", default=os.environ.get("PIGMENT_API_KEY"))
    p.add_argument("--user", default="py-alice")
    p.add_argument(
        "--tenant", default="", help="the API key's tenant (items and users are created in it)"
    )
    p.add_argument("--out", default="quickstart-output")
    args = p.parse_args()

    with PigmentClient(args.target, args.api_key) as client:
        client.upsert_items(
            [
                history_pb2.Item(
                    item_id=f"{args.user}-star", caption="a small blue star", tenant=args.tenant
                )
            ]
        )
        client.log_interactions(args.user, [(f"{args.user}-star", "like")], tenant=args.tenant)
        result = client.generate(
            args.user,
            "a star",
            request_id=f"{args.user}-first",
            num_images=2,
            num_inference_steps=2,
        )
        ids = [image.generation_id for image in result.images]
        generation = client.get_generation(ids[0], delivery="inline")
        png = generation.image.png or client.download_image(ids[0])
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{ids[0]}.png").write_bytes(png)
        duplicate = client.log_feedback(
            args.user, ids[0], "pick", other_generation_ids=ids[1:], feedback_id=f"{args.user}-pick"
        )
    print(
        json.dumps(
            {
                "generation_ids": ids,
                "keywords": list(generation.keywords),
                "png_bytes": len(png),
                "duplicate": duplicate,
            }
        )
    )


if __name__ == "__main__":
    main()
