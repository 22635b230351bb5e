"""`pigment demo`: the embedded stack end to end, for people to look at.

Seeds a demo catalog and users with distinct tastes over gRPC, asks
GeneratePersonalized for the same content ("a star") for each user, and writes
the images, ``summary.json`` and ``contact_sheet.png`` (history row, generated
row and keywords per user).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
from pigment.services.common.settings import Settings
from pigment.v1 import generation_pb2 as gen_pb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc
from PIL import Image, ImageDraw

# user -> attributes every history item shares (shapes vary; stars are left out,
# so the star in each result comes from the prompt, its look from the history).
DEMO_USERS: dict[str, dict[str, str]] = {
    "alice": {"colour": "red", "background": "dark", "size": "large"},
    "bob": {"colour": "blue", "background": "light", "size": "small"},
    "carol": {"colour": "yellow", "background": "grey", "size": "large"},
    "dave": {},  # no history: shows the non-personalized fallback and its flag
}
HISTORY_SHAPES = ("circle", "square", "triangle", "heart", "cross", "circle")
DEMO_PROMPT = "a star"
THUMB = 64


class Timer:
    def __init__(self):
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        print(f"[demo] {name} ...", flush=True)
        yield
        self.stages[name] = round(time.perf_counter() - t0, 3)
        print(f"[demo] {name}: {self.stages[name]:.2f}s", flush=True)


def demo_histories(world) -> dict[str, list]:
    """Pick each user's history items from the catalog by their shared attributes."""
    out = {}
    for user, taste in DEMO_USERS.items():
        items = []
        for shape in HISTORY_SHAPES if taste else ():
            want = {**taste, "shape": shape}
            match = [it for it in world.items if all(it.attributes[a] == v for a, v in want.items())]
            items.append(match[len(items) % len(match)])
        out[user] = items
    return out


def seed(channel, world, histories, timer: Timer) -> None:
    from pigment.training.toy_world import png_bytes

    history = history_pb2_grpc.HistoryServiceStub(channel)
    with timer.stage("seed catalog (UpsertItems, CLIP embeddings, FAISS index)"):
        for i in range(0, len(world.items), 64):
            batch = world.items[i:i + 64]
            history.UpsertItems(history_pb2.UpsertItemsRequest(items=[
                history_pb2.Item(item_id=it.item_id, caption=it.caption, image_png=png_bytes(it.image),
                                 attributes=it.attributes) for it in batch]))
    with timer.stage("seed users (LogInteractions)"):
        # fixed timestamps: a second `make demo` on the same data dir logs exact duplicates, which the
        # preference reads once, instead of doubling every history (HISTORY_TRUNCATED on the re-run)
        t0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
        for user, items in histories.items():
            inter = [history_pb2.Interaction(item_id=it.item_id, kind="like", value=1.0, timestamp_ms=t0 + 1000 * n)
                     for n, it in enumerate(items)]
            history.LogInteractions(history_pb2.LogInteractionsRequest(user_id=user, interactions=inter,
                                                                       create_user=True))


def contact_sheet(rows: list[tuple[str, list[Image.Image], list[Image.Image], str]], path: Path) -> None:
    hist_cols = max(len(r[1]) for r in rows)
    gen_cols = max(len(r[2]) for r in rows)
    label_w, gap, text_h = 70, 24, 18
    width = label_w + (hist_cols + gen_cols) * (THUMB + 4) + gap
    height = len(rows) * (THUMB + text_h + 12) + 24
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((label_w, 4), "history (oldest first)", fill="black")
    draw.text((label_w + hist_cols * (THUMB + 4) + gap, 4), f"generated for {DEMO_PROMPT!r}", fill="black")
    for r, (user, hist, gens, keywords) in enumerate(rows):
        y = 24 + r * (THUMB + text_h + 12)
        draw.text((4, y + THUMB // 2 - 6), user, fill="black")
        for c, img in enumerate(hist):
            sheet.paste(img.resize((THUMB, THUMB), Image.NEAREST), (label_w + c * (THUMB + 4), y))
        x0 = label_w + hist_cols * (THUMB + 4) + gap
        for c, img in enumerate(gens):
            sheet.paste(img.resize((THUMB, THUMB), Image.NEAREST), (x0 + c * (THUMB + 4), y))
        draw.text((x0, y + THUMB + 2), keywords[:90], fill="black")
    sheet.save(path)


def run_demo(settings: Settings, out_dir: Path, num_images: int = 4) -> dict:
    from pigment.services.stack import Stack, Worker
    from pigment.services.store.migrate import upgrade
    from pigment.training.toy_world import ToyWorld

    timer = Timer()
    out_dir.mkdir(parents=True, exist_ok=True)
    with timer.stage(f"load preset {settings.preset!r}"):
        stack = Stack(settings)
    with timer.stage("migrate database (alembic upgrade head)"):
        upgrade(settings.database_url)
    with timer.stage("start render worker (Celery) and gRPC server"):
        worker = Worker(settings).start()
        server, port = stack.server(port=0)
        server.start()
    try:
        world = ToyWorld(seed=0, n_items=216, n_users=1)
        histories = demo_histories(world)
        channel = grpc.insecure_channel(f"{settings.host}:{port}")
        seed(channel, world, histories, timer)
        gen = generation_pb2_grpc.GenerationServiceStub(channel)
        stamp = time.strftime("%Y%m%d%H%M%S")
        rows, users = [], {}
        for user, items in histories.items():
            with timer.stage(f"GeneratePersonalized {user}"):
                resp = gen.GeneratePersonalized(gen_pb.GenerateRequest(
                    request_id=f"demo-{user}-{stamp}", user_id=user, prompt=DEMO_PROMPT, num_images=num_images))
            user_dir = out_dir / user
            user_dir.mkdir(exist_ok=True)
            paths = []
            for n, img in enumerate(resp.images):
                path = user_dir / f"{n}.png"
                path.write_bytes(img.png)
                paths.append(str(path))
            gens = [Image.open(p).convert("RGB") for p in paths]
            rows.append((user, [Image.fromarray(it.image) for it in items], gens, ", ".join(resp.keywords) or
                         " ".join(resp.flags)))
            users[user] = {"history": [it.caption for it in items], "keywords": list(resp.keywords),
                           "flags": list(resp.flags), "images": paths, "model_version": resp.model_version,
                           "generation_ids": [i.generation_id for i in resp.images],
                           "timings_ms": dict(resp.timings_ms)}
        with timer.stage("write contact sheet"):
            contact_sheet(rows, out_dir / "contact_sheet.png")
        channel.close()
    finally:
        server.stop(grace=5).wait()
        worker.stop()
    summary = {"preset": str(stack.preset_dir), "prompt": DEMO_PROMPT, "users": users, "stages_s": timer.stages,
               "data_dir": str(settings.data_dir)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n[demo] wrote {out_dir / 'contact_sheet.png'}, {out_dir / 'summary.json'} and per-user images under "
          f"{out_dir}/<user>/")
    for user, info in users.items():
        print(f"[demo]   {user:6s} keywords: {', '.join(info['keywords']) or '-'}  flags: {', '.join(info['flags']) or '-'}")
    print("[demo] stage timings (s): " + ", ".join(f"{k}: {v}" for k, v in timer.stages.items()))
    return summary
