"""ItemIndex: a FAISS index derived from SQL (SQLite in a tmp dir, tiny 16-d vectors)."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import threading
import time

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
# efSearch far above the catalog size: the graph search visits everything reachable.
EXHAUSTIVE_HNSW = IndexConfig(kind="hnsw", ef_search=1000, hnsw_m=16, hnsw_ef_construction=200)
# Every list probed and every candidate re-ranked exactly: IVF-PQ then equals brute force.
EXHAUSTIVE_IVFPQ = IndexConfig(kind="ivfpq", nprobe=1000, rerank=1000)
KINDS = [SMALL, EXHAUSTIVE_IVF, EXHAUSTIVE_IVFPQ, EXHAUSTIVE_HNSW]
KIND_IDS = ["flat", "ivf", "ivfpq", "hnsw"]


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
        assert index.wait_for_maintenance(60)  # the rebuild runs off the upsert path
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


@pytest.mark.parametrize("config", KINDS, ids=KIND_IDS)
def test_rebuild_equals_incremental(tmp_path, factory, config):
    rng = np.random.default_rng(3)
    n = 150 if config is SMALL else 400
    pks = add_items(factory, unit(rng, n // 2))  # hnsw: half in the graph, half added later
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


@pytest.mark.parametrize("config", KINDS, ids=KIND_IDS)
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


@pytest.mark.parametrize("config", KINDS, ids=KIND_IDS)
def test_exclude_list(tmp_path, factory, config):
    rng = np.random.default_rng(5)
    vectors = unit(rng, 150 if config is SMALL else 400)
    pks = add_items(factory, vectors)
    with open_index(tmp_path / "ix", factory, config=config) as index:
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
        (lambda f: f.write_bytes(b"\0" * f.stat().st_size), "fails its sha256 check"),
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


# --------------------------------------------------------------------------- integrity (issue 16)


def _flip_vector_bytes(index_file, vectors) -> None:
    """Corrupt in place, same size: one stored float becomes ~1e37 (FAISS still reads the file)."""
    data = bytearray(index_file.read_bytes())
    at = data.find(vectors[3].tobytes())  # the raw float32 row of one item
    assert at > 0
    data[at : at + 4] = np.float32(1e37).tobytes()
    index_file.write_bytes(bytes(data))


def test_corrupt_in_place_is_rebuilt_and_serves_correct_scores(tmp_path, factory, caplog):
    directory, index_file, vectors, pks = _saved(tmp_path, factory)
    size = index_file.stat().st_size
    _flip_vector_bytes(index_file, vectors)
    assert index_file.stat().st_size == size
    # Without the checksum this file loads and serves a score near 1e37 (what issue 16 saw).
    raw = faiss.read_index(str(index_file))
    e0 = np.eye(DIM, dtype=np.float32)[:1]
    scores, ids = raw.search(e0, 1)
    assert scores[0, 0] > 1e30 and ids[0, 0] == pks[3]
    with caplog.at_level(logging.WARNING), open_index(directory, factory) as index:
        got, scores = index.search(vectors[:10], 5)
        np.testing.assert_array_equal(got, brute_force(vectors, pks, vectors[:10], 5))
        np.testing.assert_allclose(
            scores, np.sort(vectors[:10] @ vectors.T, axis=1)[:, ::-1][:, :5], rtol=1e-5
        )
        assert index.search(e0, 1)[1][0, 0] == pytest.approx(vectors[:, 0].max(), rel=1e-5)
    assert "CORRUPT" in caplog.text and "fails its sha256 check" in caplog.text
    manifest = json.loads((directory / MANIFEST).read_text())
    rebuilt = directory / manifest["index_file"]
    assert hashlib.sha256(rebuilt.read_bytes()).hexdigest() == manifest["index_sha256"]


def test_hnsw_file_is_checksummed_and_round_trips(tmp_path, factory):
    rng = np.random.default_rng(20)
    vectors = unit(rng, 300)
    pks = add_items(factory, vectors)
    directory = tmp_path / "ix"
    with open_index(directory, factory, config=EXHAUSTIVE_HNSW) as index:
        change(factory, pks[:4], deleted=True)
        index.sync()
        before = index.search(vectors[:10], 5)
    with open_index(directory, factory, config=EXHAUSTIVE_HNSW) as index:
        assert index.kind == "hnsw" and index._index.pending == 4  # hidden state survived the save
        after = index.search(vectors[:10], 5)
        np.testing.assert_array_equal(before[0], after[0])
        assert not set(after[0].ravel()) & set(pks[:4])
    manifest = json.loads((directory / MANIFEST).read_text())
    index_file = directory / manifest["index_file"]
    data = bytearray(index_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index_file.write_bytes(bytes(data))
    with open_index(directory, factory, config=EXHAUSTIVE_HNSW) as index:
        assert index.ntotal == 296 and index._index.pending == 0  # rebuilt from SQL
        np.testing.assert_array_equal(index.search(vectors[:10], 5)[0], after[0])


# --------------------------------------------------------------------------- recall on the catalog (issue 22)


def clustered(rng, n, centres=8, spread=0.15):
    c = unit(rng, centres)
    x = c[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, DIM)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall_of(index, vectors, pks, effort, rows):
    """Held-out recall@10 measured here by brute force, independently of index_tuning."""
    from pigment.services.history.index_factory import search as raw_search

    own = np.asarray(pks)[rows]
    _, found = raw_search(index._index, vectors[rows], 11, effort)
    truth = brute_force(vectors, pks, vectors[rows], 11)
    hits = 0
    for f, t, o in zip(found, truth, own):
        hits += len(set(f[f != o][:10]) & set(t[t != o][:10]))
    return hits / (10 * len(rows))


def test_tuner_serves_the_smallest_nprobe_meeting_the_target(tmp_path, factory):
    rng = np.random.default_rng(21)
    vectors = unit(rng, 2000)  # no structure: IVF needs many lists for 0.95
    pks = add_items(factory, vectors)
    config = IndexConfig(kind="ivf", target_recall=0.8, recall_sample=300)
    with open_index(tmp_path / "ix", factory, config=config) as index:
        report = index.recall_report
        nprobe = index.search_effort
        assert report.tuned and report.effort_name == "nprobe" and report.effort == nprobe
        assert 1 < nprobe < index.stats()["nlist"]
        rows = np.random.default_rng(5).choice(2000, 300, replace=False)
        assert recall_of(index, vectors, pks, nprobe, rows) >= 0.77  # another sample: near target
        assert recall_of(index, vectors, pks, nprobe - 1, rows) < recall_of(
            index, vectors, pks, nprobe, rows
        )
        assert report.recall_at_10 >= 0.8 and report.meets_target and not index.recall_below_target
        by_effort = {c["effort"]: c["recall_at_10"] for c in report.curve}
        aim = 0.8 + config.tune_margin
        assert by_effort[nprobe] >= aim and by_effort.get(nprobe - 1, 0.0) < aim
    manifest = json.loads((tmp_path / "ix" / MANIFEST).read_text())
    assert manifest["search_effort"] == nprobe and manifest["recall"]["recall_at_10"] >= 0.8
    with open_index(tmp_path / "ix", factory, config=config) as index:  # restored, not re-tuned
        assert index.search_effort == nprobe and index.measured_recall() == report.recall_at_10


def test_recall_below_target_is_flagged(tmp_path, factory, caplog):
    rng = np.random.default_rng(22)
    add_items(factory, unit(rng, 2000))
    config = IndexConfig(kind="ivf", nprobe=1, target_recall=0.95)  # fixed effort: not tuned
    with (
        caplog.at_level(logging.WARNING),
        open_index(tmp_path / "ix", factory, config=config) as index,
    ):
        stats = index.stats()
        assert stats["recall_below_target"] is True and stats["recall_at_10"] < 0.95
        assert stats["recall"]["tuned"] is False and stats["search_effort"]["value"] == 1
    assert "RECALL BELOW TARGET" in caplog.text


def test_recall_is_remeasured_after_large_changes(tmp_path, factory):
    rng = np.random.default_rng(23)
    add_items(factory, clustered(rng, 1000))
    config = IndexConfig(kind="ivf", recall_sample=100)
    with open_index(tmp_path / "ix", factory, config=config) as index:
        first = index.recall_report
        add_items(factory, clustered(rng, 50))  # 5%: not yet
        index.sync()
        assert index.recall_report is first and index.stats()["changed_since_measure"] == 50
        add_items(factory, unit(rng, 80))  # 13% in all since the measurement
        index.sync()
        assert index.wait_for_maintenance(60)
        assert index.recall_report is not first and index.recall_report.ntotal == 1130
        assert index.stats()["changed_since_measure"] == 0


def test_auto_picks_ivf_on_clustered_and_hnsw_on_unstructured(tmp_path, factory):
    config = IndexConfig(flat_threshold=200, max_scan=300, max_scan_codes=300, recall_sample=100)
    rng = np.random.default_rng(24)
    add_items(factory, clustered(rng, 1200, centres=30, spread=0.05))
    with open_index(tmp_path / "a", factory, config=config) as index:
        assert index.kind == "ivf" and index.recall_report.meets_target
    other = make_sessionmaker(f"sqlite:///{tmp_path / 'other.sqlite'}")
    Base.metadata.create_all(other.kw["bind"])
    add_items(other, unit(rng, 1200))  # nprobe * list size would exceed max_scan
    with open_index(tmp_path / "b", other, config=config) as index:
        assert index.kind == "hnsw" and index.recall_report.meets_target
        assert index.recall_report.effort_name == "ef_search"


def test_auto_adds_pq_codes_when_ivf_scans_too_much_and_respects_the_build_budget(
    tmp_path, factory, caplog
):
    rng = np.random.default_rng(29)
    add_items(factory, unit(rng, 1200))  # IVF-Flat needs nprobe * list size > max_scan
    config = IndexConfig(flat_threshold=200, max_scan=300, recall_sample=100, target_recall=0.9)
    with open_index(tmp_path / "a", factory, config=config) as index:
        report = index.recall_report
        assert index.kind == "ivfpq" and report.meets_target and report.effort_name == "nprobe"
        assert index.stats()["nlist"] == index._index.nlist
    # Neither IVF kind within its bound, and no time for a graph: HNSW is not built at all and
    # the best measured IVF kind stays (tuned; flagged if it misses the target).
    tight = IndexConfig(
        flat_threshold=200, max_scan=300, max_scan_codes=300, recall_sample=100, build_budget_s=0.0
    )
    with (
        caplog.at_level(logging.WARNING),
        open_index(tmp_path / "b", factory, config=tight) as index,
    ):
        assert index.kind in ("ivf", "ivfpq") and index.recall_report.tuned
        assert index.recall_below_target == (index.recall_report.recall_at_10 < 0.95)
    assert "not building HNSW" in caplog.text and "build_budget_s" in caplog.text


def test_ivfpq_round_trip_checksum_filters_and_deletion(tmp_path, factory):
    rng = np.random.default_rng(30)
    vectors = unit(rng, 400)
    pks = add_items(factory, vectors[:300])
    pks += add_items(factory, vectors[300:], tenant="acme")
    directory = tmp_path / "ix"
    with open_index(directory, factory, config=EXHAUSTIVE_IVFPQ) as index:
        assert index.kind == "ivfpq"
        got, _ = index.search(vectors[:10], 5, tenant="acme")
        np.testing.assert_array_equal(got, brute_force(vectors, pks, vectors[:10], 5))
        got, _ = index.search(vectors[:10], 5)  # acme's 100 items are not candidates
        np.testing.assert_array_equal(got, brute_force(vectors[:300], pks[:300], vectors[:10], 5))
        change(factory, pks[:4], deleted=True)
        index.sync()
        raw = index._index
        for half in (raw.exact, raw.pq):  # removed from both halves, not hidden
            _, ids = half.search(vectors[:4], 3, params=faiss.SearchParametersIVF(nprobe=raw.nlist))
            assert not set(ids.ravel()) & set(pks[:4]) and half.ntotal == 396
        before = index.search(vectors[:10], 5, tenant="acme")
    with open_index(directory, factory, config=EXHAUSTIVE_IVFPQ) as index:
        assert index.kind == "ivfpq" and index.ntotal == 396
        after = index.search(vectors[:10], 5, tenant="acme")
        np.testing.assert_array_equal(before[0], after[0])
        np.testing.assert_allclose(before[1], after[1], rtol=1e-6)
    manifest = json.loads((directory / MANIFEST).read_text())
    index_file = directory / manifest["index_file"]
    assert hashlib.sha256(index_file.read_bytes()).hexdigest() == manifest["index_sha256"]
    data = bytearray(index_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index_file.write_bytes(bytes(data))
    with open_index(directory, factory, config=EXHAUSTIVE_IVFPQ) as index:
        assert index.kind == "ivfpq" and index.ntotal == 396  # rebuilt from SQL
        np.testing.assert_array_equal(index.search(vectors[:10], 5, tenant="acme")[0], after[0])


# --------------------------------------------------------------------------- HNSW deletion (issue 22)


def test_hnsw_delete_is_hidden_at_once_and_compacted_within_the_bound(tmp_path, factory):
    rng = np.random.default_rng(25)
    vectors = unit(rng, 300)
    pks = add_items(factory, vectors)
    config = IndexConfig(kind="hnsw", ef_search=1000, compact_after=5)
    with open_index(tmp_path / "ix", factory, config=config) as index:
        change(factory, pks[:3], deleted=True)
        index.sync()
        got, _ = index.search(vectors[:3], 10)
        assert not set(got.ravel()) & set(pks[:3])  # never served once sync returned ...
        assert (got >= 0).all()  # ... and filtered inside the search: full pages
        graph_ids = faiss.vector_to_array(index._index.graph.id_map)
        assert set(pks[:3]) <= set(graph_ids)  # ... though still physically in the graph
        assert index.stats()["pending_compaction"] == 3
        change(factory, pks[3:5], deleted=True)  # the 5th hidden vector reaches the bound
        index.sync()
        assert not set(index.search(vectors[:5], 10)[0].ravel()) & set(pks[:5])
        assert index.wait_for_maintenance(60)  # compaction: in the background, seconds later
        graph_ids = faiss.vector_to_array(index._index.graph.id_map)
        assert not set(pks[:5]) & set(graph_ids) and index._index.pending == 0
        assert index.ntotal == 295


def test_upsert_never_waits_for_a_rebuild_and_a_delete_during_it_stays_deleted(
    tmp_path, factory, monkeypatch
):
    rng = np.random.default_rng(31)
    vectors = unit(rng, 300)
    pks = add_items(factory, vectors[:150])
    release = threading.Event()
    real_build = ItemIndex._build_from_sql

    def slow_build(self):  # a 1M-item rebuild takes minutes: hold this one until released
        built = real_build(self)
        assert release.wait(60)
        return built

    with open_index(tmp_path / "ix", factory, config=EXHAUSTIVE_IVF) as index:
        monkeypatch.setattr(ItemIndex, "_build_from_sql", slow_build)
        pks += add_items(factory, vectors[150:])  # 300 items: calls for IVF
        started = time.perf_counter()
        assert index.sync() == 150
        change(factory, pks[200:203], deleted=True)  # GDPR delete while the IVF is being built
        assert index.sync() == 3
        assert time.perf_counter() - started < 10  # the upserts did not wait for the build
        assert index.kind == "flat" and index.ntotal == 297  # still the old index, up to date
        got, _ = index.search(vectors[200:203], 10)
        assert not set(got.ravel()) & set(pks[200:203])
        release.set()
        assert index.wait_for_maintenance(60)
        assert index.kind == "ivf" and index.ntotal == 297
        got, _ = index.search(vectors[195:205], 10)  # built before the delete, caught up since
        assert not set(got.ravel()) & set(pks[200:203])
        keep = [i for i in range(300) if not 200 <= i < 203]
        np.testing.assert_array_equal(
            got, brute_force(vectors[keep], [pks[i] for i in keep], vectors[195:205], 10)
        )


def test_hnsw_updated_vector_is_served_and_old_one_never(tmp_path, factory):
    rng = np.random.default_rng(26)
    vectors = unit(rng, 300)
    pks = add_items(factory, vectors)
    with open_index(tmp_path / "ix", factory, config=EXHAUSTIVE_HNSW) as index:
        fresh = unit(rng, 1)
        change(factory, [pks[0]], embedding=fresh.tobytes())
        index.sync()
        assert index.ntotal == 300
        got, scores = index.search(fresh, 1)
        assert got[0, 0] == pks[0] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
        got, _ = index.search(vectors[:1], 300)  # every item once, pks[0] scored by its new vector
        assert list(got[0]).count(pks[0]) == 1
        np.testing.assert_array_equal(np.sort(got[0]), np.sort(pks))


def test_gdpr_delete_user_is_never_served_on_hnsw(tmp_path, factory):
    from pigment.services.history.core import HistoryCore

    rng = np.random.default_rng(27)
    vectors = unit(rng, 300)
    add_items(factory, vectors[:250])
    private = add_items(factory, vectors[250:], tenant="solo")
    index = open_index(tmp_path / "ix", factory, config=EXHAUSTIVE_HNSW)
    core = HistoryCore(factory, storage=None, index_factory=lambda _embedder: index)
    core.ensure_user("u1", tenant="solo")
    try:
        got = [item.item_id for item, _ in core.search(vector=vectors[260], k=5, user_id="u1")]
        assert got[0] == f"item-{260}"
        assert core.delete_user("u1") == (0, 50)
        got, _ = index.search(vectors[250:], 10, tenant="solo")
        assert not set(got.ravel()) & set(private)
    finally:
        index.close()


# --------------------------------------------------------------------------- save on shutdown (issue 16)


def test_stack_close_saves_the_index(tmp_path, tiny_preset):
    from pigment.services.history.core import ItemRecord
    from pigment.services.stack import Stack
    from pigment.services.store.migrate import upgrade

    from tests.conftest import make_settings

    settings = make_settings(tmp_path, tiny_preset)
    upgrade(settings.database_url)
    stack = Stack(settings)
    stack.history.upsert_items([ItemRecord(f"a{i}", caption=f"red star {i}") for i in range(5)])
    first = json.loads((settings.index_dir / MANIFEST).read_text())
    stack.history.upsert_items([ItemRecord(f"b{i}", caption=f"blue moon {i}") for i in range(7)])
    assert json.loads((settings.index_dir / MANIFEST).read_text()) == first  # not saved yet
    stack.close()
    manifest = json.loads((settings.index_dir / MANIFEST).read_text())
    assert manifest["ntotal"] == 12 and manifest["high_water_mark"] > first["high_water_mark"]


@pytest.mark.parametrize(
    "config",
    [
        IndexConfig(kind="ivf", nprobe=1),
        IndexConfig(kind="ivfpq", nprobe=1),
        IndexConfig(kind="hnsw", ef_search=16),
    ],
    ids=["ivf", "ivfpq", "hnsw"],
)
def test_selective_tenant_filter_still_gives_exact_full_pages(tmp_path, factory, config):
    rng = np.random.default_rng(28)
    small = unit(rng, 20)
    small_pks = add_items(factory, small, tenant="small")
    big = add_items(factory, unit(rng, 2000), tenant="big")  # no public items at all
    with open_index(tmp_path / "ix", factory, config=config) as index:
        queries = unit(rng, 5)
        got, _ = index.search(queries, 10, tenant="small")
        # An unfiltered graph walk or one IVF list holds almost none of tenant small's items.
        np.testing.assert_array_equal(got, brute_force(small, small_pks, queries, 10))
        assert not set(got.ravel()) & set(big)


def test_cli_index_stats_and_measure_report_recall(tmp_path, tiny_preset, monkeypatch, capsys):
    from conftest import make_settings
    from pigment.services.cli import main
    from pigment.services.history.core import ItemRecord
    from pigment.services.stack import Stack
    from pigment.services.store.migrate import upgrade

    monkeypatch.setenv("PIGMENT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PIGMENT_PRESET", str(tiny_preset))
    monkeypatch.setenv("PIGMENT_INDEX_KIND", "ivf")
    monkeypatch.setenv("PIGMENT_RETRIEVAL_TARGET_RECALL", "0.99")
    settings = make_settings(tmp_path, tiny_preset)
    upgrade(settings.database_url)
    stack = Stack(settings)
    stack.history.upsert_items([ItemRecord(f"i{n}", caption=f"item number {n}") for n in range(60)])
    stack.close()
    assert main(["index", "measure"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["kind"] == "ivf" and stats["target_recall"] == 0.99
    assert stats["recall"]["sample"] == 6  # a tenth of the catalog at most
    assert stats["search_effort"]["name"] == "nprobe"
    # The tiny CLIP embeds these captions almost alike (ties), so only the flag's consistency is exact.
    assert 0.0 < stats["recall_at_10"] <= 1.0
    assert stats["recall_below_target"] is (stats["recall_at_10"] < 0.99)
    assert main(["index", "stats"]) == 0
    assert json.loads(capsys.readouterr().out)["recall_at_10"] == stats["recall_at_10"]


def test_serve_saves_the_index_on_sigterm(tmp_path, tiny_preset):
    """Issue 16: after a clean stop the manifest held 64 items while SQL had 216."""
    import os
    import signal

    import grpc
    from pigment.v1 import history_pb2, history_pb2_grpc

    env = {
        **os.environ,
        "PIGMENT_DATA_DIR": str(tmp_path / "data"),
        "PIGMENT_PRESET": str(tiny_preset),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "pigment.services.cli", "serve", "--no-worker", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        while line and "pigment serving on" not in line:
            line = proc.stdout.readline()
        port = int(line.split(" on ")[1].split(" ")[0].rsplit(":", 1)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = history_pb2_grpc.HistoryServiceStub(channel)
            for batch in range(3):
                items = [
                    history_pb2.Item(item_id=f"s{batch}-{i}", caption=f"thing {batch} {i}")
                    for i in range(8)
                ]
                stub.UpsertItems(history_pb2.UpsertItemsRequest(items=items), timeout=120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    manifest = json.loads((tmp_path / "data" / "index" / MANIFEST).read_text())
    assert manifest["ntotal"] == 24 and manifest["high_water_mark"] == 24
