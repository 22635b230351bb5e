"""Online personalization on held-out users (issue 20): does a user's feedback sharpen *that user's* next images?

    python bench/online_personalization.py --rounds 3 --out F.json

Toy world only (the probe reads what was rendered; the users' latent tastes score it). Starts the
embedded stack (SQLite, a real Celery worker, gRPC, the HTTP feedback endpoint) on a fresh data
directory. The audience is the toy world's **held-out test users** (never trained on), each with its
first window (five interactions) logged as history and the window's next item's shape as the content
("a star"). Arms, each on its own copies of the users (own ids, own history and feedback):

- ``feedback``: every round each user asks ``GeneratePersonalized`` (gRPC) for N candidates
  (``candidate`` 0..N-1: the best guess and N-1 explored variants), the probe reads them, the user
  picks the best for its taste (gRPC ``LogFeedback``) and rates each 1-5 with Gaussian noise
  (HTTP ``POST /v1/feedback``);
- ``control``: the same users and requests (candidate 0 only), no feedback;
- ``noise``: as ``feedback`` with a random pick ``--noise`` of the time;
- ``drift``: the toy world's drifting users; from round ``--drift-at`` on they answer (and are scored)
  with their taste after the drift; run for ``--drift-rounds`` rounds.

Round r's score is candidate 0's image (fixed seed per user, so the control arm re-renders the same
image): ``joint`` = the probe reads the user's favourite value on all three open attributes;
``content_fidelity`` = it reads the requested shape. ``oracle_joint`` renders each user's true
favourites as keywords with the same renderer and seed (`pigment eval`'s oracle conditioning).
Writes ``{"rounds": [{"round", "joint", "control_joint", "oracle_joint", "content_fidelity",
"n_feedback", ...}], "noise": [...], "drift": [...], "targets": {...}}`` and a PNG plot next to it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

OPEN = ("colour", "background", "size")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="toy")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--noise", type=float, default=0.1, help="random-pick probability of the noise arm")
    p.add_argument("--rating-noise", type=float, default=0.5)
    p.add_argument("--users", type=int, default=0, help="0 = every held-out user")
    p.add_argument("--drift-at", type=int, default=2, help="round from which drifting users answer anew")
    p.add_argument("--drift-rounds", type=int, default=4, help="last round of the drift arm")
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@dataclass
class SimUser:
    arm: str
    user: object            # training.toy_world.User
    history: list[str]      # item ids of the first window
    content: str            # "a star"
    shape: str
    noise: float

    @property
    def user_id(self) -> str:
        return f"{self.arm}-{self.user.user_id}"

    def taste(self, round_: int, drift_at: int | None) -> dict[str, str]:
        t = 10**6 if (drift_at is not None and round_ >= drift_at) else 5
        return {a: fav for a, (fav, _) in self.user.taste_at(t).items()}


class Bench:
    def __init__(self, args, channel, http_url: str, preset_dir: Path):
        from pigment.models.loader import load_component
        from pigment.training import toy_world as tw

        self.args, self.channel, self.http_url = args, channel, http_url.rstrip("/") + "/v1/feedback"
        self.tw = tw
        self.world = tw.ToyWorld(seed=0)
        self.probe = load_component(preset_dir, "probe")
        seqs = self.world.sequences()
        held_out = sorted(self.world.test_user_ids)
        if args.users:
            held_out = held_out[: args.users]
        self.users = [u for u in self.world.users if u.user_id in held_out]
        self.first = {u.user_id: seqs[u.user_id][: tw.WINDOW] for u in self.users}

    def sim(self, arm: str, noise: float = 0.0, only_drift: bool = False) -> list[SimUser]:
        out = []
        for u in self.users:
            if only_drift and u.kind != "drift":
                continue
            window = self.first[u.user_id]
            nxt = self.world.item_by_id[window[-1]]
            out.append(SimUser(arm, u, window[:-1], self.tw.caption(nxt.attributes, keep={"shape"}),
                               nxt.attributes["shape"], noise))
        return out

    # -- setup through the real API --------------------------------------------------------------------
    def ingest(self, users: list[SimUser]) -> None:
        from pigment.v1 import history_pb2, history_pb2_grpc

        stub = history_pb2_grpc.HistoryServiceStub(self.channel)
        ids = sorted({i for u in self.users for i in self.first[u.user_id]})
        items = [self.world.item_by_id[i] for i in ids]
        for k in range(0, len(items), 64):
            stub.UpsertItems(history_pb2.UpsertItemsRequest(items=[
                history_pb2.Item(item_id=it.item_id, caption=it.caption, image_png=self.tw.png_bytes(it.image),
                                 attributes=it.attributes) for it in items[k:k + 64]]))
        for u in users:
            stub.LogInteractions(history_pb2.LogInteractionsRequest(user_id=u.user_id, create_user=True,
                interactions=[history_pb2.Interaction(item_id=i, kind="view", value=1.0,
                                                      timestamp_ms=1_700_000_000_000 + 60_000 * n)
                              for n, i in enumerate(u.history)]))

    # -- one round -------------------------------------------------------------------------------------
    def request(self, u: SimUser, round_: int, candidate: int) -> dict:
        from pigment.v1 import generation_pb2 as pb
        from pigment.v1 import generation_pb2_grpc
        from PIL import Image

        stub = generation_pb2_grpc.GenerationServiceStub(self.channel)
        seed = 1 + int(u.user.user_id.split("-")[-1])  # one seed per user: the same image for the same keywords
        resp = stub.GeneratePersonalized(pb.GenerateRequest(
            request_id=f"{u.user_id}-r{round_}-c{candidate}", user_id=u.user_id, prompt=u.content, num_images=1,
            seed=seed, method=pb.METHOD_PMG_KEYWORDS, retrieval=pb.RETRIEVAL_MODE_GENERATE_ONLY,
            candidate=candidate))
        img = resp.images[0]
        return {"generation_id": img.generation_id, "keywords": list(resp.keywords), "flags": list(resp.flags),
                "feedback_used": len(resp.feedback_used), "explored": resp.explored_attribute,
                "image": np.asarray(Image.open(io.BytesIO(img.png)).convert("RGB"))}

    def run_round(self, users: list[SimUser], round_: int, feedback: bool, drift_at: int | None = None) -> dict:
        n = self.args.candidates if feedback else 1
        jobs = [(u, k) for u in users for k in range(n)]
        with ThreadPoolExecutor(self.args.concurrency) as pool:
            shown = list(pool.map(lambda job: self.request(job[0], round_, job[1]), jobs))
        by_user = {u.user_id: [s for (v, _), s in zip(jobs, shown) if v is u] for u in users}
        joint, content, n_feedback, changed, explored = [], [], 0, 0, 0
        for u in users:
            images = by_user[u.user_id]
            reads = self.probe.predict_values(np.stack([im["image"] for im in images]))
            taste = u.taste(round_, drift_at)
            joint.append(all(reads[0][a] == taste[a] for a in OPEN))
            content.append(reads[0]["shape"] == u.shape)
            changed += "KEYWORDS_CHANGED_BY_FEEDBACK" in images[0]["flags"]
            explored += sum("EXPLORED" in im["flags"] for im in images)
            if feedback:
                n_feedback += self.answer(u, round_, images, reads, taste)
        return {"joint": float(np.mean(joint)), "content_fidelity": float(np.mean(content)),
                "n_feedback": n_feedback, "keywords_changed": changed, "explored": explored, "users": len(users)}

    def answer(self, u: SimUser, round_: int, images: list[dict], reads: list[dict], taste: dict) -> int:
        """The simulated user's pick (gRPC LogFeedback) and ratings (HTTP POST /v1/feedback)."""
        from pigment.v1 import generation_pb2 as pb
        from pigment.v1 import generation_pb2_grpc

        rng = np.random.default_rng([self.args.seed, round_, int(u.user.user_id.split("-")[-1]), len(u.arm)])
        scores = [sum(r[a] == taste[a] for a in OPEN) + int(r["shape"] == u.shape) for r in reads]
        best = max(range(len(images)), key=lambda i: (scores[i], -i))
        pick = int(rng.integers(len(images))) if rng.random() < u.noise else best
        tag = f"{u.user_id}-r{round_}"
        generation_pb2_grpc.GenerationServiceStub(self.channel).LogFeedback(pb.LogFeedbackRequest(
            feedback_id=f"{tag}-pick", user_id=u.user_id, generation_id=images[pick]["generation_id"],
            kind=pb.FEEDBACK_KIND_PICK,
            other_generation_ids=[im["generation_id"] for i, im in enumerate(images) if i != pick]))
        top = len(OPEN) + 1
        for i, (im, s) in enumerate(zip(images, scores)):
            rating = int(np.clip(np.rint(1 + 4 * s / top + rng.normal(0, self.args.rating_noise)), 1, 5))
            body = json.dumps({"feedback_id": f"{tag}-rate{i}", "user_id": u.user_id,
                               "generation_id": im["generation_id"], "kind": "FEEDBACK_KIND_RATING",
                               "value": float(rating)})  # proto JSON: the enum by name (v1 contract)
            req = urllib.request.Request(self.http_url, data=body.encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                resp.read()
        return 1 + len(images)


def oracle_joint(preset_dir: Path, bench: Bench, users: list[SimUser]) -> float:
    """The users' true favourites as the keyword segment, rendered as the worker renders a PMG request
    (content + keywords at the preset's keyword weight, the preset's sampler, the same per-user seed)."""
    from pigment.models.loader import preset_file
    from pigment.models.pipeline import Renderer, RenderInputs

    renderer = Renderer(preset_dir)
    cfg = preset_file(preset_dir, "preference.json")
    weight = float(json.loads(cfg.read_text()).get("keyword_weight", 1.0)) if cfg else 1.0
    batch = []
    for u in users:
        taste = u.taste(0, None)
        keywords = ", ".join(bench.tw.keyword(a, taste[a]) for a in OPEN)
        batch.append(RenderInputs(segments=[u.content, keywords], segment_weights=[1.0, weight], num_images=1,
                                  seed=1 + int(u.user.user_id.split("-")[-1])))
    hits = []
    for i in range(0, len(batch), 16):
        outs = renderer.render_batch(batch[i:i + 16])
        images = np.stack([np.asarray(o.images[0].convert("RGB")) for o in outs])
        for u, read in zip(users[i:i + 16], bench.probe.predict_values(images)):
            taste = u.taste(0, None)
            hits.append(all(read[a] == taste[a] for a in OPEN))
    return float(np.mean(hits))


def run(args) -> dict:
    import grpc
    from pigment.services.common.settings import Settings
    from pigment.services.stack import Stack, Worker
    from pigment.services.store.migrate import upgrade

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="pigment-online-"))
    settings = Settings(data_dir=data_dir, preset=args.preset, history_limit=5, render_timeout_s=900,
                        render_batch_window_ms=30, render_max_batch=8, max_queue_depth=10_000)
    upgrade(settings.database_url)
    stack = Stack(settings)
    worker = Worker(settings).start()
    server, port = stack.server(port=0)
    server.start()
    http = stack.http_server(0).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    t_start = time.perf_counter()
    try:
        bench = Bench(args, channel, f"http://127.0.0.1:{http.port}", stack.preset_dir)
        arms = {"feedback": bench.sim("fb"), "control": bench.sim("ctl"), "noise": bench.sim("nz", args.noise),
                "drift": bench.sim("dr", only_drift=True)}
        bench.ingest([u for users in arms.values() for u in users])
        print(f"[online] {len(bench.users)} held-out users; drift arm {len(arms['drift'])}", flush=True)
        rounds, noise, drift = [], [], []
        for r in range(max(args.rounds, args.drift_rounds) + 1):
            t0 = time.perf_counter()
            if r <= args.rounds:
                fb = bench.run_round(arms["feedback"], r, feedback=True)
                ctl = bench.run_round(arms["control"], r, feedback=False)
                nz = bench.run_round(arms["noise"], r, feedback=True)
                rounds.append({"round": r, "joint": fb["joint"], "control_joint": ctl["joint"],
                               "content_fidelity": fb["content_fidelity"],
                               "control_content_fidelity": ctl["content_fidelity"],
                               "n_feedback": fb["n_feedback"], "keywords_changed": fb["keywords_changed"],
                               "explored": fb["explored"]})
                noise.append({"round": r, "joint": nz["joint"], "content_fidelity": nz["content_fidelity"],
                              "n_feedback": nz["n_feedback"]})
            if r <= args.drift_rounds:
                dr = bench.run_round(arms["drift"], r, feedback=True, drift_at=args.drift_at)
                drift.append({"round": r, "joint": dr["joint"], "drifted": r >= args.drift_at,
                              "content_fidelity": dr["content_fidelity"], "n_feedback": dr["n_feedback"]})
            print(f"[online] round {r} ({time.perf_counter() - t0:.0f} s): "
                  f"{json.dumps(rounds[-1] if r <= args.rounds else {})} "
                  f"noise {json.dumps(noise[-1] if r <= args.rounds else {})} "
                  f"drift {json.dumps(drift[-1] if r <= args.drift_rounds else {})}", flush=True)
    finally:
        channel.close()
        http.stop()
        server.stop(grace=1).wait()
        stack.close()
        worker.stop()
    oracle = oracle_joint(stack.preset_dir, bench, arms["feedback"])
    for row in rounds:
        row["oracle_joint"] = oracle
    return {"rounds": rounds, "noise": noise, "drift": drift, "targets": targets(rounds, noise, drift, args),
            "config": vars(args), "label": "toy world (simulated held-out users; numbers say nothing of real users)",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
            "seconds": round(time.perf_counter() - t_start, 1)}


def targets(rounds, noise, drift, args) -> dict:
    first, last = rounds[0], rounds[-1]
    before = [d["joint"] for d in drift if d["round"] == args.drift_at - 1]
    after = [d["joint"] for d in drift if args.drift_at <= d["round"] <= args.drift_at + 2]
    recovered = bool(before and after and max(after) >= before[0] - 0.05)
    out = {
        "round3_joint": {"value": last["joint"], "target": ">= 0.90", "met": last["joint"] >= 0.90},
        "control_stays": {"value": round(max(abs(r["control_joint"] - first["control_joint"]) for r in rounds), 4),
                          "target": "<= 0.02", "met": all(abs(r["control_joint"] - first["control_joint"]) <= 0.02
                                                          for r in rounds)},
        "content_fidelity": {"value": round(abs(last["content_fidelity"] - first["content_fidelity"]), 4),
                             "target": "<= 0.05", "met": abs(last["content_fidelity"] - first["content_fidelity"])
                             <= 0.05},
        "noise_joint": {"value": noise[-1]["joint"], "target": ">= 0.85", "met": noise[-1]["joint"] >= 0.85},
        "drift_recovery": {"before_drift": before[0] if before else None, "after": after,
                           "target": "back within 0.05 of the pre-drift joint within 2 rounds",
                           "met": recovered},
    }
    return out


def plot(result: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = result["rounds"]
    xs = [r["round"] for r in rounds]
    for key, label in (("joint", "feedback"), ("control_joint", "control"), ("oracle_joint", "oracle"),
                       ("content_fidelity", "content fidelity")):
        ax.plot(xs, [r[key] for r in rounds], marker="o", label=label)
    ax.plot([n["round"] for n in result["noise"]], [n["joint"] for n in result["noise"]], marker="x",
            label="feedback, noisy picks")
    ax.plot([d["round"] for d in result["drift"]], [d["joint"] for d in result["drift"]], marker="s",
            linestyle="--", label="drifting users")
    ax.set_xlabel("round")
    ax.set_ylim(0, 1.05)
    ax.set_title("online personalization, toy world held-out users")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return str(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["plot"] = plot(result, out.with_suffix(".png"))
    out.write_text(json.dumps(result, indent=2))
    for r in result["rounds"]:
        print(f"round {r['round']}: joint {r['joint']:.3f}  control {r['control_joint']:.3f}  "
              f"oracle {r['oracle_joint']:.3f}  fidelity {r['content_fidelity']:.3f}  feedback {r['n_feedback']}")
    print(json.dumps(result["targets"], indent=1))
    print(f"wrote {out} ({result['plot']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
