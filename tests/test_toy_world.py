"""The toy world (determinism, splits, exporters), the shipped `toy` preset, and tiny trainer runs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pigment.training import toy_world as tw
from PIL import Image

PRESET = Path(__file__).resolve().parents[1] / "models" / "presets" / "toy"
needs_preset = pytest.mark.skipif(not (PRESET / "manifest.json").is_file(), reason="toy preset not built")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world() -> tw.ToyWorld:
    return tw.ToyWorld(seed=3, n_items=240, n_users=40)


# --------------------------------------------------------------------------- world
def test_deterministic_from_seed(world):
    again = tw.ToyWorld(seed=3, n_items=240, n_users=40)
    assert [i.caption for i in again.items] == [i.caption for i in world.items]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(again.items, world.items))
    assert again.interactions == world.interactions
    other = tw.ToyWorld(seed=4, n_items=240, n_users=40)
    assert other.interactions != world.interactions


def test_items_cover_attributes_and_captions_parse(world):
    assert len(tw.ATTRIBUTES["shape"]) >= 6 and len(tw.ATTRIBUTES["colour"]) >= 6
    assert world.items[0].image.shape == (32, 32, 3) and world.items[0].image.dtype == np.uint8
    assert len({tuple(i.attributes.values()) for i in world.items}) == len(tw.all_combinations())
    for item in world.items[:50]:
        assert tw.parse_caption(item.caption) == item.attributes
        assert tw.parse_caption(", ".join(item.keywords)) == item.attributes
    attrs = {"shape": "star", "colour": "red", "background": "dark", "size": "large"}
    assert tw.caption(attrs) == "a large red star on a dark background"
    assert tw.caption(attrs, keep={"shape", "size", "background"}) == "a large star on a dark background"


def test_users_have_broad_narrow_and_drifting_tastes(world):
    kinds = {u.kind for u in world.users}
    assert kinds == {"broad", "narrow", "drift"}
    for u in world.users:
        assert set(u.taste) == set(tw.ATTRIBUTES)
        assert all(v in tw.ATTRIBUTES[a] and 0 <= s <= 1 for a, (v, s) in u.taste.items())
        if u.kind == "drift":
            assert u.taste_at(0) != u.taste_at(u.n_interactions - 1)
    narrow = [u for u in world.users if u.kind == "narrow"]
    broad = [u for u in world.users if u.kind == "broad"]
    assert min(s for u in narrow for _, s in u.taste.values()) > max(s for u in broad for _, s in u.taste.values())


def test_splits_are_windows_of_six_disjoint_and_8_1_1(world):
    seqs = world.sequences()
    keys = {}
    for split in tw.SPLITS:
        for s in world.samples(split):
            assert len(s.item_ids) == 6 and list(s.item_ids) == seqs[s.user_id][s.start:s.start + 6]
            assert (s.user_id, s.start) not in keys
            keys[(s.user_id, s.start)] = split
    n = {s: len(world.samples(s)) for s in tw.SPLITS}
    assert n["train"] == 8 * n["val"] == 8 * n["test"]
    seen = {s.user_id for s in world.samples("train")}
    unseen = {s.user_id for s in world.samples("test-users")}
    assert unseen and not seen & unseen and unseen == set(world.test_user_ids)
    with pytest.raises(ValueError, match="allowed"):
        world.samples("dev")


def test_pmg_json_round_trip(world, tmp_path):
    world.export_pmg_json(tmp_path / "val.json", "val")
    records = tw.load_pmg_json(tmp_path / "val.json")
    assert len(records) == len(world.samples("val"))
    rec = records[0]
    assert set(rec) == {"user_id", "history_items_info", "target_item_info"}
    assert len(rec["history_items_info"]) == 5
    tgt = rec["target_item_info"]
    assert set(tgt) == {"item_id", "caption", "image_path"}
    assert tgt["caption"] == world.item_by_id[tgt["item_id"]].caption
    img = np.asarray(Image.open(tmp_path / tgt["image_path"]).convert("RGB"))
    assert np.array_equal(img, world.item_by_id[tgt["item_id"]].image)


def test_pigeon_export_round_trip(world, tmp_path):
    world.export_pigeon(tmp_path)
    paths = json.loads((tmp_path / "all_image_paths.json").read_text())
    semantics = json.loads((tmp_path / "item_semantics.json").read_text())
    train = json.loads((tmp_path / "train.json").read_text())
    windows = [w for by_gid in train.values() for ws in by_gid.values() for w in ws]
    assert len(windows) == len(world.samples("train"))
    first = world.samples("train")[0]
    assert [paths[i] for i in windows[0]] == [f"{iid}.png" for iid in first.item_ids]
    assert semantics[windows[0][-1]] == world.item_by_id[first.target].caption
    assert (tmp_path / "images" / paths[0]).is_file()
    users = json.loads((tmp_path / "mapped_user_dict.json").read_text())
    assert set(users) == {u.user_id for u in world.users}


def test_history_records(world):
    items, inter = world.history_records()
    assert len(items) == len(world.items) and len(inter) == len(world.interactions)
    first = items[0]
    assert set(first) == {"item_id", "caption", "png", "attributes"}
    img = np.asarray(Image.open(io.BytesIO(first["png"])).convert("RGB"))
    assert np.array_equal(img, world.items[0].image)
    assert set(inter[0]) == {"user_id", "item_id", "ts"} and isinstance(inter[0]["ts"], int)


# --------------------------------------------------------------------------- shipped preset
@needs_preset
def test_preset_components_load_and_budget():
    from pigment.models.loader import load_component, read_manifest
    manifest = read_manifest(PRESET)
    assert manifest["preset"] == "toy" and {"num_inference_steps", "guidance_scale"} <= set(manifest["defaults"])
    for name, entry in manifest["components"].items():
        assert entry["training_command"].startswith(("python -m pigment.training.train_toy", "pigment train pmg", "pigment train reference"))
        assert "data_seed" in entry
        assert load_component(PRESET, name) is not None
    total = sum(p.stat().st_size for p in PRESET.rglob("*.safetensors"))
    assert total < 40e6
    keywords = json.loads((PRESET / "keywords.json").read_text())
    assert set(keywords) == set(tw.ATTRIBUTES) and "dark background" in keywords["background"]


@needs_preset
def test_probe_scores_fresh_heldout_images():
    from pigment.models.loader import load_component
    probe = load_component(PRESET, "probe")
    attrs, images = tw.random_items(400, seed=20240601)
    pred, true = probe.predict(images), tw.attribute_indices(attrs)
    for attr in tw.ATTRIBUTES:
        assert (pred[attr] == true[attr]).mean() >= 0.98, attr


@needs_preset
def test_llm_writes_parseable_keywords():
    from pigment.models.loader import load_component
    from pigment.training.train_keyword_llm import format_prompt, generate_keywords
    llm, tok = load_component(PRESET, "llm"), load_component(PRESET, "llm_tokenizer")
    pref = json.loads((PRESET / "preference.json").read_text())
    caps = [tw.caption({"shape": s, "colour": "red", "background": "dark", "size": "large"})
            for s in ("star", "circle", "star", "heart", "star")]
    assert format_prompt(caps) == pref["keyword_template"].format(
        history="\n".join(pref["history_line"].format(i=i + 1, caption=c) for i, c in enumerate(caps)))
    kws = generate_keywords(llm, tok, [format_prompt(caps)])[0]
    allowed = {k for ks in json.loads((PRESET / "keywords.json").read_text()).values() for k in ks}
    assert kws and set(kws) <= allowed and "red" in kws


def test_llm_augmentation_keeps_what_the_history_says(world):
    """Relabelled and shuffled windows keep each attribute's counts and the target's place in them."""
    from pigment.training.train_keyword_llm import KEYWORD_RE, augmented, format_prompt

    rng = np.random.default_rng(0)
    items = world.item_by_id
    relabelled = shuffled = 0
    for s in world.samples("train")[:50]:
        history = [items[i].attributes for i in s.history]
        target = items[s.target].attributes
        prompt, answer, new_target = augmented((history, target), rng)
        new_history = [tw.parse_caption(line.split(". ", 1)[1]) for line in prompt.splitlines()[1:-1]]
        assert len(new_history) == len(history) and prompt == format_prompt([tw.caption(h) for h in new_history])
        assert [m.group(2) for m in KEYWORD_RE.finditer(answer)] == tw.item_keywords(new_target)
        for a in tw.ATTRIBUTES:
            old = [h[a] for h in history]
            new = [h[a] for h in new_history]
            assert sorted(map(old.count, old)) == sorted(map(new.count, new))  # same count profile
            assert old.count(target[a]) == new.count(new_target[a])  # the target keeps its history count
        relabelled += new_target != target
        shuffled += [h["shape"] for h in new_history] != [h["shape"] for h in history]
    assert relabelled > 40 and shuffled > 10  # both augmentations actually happen


@needs_preset
def test_renderer_renders_four_images():
    from pigment.models.loader import load_component, read_manifest
    from pigment.training.train_renderer import build_pipeline, render
    parts = {n: load_component(PRESET, n) for n in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    pipe = build_pipeline(**parts)
    defaults = read_manifest(PRESET)["defaults"]
    images = render(pipe, [["a star", "red, dark background, large"]] * 4, seed=0, **defaults)
    assert images.shape == (4, 32, 32, 3)
    assert np.isfinite(images).all() and images.std() > 0  # rendered, not blank (speed: bench/, not a test)


# --------------------------------------------------------------------------- trainers, tiny
def test_trainers_run_tiny(tmp_path):
    from pigment.models.loader import load_component
    from pigment.training import train_clip, train_keyword_llm, train_probe, train_renderer
    from pigment.training.train_toy import merge_metrics, save_renderer, write_preset_manifest

    merge_metrics(tmp_path, "probe", {"command": "python -m pigment.training.train_toy --only probe"})
    train_probe.train_probe(tmp_path, steps=2, n_train=64, batch_size=16, n_heldout=16,
                            progress=False)
    vae, _ = train_renderer.train_vae(2, batch_size=4, n_images=16, progress=False)
    vae.save_pretrained(tmp_path / "vae")
    first, _ = train_renderer.train_unet(vae, 2, batch_size=4, n_images=16, progress=False)
    before = {k: v.clone() for k, v in first.unet.state_dict().items()}
    pipe, m = train_renderer.train_unet(vae, 2, batch_size=4, n_images=16, progress=False, init=first)  # anneal
    save_renderer(pipe, tmp_path)
    assert np.isfinite(m["final_loss"]) and pipe.tokenizer is first.tokenizer
    assert all(torch.equal(before[k], v) for k, v in first.unet.state_dict().items())  # init is not trained in place
    assert any(not torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    train_clip.train_clip(tmp_path, steps=2, batch_size=8, n_images=32, n_eval=8, progress=False)
    small = tw.ToyWorld(seed=1, n_items=216, n_users=12)
    train_keyword_llm.train_keyword_llm(tmp_path, steps=2, batch_size=4, world=small, n_eval=4,
                                        progress=False)
    from pigment.training.train_subject_encoder import train_subject_encoder
    enc = train_subject_encoder(tmp_path, steps=2, batch_subjects=4, views=2, per_subject=4, progress=False)
    assert np.isfinite(enc["loss_last"]) and 0 <= enc["heldout_shape_accuracy"] <= 1
    (tmp_path / "preference.json").write_text(json.dumps({"soft_weight": 0.5}))  # tuned after a PMG eval
    manifest = write_preset_manifest(tmp_path, seed=0)
    assert set(manifest["components"]) >= {"probe", "vae", "unet", "clip", "llm", "scheduler", "reference_encoder"}
    for name in ("probe", "unet", "clip_tokenizer", "llm", "scheduler", "reference_encoder"):
        assert load_component(tmp_path, name) is not None
    # Top-level entries other commands added (an edit table, retrain settings, the sampler dtype) survive a rewrite.
    extra = {**manifest, "retrain": {"every": 3}, "files": {**manifest["files"], "edit": "edit.json"},
             "defaults": {**manifest["defaults"], "dtype": "fp32"}}
    (tmp_path / "manifest.json").write_text(json.dumps(extra))
    manifest = write_preset_manifest(tmp_path, seed=0)
    assert manifest["retrain"] == {"every": 3} and manifest["files"]["edit"] == "edit.json"
    assert manifest["defaults"]["dtype"] == "fp32" and manifest["files"]["metrics"] == "training_metrics.json"

    # Rewriting the manifest after a stage keeps what other commands added: the PMG head and its weights.
    from pigment.models.preference_head import PreferenceHead
    from pigment.training.train_pmg import install
    PreferenceHead(16, 16).save_pretrained(tmp_path / "head")
    install(tmp_path / "head", tmp_path, "pigment train pmg --config x")
    manifest = write_preset_manifest(tmp_path, seed=0)
    assert manifest["components"]["preference_head"]["training_command"] == "pigment train pmg --config x"
    pref = json.loads((tmp_path / "preference.json").read_text())
    assert pref["soft_weight"] == 0.5 and pref["soft_weight_alone"] == 1.0 and "keyword_template" in pref

    # The anneal's and the focus run's commands follow the UNet's, in order; dropping them (as
    # retraining the UNet does) leaves the UNet's alone.
    merge_metrics(tmp_path, "unet", {"command": "U"})
    merge_metrics(tmp_path, "unet_focus", {"command": "F"})
    merge_metrics(tmp_path, "unet_anneal", {"command": "A"})
    assert write_preset_manifest(tmp_path, seed=0)["components"]["unet"]["training_command"] == "U && A && F"
    merge_metrics(tmp_path, "unet_anneal", None)
    merge_metrics(tmp_path, "unet_focus", None)
    assert write_preset_manifest(tmp_path, seed=0)["components"]["unet"]["training_command"] == "U"


def test_focus_items_oversample_the_named_values():
    from pigment.training.train_renderer import FOCUS

    plain, _ = tw.random_items(600, seed=5)
    focused, images = tw.random_items(600, seed=5, weights=FOCUS)
    share = lambda items, a, v: np.mean([it[a] == v for it in items])
    assert abs(share(plain, "shape", "star") - 1 / 6) < 0.05 and abs(share(focused, "shape", "star") - 0.30) < 0.05
    assert abs(share(focused, "size", "small") - 0.65) < 0.05 and abs(share(focused, "background", "grey") - 0.45) < 0.05
    assert abs(share(focused, "colour", "red") - 1 / 6) < 0.05  # colour is not focused
    assert images.shape == (600, 32, 32, 3) and tw.random_items(600, seed=5)[0] == plain  # deterministic


def test_train_toy_stages_load_earlier_stages_through_the_loader(tmp_path, monkeypatch):
    """One `train_toy` run of several stages: each finds the previous ones' output in the manifest
    (unet_anneal loads the unet this way; a whole-zoo run from scratch used to fail there)."""
    from pigment.models.loader import load_component
    from pigment.training import train_clip, train_keyword_llm, train_toy

    seen = []

    def clip_stage(out, steps, seed, progress):
        return train_clip.train_clip(out, steps=steps, batch_size=8, n_images=32, n_eval=8, progress=False)

    def llm_stage(out, steps, seed, progress):
        seen.append(load_component(out, "clip"))  # sha256-checked against the manifest written after clip
        small = tw.ToyWorld(seed=1, n_items=216, n_users=12)
        return train_keyword_llm.train_keyword_llm(out, steps=steps, batch_size=4, world=small, n_eval=4,
                                                   progress=False)

    monkeypatch.setitem(train_toy.RUNNERS, "clip", clip_stage)
    monkeypatch.setitem(train_toy.RUNNERS, "llm", llm_stage)
    train_toy.main(["--out", str(tmp_path), "--only", "clip,llm", "--steps", "clip=2,llm=2", "--no-progress"])
    assert seen and seen[0] is not None
    assert {"clip", "llm"} <= set(train_toy.read_manifest(tmp_path)["components"])
