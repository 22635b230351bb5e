"""ItemIndex: a FAISS index derived from SQL (SQLite in a tmp dir, tiny 16-d vectors)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import faiss
import numpy as np
import pytest
from pigment.services.common.errors import FailedPrecondition, InvalidInput, ModelNotReady
from pigment.services.history.index import MANIFEST, IndexConfig, ItemIndex
from pigment.services.store.db import make_sessionmaker, next_counter, transaction
from pigment.services.store.tables import Base, Item
from sqlalchemy import update

DIM = 16
MODEL = "clip-test"
SMALL = IndexConfig(flat_threshold=200)  # IVF from 200 items on
EXHAUSTIVE_IVF = IndexConfig(flat_threshold=200, nprobe=1000)  # nprobe >= nlist: exact


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def factory(tmp_path):
    factory = make_sessionmaker(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(factory.kw["bind"])
    return factory


def add_items(factory, vectors, tenant=None, model=MODEL) -> list[int]:
    """What the history core does: insert rows with fresh change_seq values in one transaction."""
    with transaction(factory) as s:
        last = next_counter(s, "items", by=len(vectors))
        count = s.query(Item).count()
        items = [
            Item(
                item_id=f"item-{count + i}",
                tenant=tenant,
                embedding=v.tobytes(),
                embedding_model=model,
                change_seq=last - len(vectors) + 1 + i,
            )
            for i, v in enumerate(vectors)
        ]
        s.add_all(items)
        s.flush()
        return [it.pk for it in items]


def change(factory, pks, **values) -> None:
    """Update (e.g. deleted=True, embedding=...) and bump change_seq, one value per row."""
    with transaction(factory) as s:
        last = next_counter(s, "items", by=len(pks))
        for i, pk in enumerate(pks):
            s.execute(
                update(Item)
                .where(Item.pk == pk)
                .values(change_seq=last - len(pks) + 1 + i, **values)
            )


def open_index(path, factory, config=SMALL, **kw) -> ItemIndex:
    return ItemIndex.open(path, factory, MODEL, DIM, config=config, **kw)


def brute_force(vectors: np.ndarray, pks: list[int], queries: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]
    return np.asarray(pks)[order]


@pytest.mark.parametrize("n, kind", [(150, "flat"), (400, "ivf")])
def test_kind_follows_catalog_size(tmp_path, factory, n, kind):
    rng = np.random.default_rng(0)
    add_items(factory, unit(rng, n))
    with open_index(tmp_path / "ix", factory) as index:
        assert index.kind == kind and index.ntotal == n


def test_flat_grows_into_ivf_on_sync(tmp_path, factory):
    rng = np.random.default_rng(1)
    first, second = unit(rng, 100), unit(rng, 200)
    pks = add_items(factory, first)
    with open_index(tmp_path / "ix", factory, config=EXHAUSTIVE_IVF) as index:
        assert index.kind == "flat"
        pks += add_items(factory, second)
        assert index.sync() == 200
        assert index.kind == "ivf" and index.ntotal == 300
        got, _ = index.search(second[:5], 1)
        assert got[:, 0].tolist() == pks[100:105]


@pytest.mark.parametrize("config", [SMALL, EXHAUSTIVE_IVF], ids=["flat", "ivf"])
def test_delete_really_removes(tmp_path, factory, config):
    rng = np.random.default_rng(2)
    n = 150 if config is SMALL else 400
    vectors = unit(rng, n)
    pks = add_items(factory, vectors)
    with open_index(tmp_path / "ix", factory, config=config) as index:
        gone = pks[:5]
        change(factory, gone, deleted=True)
        assert index.sync() == 5
        assert index.ntotal == n - 5
        got, _ = index.search(vectors[:5], 10)
        assert not set(got.ravel()) & set(gone)
        # Also gone from the FAISS structure itself, not only hidden by a selector.
        _raw_scores, raw = index._index.search(vectors[:5], 1)
        assert not set(raw.ravel()) & set(gone)


@pytest.mark.parametrize("config", [SMALL, EXHAUSTIVE_IVF], ids=["flat", "ivf"])
def test_rebuild_equals_incremental(tmp_path, factory, config):
    rng = np.random.default_rng(3)
    n = 150 if config is SMALL else 400
    pks = add_items(factory, unit(rng, n // 2))
    with open_index(tmp_path / "ix", factory, config=config) as index:
        pks += add_items(factory, unit(rng, n - n // 2), tenant="acme")
        change(factory, pks[10:20], deleted=True)
        change(factory, pks[30:32], embedding=unit(rng, 1).tobytes())
        index.sync()
        queries = unit(rng, 20)
        incremental = index.search(queries, 10, tenant="acme")
        index.rebuild()
        rebuilt = index.search(queries, 10, tenant="acme")
    np.testing.assert_array_equal(incremental[0], rebuilt[0])
    np.testing.assert_allclose(incremental[1], rebuilt[1], rtol=1e-5)


@pytest.mark.parametrize("config", [SMALL, EXHAUSTIVE_IVF], ids=["flat", "ivf"])
def test_tenant_isolation_is_inside_the_search(tmp_path, factory, config):
    rng = np.random.default_rng(4)
    n_public = 100 if config is SMALL else 300
    centre = unit(rng, 1)
    near = centre + 0.05 * unit(
        rng, 50
    )  # tenant B's items are all closer to the query than anything else
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    public = add_items(factory, unit(rng, n_public))
    acme = add_items(factory, unit(rng, 20), tenant="acme")
    other = add_items(factory, near, tenant="other")
    with open_index(tmp_path / "ix", factory, config=config) as index:
        for tenant, allowed in [("acme", public + acme), (None, public), ("other", public + other)]:
            got, _scores = index.search(centre, 10, tenant=tenant)
            assert set(got[0]) <= set(allowed), tenant
            # A full page of 10: filtering happened inside FAISS, not on its top 10 afterwards.
            assert (got[0] >= 0).all()
        got, _ = index.search(centre, 10, tenant="other")
        assert set(got[0]) <= set(other)


def test_exclude_list(tmp_path, factory):
    rng = np.random.default_rng(5)
    vectors = unit(rng, 150)
    pks = add_items(factory, vectors)
    with open_index(tmp_path / "ix", factory) as index:
        query = vectors[:1]
        before, _ = index.search(query, 10)
        after, _ = index.search(query, 10, exclude_pks=before[0, :3].tolist())
        assert after[0, :7].tolist() == before[0, 3:].tolist()
        assert not set(after[0]) & set(before[0, :3])
        np.testing.assert_array_equal(before, brute_force(vectors, pks, query, 10))


def test_bad_queries_raise_invalid_input(tmp_path, factory):
    add_items(factory, unit(np.random.default_rng(6), 20))
    with open_index(tmp_path / "ix", factory) as index:
        with pytest.raises(InvalidInput, match=r"expects \(16,\) or \(n, 16\)"):
            index.search(np.zeros((2, 8), np.float32), 5)
        bad = np.ones((3, DIM), np.float32)
        bad[1, 4] = np.nan
        with pytest.raises(InvalidInput, match=r"NaN or infinite values \(rows \[1\]\)"):
            index.search(bad, 5)
        with pytest.raises(InvalidInput, match="k=0 is out of range"):
            index.search(np.ones(DIM), 0)


def _saved(tmp_path, factory, n=150):
    rng = np.random.default_rng(7)
    vectors = unit(rng, n)
    pks = add_items(factory, vectors)
    directory = tmp_path / "ix"
    open_index(directory, factory).close()
    manifest = json.loads((directory / MANIFEST).read_text())
    return directory, directory / manifest["index_file"], vectors, pks


def _assert_exact(index, vectors, pks):
    got, _ = index.search(vectors[:10], 5)
    np.testing.assert_array_equal(got, brute_force(vectors, pks, vectors[:10], 5))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda f: f.unlink(), "is missing"),
        (lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]), "truncated"),
        (lambda f: f.write_bytes(b"\0" * f.stat().st_size), "unreadable"),
    ],
    ids=["missing", "truncated", "corrupt"],
)
def test_damaged_index_file_is_rebuilt(tmp_path, factory, caplog, damage, reason):
    directory, index_file, vectors, pks = _saved(tmp_path, factory)
    damage(index_file)
    with caplog.at_level(logging.WARNING), open_index(directory, factory) as index:
        assert index.ntotal == len(pks)
        _assert_exact(index, vectors, pks)
    assert "rebuilding item index" in caplog.text and reason in caplog.text


def test_index_of_another_model_is_rebuilt(tmp_path, factory, caplog):
    directory, _, vectors, pks = _saved(tmp_path, factory)
    with (
        caplog.at_level(logging.WARNING),
        open_index(directory, factory, model_hash="sha256:new") as index,
    ):
        _assert_exact(index, vectors, pks)
    assert "built for (model, hash, dim)=('clip-test', None, 16)" in caplog.text
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["model_hash"] == "sha256:new"


def test_missing_manifest_is_rebuilt(tmp_path, factory, caplog):
    directory, _, vectors, pks = _saved(tmp_path, factory)
    (directory / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING), open_index(directory, factory) as index:
        _assert_exact(index, vectors, pks)
    assert "no manifest" in caplog.text


def test_crash_between_commit_and_save_is_healed_by_catch_up(tmp_path, factory, caplog):
    directory, _, vectors, pks = _saved(tmp_path, factory)
    index = open_index(directory, factory)
    rng = np.random.default_rng(8)
    fresh = unit(rng, 30)
    pks_fresh = add_items(factory, fresh)  # committed to SQL ...
    change(factory, pks[:3], deleted=True)
    index.sync()  # ... applied in memory, but the process dies before save():
    index._lock.release()
    del index

    caplog.clear()
    with caplog.at_level(logging.INFO), open_index(directory, factory) as index:
        assert "rebuilding" not in caplog.text  # healed by catch-up, not by a rebuild
        assert index.ntotal == len(pks) - 3 + 30
        got, _ = index.search(fresh[:5], 1)
        assert got[:, 0].tolist() == pks_fresh[:5]
        got, _ = index.search(vectors[:3], 10)
        assert not set(got.ravel()) & set(pks[:3])
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["high_water_mark"] == 150 + 30 + 3
    assert manifest["ntotal"] == len(pks) - 3 + 30


def test_save_is_atomic_and_leaves_one_index_file(tmp_path, factory):
    directory, index_file, _, _ = _saved(tmp_path, factory)
    with open_index(directory, factory) as index:
        add_items(factory, unit(np.random.default_rng(9), 5))
        index.sync()
        index.save()
    files = sorted(p.name for p in directory.iterdir())
    assert [f for f in files if f.endswith(".faiss")] != [index_file.name]
    assert len([f for f in files if f.endswith(".faiss")]) == 1
    assert not [f for f in files if f.endswith(".tmp")]


def test_second_writer_is_refused(tmp_path, factory):
    add_items(factory, unit(np.random.default_rng(10), 20))
    directory = tmp_path / "ix"
    with open_index(directory, factory):
        with pytest.raises(FailedPrecondition, match="already open for writing"):
            open_index(directory, factory)
        script = (
            "import sys; from pigment.services.history.index import ItemIndex;"
            "from pigment.services.store.db import make_sessionmaker;"
            "ItemIndex.open(sys.argv[1], make_sessionmaker(sys.argv[2]), 'clip-test', 16)"
        )
        proc = subprocess.run(
            [sys.executable, "-c", script, str(directory), f"sqlite:///{tmp_path / 'db.sqlite'}"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0 and "already open for writing" in proc.stderr
        with open_index(directory, factory, read_only=True) as replica:
            assert replica.ntotal == 20
    open_index(directory, factory).close()  # released on close


@pytest.mark.skipif(
    faiss.get_num_gpus() > 0 if hasattr(faiss, "get_num_gpus") else False, reason="GPU present"
)
def test_gpu_asked_for_but_absent_raises(tmp_path, factory):
    with pytest.raises(ModelNotReady, match="use_gpu=True"):
        open_index(tmp_path / "ix", factory, config=IndexConfig(use_gpu=True))


def test_sync_is_idempotent_and_follows_tenant_changes(tmp_path, factory):
    rng = np.random.default_rng(11)
    vectors = unit(rng, 50)
    pks = add_items(factory, vectors)
    with open_index(tmp_path / "ix", factory) as index:
        assert index.sync() == 0
        change(factory, pks[:1], tenant="acme")  # public -> private
        assert index.sync() == 1 and index.sync() == 0
        assert pks[0] not in index.search(vectors[:1], 5)[0][0]
        assert index.search(vectors[:1], 5, tenant="acme")[0][0, 0] == pks[0]
        assert index.ntotal == 50


def test_rows_deleted_outright_are_dropped_at_open(tmp_path, factory, caplog):
    directory, _, vectors, pks = _saved(tmp_path, factory)
    with transaction(factory) as s:  # a hard DELETE leaves no change_seq to catch up on
        s.query(Item).filter(Item.pk.in_(pks[:4])).delete()
    with caplog.at_level(logging.WARNING), open_index(directory, factory) as index:
        assert index.ntotal == len(pks) - 4
        assert not set(index._index.search(vectors[:4], 3)[1].ravel()) & set(pks[:4])
    assert "removing 4 vectors with no live item row" in caplog.text
