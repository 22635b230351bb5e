"""A toy world where personalization is measurable.

Items are 32x32 pictures drawn from four attributes (shape, colour, background,
size) with captions built from the same attributes ("a large red star on a dark
background"). Users have a latent taste (a favourite value per attribute with a
strength; broad, narrow or drifting) and an interaction sequence sampled from it.
Samples are sliding windows of six interactions (five history + one target),
split 8:1:1 per user in time order, plus a "test-users" split of users never seen
in training. Everything is deterministic from ``seed``.

Writers export the same world as PMG unified JSON, Pigeon-style sequence dicts
(JSON, never pickle) and plain records for the history service.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
_SUPERSAMPLE = 4
WINDOW = 6  # five history interactions + one target
SPLITS = ("train", "val", "test", "test-users")

ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "star", "heart", "cross"],
    "colour": ["red", "orange", "yellow", "green", "blue", "purple"],
    "background": ["dark", "grey", "light"],
    "size": ["small", "large"],
}
# Order in which keywords are listed (and the LLM is taught to write them).
KEYWORD_ORDER = ("colour", "background", "size", "shape")

COLOUR_RGB = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (150, 50, 190),
}
BACKGROUND_RGB = {"dark": (25, 25, 35), "grey": (128, 128, 128), "light": (235, 235, 225)}
SIZE_RADIUS = {"small": 0.2, "large": 0.38}  # fraction of the canvas
USER_KINDS = ("broad", "narrow", "drift")


def keyword(attr: str, value: str) -> str:
    """The keyword string for one attribute value ("dark background", "red", ...)."""
    return f"{value} background" if attr == "background" else value


def keywords_table() -> dict[str, list[str]]:
    """attribute -> allowed keyword strings (what ``keywords.json`` holds)."""
    return {attr: [keyword(attr, v) for v in ATTRIBUTES[attr]] for attr in KEYWORD_ORDER}


def item_keywords(attrs: dict[str, str], order: Iterable[str] = KEYWORD_ORDER) -> list[str]:
    return [keyword(a, attrs[a]) for a in order if a in attrs]


def caption(attrs: dict[str, str], keep: Iterable[str] | None = None) -> str:
    """Caption from attributes; ``keep`` names the attributes to mention (default: all).

    >>> caption({"shape": "star", "colour": "red", "background": "dark", "size": "large"})
    'a large red star on a dark background'
    >>> caption({"shape": "star", "colour": "red"}, keep={"shape"})
    'a star'
    """
    keep = set(attrs) if keep is None else set(keep) & set(attrs)
    words = ["a"]
    if "size" in keep:
        words.append(attrs["size"])
    if "colour" in keep:
        words.append(attrs["colour"])
    words.append(attrs["shape"] if "shape" in keep else "shape")
    if "background" in keep:
        words += ["on", "a", attrs["background"], "background"]
    return " ".join(words)


def parse_caption(text: str) -> dict[str, str]:
    """Attributes mentioned in a caption or keyword string (inverse of ``caption``)."""
    tokens = text.replace(",", " ").split()
    found: dict[str, str] = {}
    for i, tok in enumerate(tokens):
        if tok in ATTRIBUTES["background"] and i + 1 < len(tokens) and tokens[i + 1] == "background":
            found["background"] = tok
            continue
        for attr in ("shape", "colour", "size"):
            if tok in ATTRIBUTES[attr]:
                found[attr] = tok
    return found


# --------------------------------------------------------------------------- drawing
def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.82
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * 1.05 * math.sin(a) + 0.12 * r)
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 16.5, cy - r * (y + 2.5) / 16.5))
        return pts
    if shape == "cross":
        w, h = r * 0.36, r
        return [(cx - w, cy - h), (cx + w, cy - h), (cx + w, cy - w), (cx + h, cy - w),
                (cx + h, cy + w), (cx + w, cy + w), (cx + w, cy + h), (cx - w, cy + h),
                (cx - w, cy + w), (cx - h, cy + w), (cx - h, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r}; allowed: {ATTRIBUTES['shape']}")


def render_item(attrs: dict[str, str], rng: np.random.Generator | None = None,
                size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one item as a uint8 HxWx3 array; ``rng`` adds small position/size/colour jitter."""
    s = size * _SUPERSAMPLE
    jit = (lambda lo, hi: rng.uniform(lo, hi)) if rng is not None else (lambda lo, hi: 0.0)
    bg = np.clip(np.array(BACKGROUND_RGB[attrs["background"]]) + jit(-8, 8), 0, 255)
    fg = np.clip(np.array(COLOUR_RGB[attrs["colour"]]) + [jit(-12, 12) for _ in range(3)], 0, 255)
    r = SIZE_RADIUS[attrs["size"]] * s * (1 + jit(-0.07, 0.07))
    slack = max(0.0, 0.5 * s - r - 0.04 * s)
    shift = min(slack, 0.07 * s)
    cx, cy = s / 2 + jit(-shift, shift), s / 2 + jit(-shift, shift)
    img = Image.new("RGB", (s, s), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)
    colour = tuple(int(v) for v in fg)
    if attrs["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(_shape_polygon(attrs["shape"], cx, cy, r), fill=colour)
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- entities
@dataclass
class Item:
    item_id: str
    index: int
    attributes: dict[str, str]
    caption: str
    image: np.ndarray = field(repr=False)

    @property
    def keywords(self) -> list[str]:
        return item_keywords(self.attributes)


@dataclass
class User:
    """A latent taste: attr -> (favourite value, strength in [0, 1]).

    ``strength`` is the probability that a choice takes the favourite value;
    otherwise the value is uniform over all values. Drifting users switch to
    ``taste_after`` from interaction ``drift_at`` on.
    """

    user_id: str
    kind: str
    taste: dict[str, tuple[str, float]]
    n_interactions: int
    taste_after: dict[str, tuple[str, float]] | None = None
    drift_at: int | None = None

    def taste_at(self, t: int) -> dict[str, tuple[str, float]]:
        if self.taste_after is not None and self.drift_at is not None and t >= self.drift_at:
            return self.taste_after
        return self.taste


@dataclass(frozen=True)
class Interaction:
    user_id: str
    item_id: str
    ts: int  # unix seconds


@dataclass(frozen=True)
class Sample:
    """One sliding window: five history items then the target, oldest first."""

    user_id: str
    start: int
    item_ids: tuple[str, ...]

    @property
    def history(self) -> tuple[str, ...]:
        return self.item_ids[:-1]

    @property
    def target(self) -> str:
        return self.item_ids[-1]


# --------------------------------------------------------------------------- the world
class ToyWorld:
    """Items, users, interactions and samples, all deterministic from ``seed``."""

    def __init__(self, seed: int = 0, n_items: int = 1296, n_users: int = 400,
                 test_user_fraction: float = 0.1, t0: int = 1_700_000_000):
        if n_items < 1 or n_users < 1:
            raise ValueError(f"need n_items >= 1 and n_users >= 1, got {n_items}, {n_users}")
        self.seed, self.n_items, self.n_users = seed, n_items, n_users
        self.test_user_fraction, self.t0 = test_user_fraction, t0
        self.items = self._make_items()
        self.item_by_id = {it.item_id: it for it in self.items}
        self.users = self._make_users()
        self.interactions = self._make_interactions()

    # ---- items
    def _make_items(self) -> list[Item]:
        rng = np.random.default_rng([self.seed, 1])
        combos = all_combinations()
        items = []
        order: list[int] = []
        for i in range(self.n_items):
            if not order:  # every combination once per cycle, in a seeded order
                order = list(rng.permutation(len(combos)))
            attrs = combos[order.pop()]
            image = render_item(attrs, rng)
            items.append(Item(f"item-{i:05d}", i, attrs, caption(attrs), image))
        return items

    @cached_property
    def _items_by_combo(self) -> dict[tuple[str, ...], list[Item]]:
        table: dict[tuple[str, ...], list[Item]] = {}
        for it in self.items:
            table.setdefault(_combo_key(it.attributes), []).append(it)
        return table

    # ---- users
    def _make_users(self) -> list[User]:
        rng = np.random.default_rng([self.seed, 2])
        return [self._make_user(f"user-{u:04d}", USER_KINDS[u % 3], rng) for u in range(self.n_users)]

    @staticmethod
    def _taste(rng: np.random.Generator, lo: float, hi: float) -> dict[str, tuple[str, float]]:
        return {a: (str(rng.choice(vals)), float(round(rng.uniform(lo, hi), 3)))
                for a, vals in ATTRIBUTES.items()}

    def _make_user(self, user_id: str, kind: str, rng: np.random.Generator) -> User:
        n = int(rng.choice([15, 25, 35]))  # 10, 20 or 30 windows -> exact 8:1:1
        if kind == "narrow":
            return User(user_id, kind, self._taste(rng, 0.85, 0.97), n)
        if kind == "broad":
            return User(user_id, kind, self._taste(rng, 0.25, 0.55), n)
        before = self._taste(rng, 0.8, 0.95)
        after = self._taste(rng, 0.8, 0.95)
        return User(user_id, kind, before, n, taste_after=after, drift_at=n // 2)

    # ---- interactions
    def _choose(self, user: User, t: int, rng: np.random.Generator) -> Item:
        want = {}
        for attr, (fav, strength) in user.taste_at(t).items():
            want[attr] = fav if rng.random() < strength else str(rng.choice(ATTRIBUTES[attr]))
        pool = self._items_by_combo.get(_combo_key(want))
        if not pool:  # small worlds: the closest items
            score = [sum(it.attributes[a] == v for a, v in want.items()) for it in self.items]
            best = max(score)
            pool = [it for it, s in zip(self.items, score) if s == best]
        return pool[int(rng.integers(len(pool)))]

    def _make_interactions(self) -> list[Interaction]:
        rng = np.random.default_rng([self.seed, 3])
        out = []
        for user in self.users:
            ts = self.t0 + int(rng.integers(0, 86_400))
            for t in range(user.n_interactions):
                ts += int(rng.integers(60, 7_200))
                out.append(Interaction(user.user_id, self._choose(user, t, rng).item_id, ts))
        return out

    def sequences(self) -> dict[str, list[str]]:
        """user_id -> item ids in time order."""
        seqs: dict[str, list[str]] = {u.user_id: [] for u in self.users}
        for it in sorted(self.interactions, key=lambda x: (x.user_id, x.ts)):
            seqs[it.user_id].append(it.item_id)
        return seqs

    # ---- samples and splits
    @cached_property
    def test_user_ids(self) -> frozenset[str]:
        rng = np.random.default_rng([self.seed, 4])
        k = int(round(self.n_users * self.test_user_fraction)) if self.n_users > 1 else 0
        return frozenset(str(u) for u in rng.choice([u.user_id for u in self.users], k, replace=False))

    @cached_property
    def _splits(self) -> dict[str, list[Sample]]:
        out: dict[str, list[Sample]] = {s: [] for s in SPLITS}
        for uid, seq in self.sequences().items():
            windows = [Sample(uid, i, tuple(seq[i:i + WINDOW])) for i in range(len(seq) - WINDOW + 1)]
            if uid in self.test_user_ids:
                out["test-users"] += windows
                continue
            n_eval = max(1, int(round(0.1 * len(windows))))
            n_train = len(windows) - 2 * n_eval  # time order: train, then val, then test
            out["train"] += windows[:n_train]
            out["val"] += windows[n_train:n_train + n_eval]
            out["test"] += windows[n_train + n_eval:]
        return out

    def samples(self, split: str) -> list[Sample]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; allowed: {SPLITS}")
        return list(self._splits[split])

    # ---- exporters
    def write_images(self, image_dir: str | Path, item_ids: Iterable[str] | None = None) -> None:
        image_dir = Path(image_dir)
        image_dir.mkdir(parents=True, exist_ok=True)
        for iid in (item_ids if item_ids is not None else self.item_by_id):
            path = image_dir / f"{iid}.png"
            if not path.exists():
                path.write_bytes(png_bytes(self.item_by_id[iid].image))

    def _pmg_item(self, iid: str, image_prefix: str) -> dict[str, str]:
        return {"item_id": iid, "caption": self.item_by_id[iid].caption,
                "image_path": f"{image_prefix}/{iid}.png"}

    def pmg_records(self, split: str, image_prefix: str = "images") -> list[dict[str, Any]]:
        return [{"user_id": s.user_id,
                 "history_items_info": [self._pmg_item(i, image_prefix) for i in s.history],
                 "target_item_info": self._pmg_item(s.target, image_prefix)}
                for s in self.samples(split)]

    def export_pmg_json(self, path: str | Path, split: str, image_dir: str = "images") -> list[dict]:
        """PMG unified JSON (a list, one record per sample); images go to ``image_dir``
        beside the JSON file and ``image_path`` is relative to the JSON file."""
        path = Path(path)
        records = self.pmg_records(split, image_dir)
        used = {r["target_item_info"]["item_id"] for r in records}
        used |= {h["item_id"] for r in records for h in r["history_items_info"]}
        self.write_images(path.parent / image_dir, sorted(used))
        path.write_text(json.dumps(records, indent=1) + "\n")
        return records

    def export_pigeon(self, out_dir: str | Path) -> dict[str, Any]:
        """Pigeon-style files as JSON: ``mapped_user_dict.json`` {uid: {gid: [iid...]}},
        ``{train,valid,test,test_users}.json`` {uid: {gid: [[6 iids]...]}},
        ``all_image_paths.json`` and ``item_semantics.json`` indexed by integer iid.
        Pigeon's gid (a theme) is the user's kind here."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        idx = {it.item_id: it.index for it in self.items}
        kind = {u.user_id: u.kind for u in self.users}
        files: dict[str, Any] = {
            "mapped_user_dict": {uid: {kind[uid]: [idx[i] for i in seq]}
                                 for uid, seq in self.sequences().items()},
            "all_image_paths": [f"{it.item_id}.png" for it in self.items],
            "item_semantics": [it.caption for it in self.items],
        }
        for split, name in zip(SPLITS, ("train", "valid", "test", "test_users")):
            table: dict[str, dict[str, list[list[int]]]] = {}
            for s in self.samples(split):
                table.setdefault(s.user_id, {}).setdefault(kind[s.user_id], []).append(
                    [idx[i] for i in s.item_ids])
            files[name] = table
        for name, obj in files.items():
            (out / f"{name}.json").write_text(json.dumps(obj) + "\n")
        self.write_images(out / "images")
        return files

    def history_records(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Plain records for the history service: (items, interactions)."""
        items = [{"item_id": it.item_id, "caption": it.caption, "png": png_bytes(it.image),
                  "attributes": dict(it.attributes)} for it in self.items]
        inter = [{"user_id": x.user_id, "item_id": x.item_id, "ts": x.ts} for x in self.interactions]
        return items, inter


def all_combinations() -> list[dict[str, str]]:
    combos: list[dict[str, str]] = [{}]
    for attr, values in ATTRIBUTES.items():
        combos = [{**c, attr: v} for c in combos for v in values]
    return combos


def _combo_key(attrs: dict[str, str]) -> tuple[str, ...]:
    return tuple(attrs[a] for a in ATTRIBUTES)


def load_pmg_json(path: str | Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())


def draw_attributes(rng: np.random.Generator, n: int, weights: dict[str, dict[str, float]] | None = None
                    ) -> list[dict[str, str]]:
    """``n`` attribute combinations; ``weights`` (attr -> {value: relative weight}, unnamed values 1)
    oversamples values, e.g. the ones a renderer draws worst; without it every value is equally likely."""
    if not weights:
        return [{a: str(rng.choice(v)) for a, v in ATTRIBUTES.items()} for _ in range(n)]
    probs = {a: np.array([weights.get(a, {}).get(v, 1.0) for v in vals]) for a, vals in ATTRIBUTES.items()}
    return [{a: str(rng.choice(vals, p=probs[a] / probs[a].sum())) for a, vals in ATTRIBUTES.items()}
            for _ in range(n)]


def random_items(n: int, seed: int, weights: dict[str, dict[str, float]] | None = None
                 ) -> tuple[list[dict[str, str]], np.ndarray]:
    """``n`` fresh items (attributes, uint8 N,32,32,3) independent of any world; for probes/tests.
    ``weights``: as ``draw_attributes``."""
    rng = np.random.default_rng([seed, 98 if weights else 99])  # weighted draws use their own stream
    attrs = draw_attributes(rng, n, weights)
    return attrs, np.stack([render_item(a, rng) for a in attrs]) if n else np.zeros((0, 32, 32, 3), np.uint8)


def attribute_indices(attrs: list[dict[str, str]]) -> dict[str, np.ndarray]:
    """attr -> int64 array of value indices (the probe's label format)."""
    return {a: np.array([ATTRIBUTES[a].index(x[a]) for x in attrs], dtype=np.int64) for a in ATTRIBUTES}
