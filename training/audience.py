"""A simulated audience for the toy world: synthetic users answering through the real API.

Each synthetic user is a toy-world *train* user (never a held-out one) with a
latent taste that no model ever sees as a label. The audience

1. ingests the users' items (``UpsertItems``) and, each round, the user's next
   five-item window of interactions (``LogInteractions``: the user kept
   browsing), so ``GeneratePersonalized`` reads that window as the history
   (run the stack with ``history_limit=5``, the evaluation's window);
2. asks ``GeneratePersonalized`` (gRPC, keywords-only method) for ``candidates``
   images of the window's next content ("a star"), one request each, so the
   server's exploration (``preference_explore_rate``) gives them different
   keyword lists;
3. reads every image with the attribute probe, scores it against the user's
   taste at that time (+1 per open attribute at its favourite value, +1 for the
   requested shape), picks the best (with probability ``noise`` a random one)
   and rates each image 1-5 from its score plus Gaussian noise;
4. sends the pick and the ratings to the real HTTP endpoint ``POST /v1/feedback``.

Deterministic given the seeds (and the server's): request and feedback ids are
derived from the round, user and candidate, so a replayed round changes nothing.
"""

from __future__ import annotations

import io
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pigment.training import toy_world as tw
from PIL import Image

OPEN_ATTRIBUTES = ("colour", "background", "size")


@dataclass
class AudienceConfig:
    n_users: int = 36
    candidates: int = 4         # requests (one image each) per user per round
    noise: float = 0.1          # probability that a pick is random
    rating_noise: float = 0.5   # std of the Gaussian added to a rating before rounding
    world_seed: int = 0
    seed: int = 0
    concurrency: int = 8        # requests in flight (the gateway may batch them for the worker)
    run_tag: str = "aud"        # prefix of request and feedback ids


class Audience:
    def __init__(self, channel, feedback_url: str, preset_dir: str | Path, cfg: AudienceConfig | None = None,
                 world: tw.ToyWorld | None = None):
        from pigment.models.loader import load_component

        self.cfg = cfg or AudienceConfig()
        self.channel = channel
        self.feedback_url = feedback_url.rstrip("/") + "/v1/feedback"
        self.world = world or tw.ToyWorld(seed=self.cfg.world_seed)
        self.probe = load_component(Path(preset_dir), "probe")
        self.users = self._pick_users()
        sequences = self.world.sequences()
        self.sequences = {u.user_id: sequences[u.user_id] for u in self.users}

    def _pick_users(self) -> list[tw.User]:
        held_out = self.world.test_user_ids
        pool = [u for u in self.world.users if u.user_id not in held_out]
        rng = np.random.default_rng([self.cfg.seed, 11])
        pick = sorted(rng.choice(len(pool), min(self.cfg.n_users, len(pool)), replace=False))
        return [pool[i] for i in pick]

    # -- setup -------------------------------------------------------------------------------------------
    def ingest(self) -> int:
        """Upsert every item the audience will interact with; create the users. Returns the item count."""
        from pigment.v1 import history_pb2, history_pb2_grpc

        stub = history_pb2_grpc.HistoryServiceStub(self.channel)
        ids = sorted({i for seq in self.sequences.values() for i in seq})
        items = [self.world.item_by_id[i] for i in ids]
        for k in range(0, len(items), 64):
            stub.UpsertItems(history_pb2.UpsertItemsRequest(items=[
                history_pb2.Item(item_id=it.item_id, caption=it.caption, image_png=tw.png_bytes(it.image),
                                 attributes=it.attributes) for it in items[k:k + 64]]))
        return len(items)

    def window(self, user: tw.User, round_: int) -> tuple[int, list[str], tw.Item]:
        """(start, five history item ids, the next item) of ``user`` in ``round_`` (cycling over the sequence)."""
        seq = self.sequences[user.user_id]
        n_windows = len(seq) - tw.WINDOW + 1
        start = (round_ * 3 + int(user.user_id.split("-")[-1])) % n_windows  # users start at different points
        ids = seq[start:start + tw.WINDOW]
        return start, ids[:-1], self.world.item_by_id[ids[-1]]

    def browse(self, user: tw.User, history: list[str]) -> None:
        from pigment.v1 import history_pb2, history_pb2_grpc

        stub = history_pb2_grpc.HistoryServiceStub(self.channel)
        t0 = int(time.time() * 1000)
        stub.LogInteractions(history_pb2.LogInteractionsRequest(user_id=user.user_id, create_user=True, interactions=[
            history_pb2.Interaction(item_id=i, kind="view", value=1.0, timestamp_ms=t0 - 1000 * (len(history) - n))
            for n, i in enumerate(history)]))

    # -- one round -----------------------------------------------------------------------------------------
    def run_round(self, round_: int) -> dict:
        """Every user browses, is shown candidates and answers; returns counts and mean scores."""
        t0 = time.perf_counter()
        plans = []
        for user in self.users:
            start, history, nxt = self.window(user, round_)
            self.browse(user, history)
            taste = {a: fav for a, (fav, _) in user.taste_at(start + tw.WINDOW - 1).items()}
            content = tw.caption(nxt.attributes, keep={"shape"})
            plans.append((user, taste, nxt.attributes["shape"], content))
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            shown = list(pool.map(lambda plan: self._request(round_, *plan), plans))
        stats = {"round": round_, "users": len(plans), "requests": 0, "feedback": 0, "picked_score": [],
                 "mean_score": [], "explored": 0, "distinct_keyword_lists": 0}
        for (user, taste, shape, _), images in zip(plans, shown):
            self._answer(round_, user, taste, shape, images, stats)
        return {**stats, "picked_score": float(np.mean(stats["picked_score"] or [0])),
                "mean_score": float(np.mean(stats["mean_score"] or [0])), "seconds": round(time.perf_counter() - t0, 1)}

    def _request(self, round_: int, user: tw.User, taste: dict, shape: str, content: str) -> list[dict]:
        from pigment.v1 import generation_pb2 as pb
        from pigment.v1 import generation_pb2_grpc

        stub = generation_pb2_grpc.GenerationServiceStub(self.channel)
        out = []
        for k in range(self.cfg.candidates):
            resp = stub.GeneratePersonalized(pb.GenerateRequest(
                request_id=f"{self.cfg.run_tag}-r{round_}-{user.user_id}-{k}", user_id=user.user_id, prompt=content,
                num_images=1, method=pb.METHOD_PMG_KEYWORDS, retrieval=pb.RETRIEVAL_MODE_GENERATE_ONLY))
            for img in resp.images:
                out.append({"generation_id": img.generation_id, "keywords": list(resp.keywords),
                            "flags": list(resp.flags),
                            "image": np.asarray(Image.open(io.BytesIO(img.png)).convert("RGB"))})
        return out

    def score(self, read: dict[str, str], taste: dict[str, str], shape: str) -> int:
        return sum(read[a] == taste[a] for a in OPEN_ATTRIBUTES) + int(read["shape"] == shape)

    def _answer(self, round_: int, user: tw.User, taste: dict, shape: str, images: list[dict], stats: dict) -> None:
        if not images:
            return
        rng = np.random.default_rng([self.cfg.seed, round_, int(user.user_id.split("-")[-1])])
        reads = self.probe.predict_values(np.stack([im["image"] for im in images]))
        scores = [self.score(r, taste, shape) for r in reads]
        best = max(range(len(images)), key=lambda i: (scores[i], -i))
        pick = int(rng.integers(len(images))) if rng.random() < self.cfg.noise else best
        stats["requests"] += len(images)
        stats["explored"] += sum("EXPLORED" in im["flags"] for im in images)
        stats["distinct_keyword_lists"] += len({tuple(im["keywords"]) for im in images})
        stats["picked_score"].append(scores[pick])
        stats["mean_score"].append(float(np.mean(scores)))
        tag = f"{self.cfg.run_tag}-r{round_}-{user.user_id}"
        if len(images) > 1:
            others = [im["generation_id"] for i, im in enumerate(images) if i != pick]
            self.send(f"{tag}-pick", user.user_id, images[pick]["generation_id"], "pick", 0.0, others)
            stats["feedback"] += 1
        for i, (im, s) in enumerate(zip(images, scores)):
            top = len(OPEN_ATTRIBUTES) + 1
            rating = int(np.clip(np.rint(1 + 4 * s / top + rng.normal(0, self.cfg.rating_noise)), 1, 5))
            self.send(f"{tag}-rate{i}", user.user_id, im["generation_id"], "rating", float(rating))
            stats["feedback"] += 1

    def send(self, feedback_id: str, user_id: str, generation_id: str, kind: str, value: float = 0.0,
             others: list[str] | None = None) -> dict:
        """``POST /v1/feedback``; raises on any status but 200/201."""
        body = json.dumps({"feedback_id": feedback_id, "user_id": user_id, "generation_id": generation_id,
                           "kind": f"FEEDBACK_KIND_{kind.upper()}", "value": value,
                           "other_generation_ids": others or []}).encode()
        req = urllib.request.Request(self.feedback_url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())
