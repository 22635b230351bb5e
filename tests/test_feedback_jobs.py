"""Closing the loop: HTTP feedback, batch poster jobs through real gRPC + a real worker (including a worker
killed mid-job and a cancel), the registry stamping versions on generations, and preference pairs."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from conftest import make_settings, running_stack
from google.rpc import code_pb2
from pigment.services.registry import Registry
from pigment.services.store.tables import Generation, JobUser, RenderRequest
from pigment.training.pairs import GenerationInfo, Pair, auto_pairs, build_pairs, load_feedback
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc
from safetensors.torch import save_file
from sqlalchemy import func, select

CATALOG = [("red-circle", "a large red circle on a dark background"),
           ("blue-star", "a small blue star on a light background")]
USERS = ["u0", "u1", "u2", "u3", "u4", "u5"]


@pytest.fixture(scope="module")
def loop(tmp_path_factory, tiny_preset):
    """A running stack (gRPC, HTTP feedback, one solo worker) with a few users; the worker may be replaced."""
    settings = make_settings(tmp_path_factory.mktemp("loop"), tiny_preset)
    with running_stack(settings) as (stack, channel, worker):
        history = history_pb2_grpc.HistoryServiceStub(channel)
        history.UpsertItems(history_pb2.UpsertItemsRequest(
            items=[history_pb2.Item(item_id=i, caption=c) for i, c in CATALOG]))
        for n, user in enumerate(["alice", "bob", *USERS]):
            history.LogInteractions(history_pb2.LogInteractionsRequest(
                user_id=user, create_user=True, tenant="posters" if user in ("u4", "u5") else "",
                interactions=[history_pb2.Interaction(item_id=CATALOG[n % 2][0], kind="like")]))
        http = stack.http_server(0).start()
        state = {"stack": stack, "channel": channel, "worker": worker, "http": http, "settings": settings,
                 "stub": generation_pb2_grpc.GenerationServiceStub(channel)}
        yield state
        http.stop()
        if state["worker"] is not worker:
            state["worker"].kill()  # a test worker: no need to wait for a warm shutdown


def generate(loop, request_id: str, user: str = "alice", n: int = 2) -> gpb.GenerateResponse:
    return loop["stub"].GeneratePersonalized(gpb.GenerateRequest(
        request_id=request_id, user_id=user, prompt="a star", num_images=n, num_inference_steps=2), timeout=120)


def post(loop, body, path="/v1/feedback") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{loop['http'].port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_job(stub, job_id: str, until=lambda j: j.status not in (gpb.JOB_STATUS_QUEUED, gpb.JOB_STATUS_RUNNING), timeout: float = 90):
    deadline = time.monotonic() + timeout
    while True:
        job = stub.GetJob(gpb.GetJobRequest(job_id=job_id), timeout=10).job
        if until(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} stuck: {job}"
        time.sleep(0.05)


# -- feedback -------------------------------------------------------------------------------------------
def test_http_feedback_end_to_end_and_pairs_from_it(loop):
    first = generate(loop, "fb-1")
    a, b = (i.generation_id for i in first.images)
    bob = generate(loop, "fb-bob", user="bob", n=1).images[0].generation_id

    with urllib.request.urlopen(f"http://127.0.0.1:{loop['http'].port}/healthz", timeout=10) as resp:
        assert resp.status == 200 and json.loads(resp.read()) == {"status": "ok"}
    pick = {"feedback_id": "fb-pick-1", "user_id": "alice", "generation_id": a, "kind": "FEEDBACK_KIND_PICK",
            "other_generation_ids": [b]}
    assert post(loop, pick) == (201, {"duplicate": False})
    assert post(loop, pick) == (200, {"duplicate": True})  # the same content again: a replay
    status, err = post(loop, {**pick, "generation_id": b, "other_generation_ids": [a]})  # the id, other content
    assert status == 409 and err["code"] == code_pb2.ALREADY_EXISTS and "different content" in err["message"]
    assert post(loop, {"feedback_id": "fb-r1", "user_id": "alice", "generation_id": a, "kind": "FEEDBACK_KIND_RATING",
                       "value": 5})[0] == 201
    assert post(loop, {"feedback_id": "fb-r2", "user_id": "alice", "generation_id": b, "kind": "FEEDBACK_KIND_DISLIKE"})[0] == 201

    status, err = post(loop, {"feedback_id": "fb-x", "user_id": "alice", "generation_id": "nope", "kind": "FEEDBACK_KIND_LIKE"})
    assert status == 404 and err["code"] == code_pb2.NOT_FOUND
    status, err = post(loop, {"feedback_id": "fb-y", "user_id": "alice", "generation_id": bob, "kind": "FEEDBACK_KIND_LIKE"})
    assert status == 403 and "another user" in err["message"]
    status, err = post(loop, {"feedback_id": "fb-z", "user_id": "alice", "generation_id": a, "kind": "FEEDBACK_KIND_RATING",
                              "value": 9})
    assert status == 400 and "1..5" in err["message"]
    assert post(loop, b"{not json")[0] == 400
    assert post(loop, {"feedback_id": "fb-w", "user_id": "alice", "generation_id": a, "kind": "FEEDBACK_KIND_WOW"})[0] == 400
    assert post(loop, {}, path="/v1/other")[0] == 404

    with loop["stack"].sessions() as s:
        feedback, gens = load_feedback(s)
        # everything needed to reproduce and learn from a generation joins from its row
        g = s.get(Generation, a)
        req = s.get(RenderRequest, g.request_id)
        shown = s.scalars(select(Generation.generation_id).where(Generation.request_id == g.request_id)).all()
    assert req.params["prompt"] == "a star" and req.conditioning["segments"] and g.seed and g.model_version
    assert set(shown) == {a, b} and g.method == "pmg"
    assert [f.feedback_id for f in feedback] == ["fb-pick-1", "fb-r1", "fb-r2"]
    pairs = build_pairs(feedback, gens)
    assert {(p.chosen, p.rejected, p.source) for p in pairs} == {(a, b, "pick")}  # the rating agrees: one pair


# -- batch jobs -------------------------------------------------------------------------------------------
def test_batch_job_through_grpc_and_worker(loop):
    stub = loop["stub"]
    request = gpb.SubmitBatchRequest(job_id="job-basic", user_ids=["u0", "u1", "u2"], prompt="a star",
                                     images_per_user=2, num_inference_steps=1, chunk_size=2)
    job = stub.SubmitBatch(request, timeout=30).job
    assert job.total == 3 and job.status in (gpb.JOB_STATUS_QUEUED, gpb.JOB_STATUS_RUNNING)
    job = wait_job(stub, "job-basic")
    assert (job.status, job.done, job.failed) == (gpb.JOB_STATUS_DONE, 3, 0)
    assert {r.user_id for r in job.results} == {"u0", "u1", "u2"}
    with loop["stack"].sessions() as s:
        for r in job.results:
            assert r.status == gpb.USER_RESULT_STATUS_DONE and len(r.generation_ids) == 2
            rows = s.scalars(select(Generation).where(Generation.generation_id.in_(r.generation_ids))).all()
            assert {g.user_id for g in rows} == {r.user_id} and {g.request_id for g in rows} == {f"job-basic-{r.user_id}"}

    replay = stub.SubmitBatch(request, timeout=30).job  # idempotent by job_id: same results, nothing redone
    assert [list(r.generation_ids) for r in replay.results] == [list(r.generation_ids) for r in job.results]
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitBatch(gpb.SubmitBatchRequest(job_id="job-basic", user_ids=["u0"], prompt="a moon"), timeout=30)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitBatch(gpb.SubmitBatchRequest(job_id="job-bad", user_ids=["ghost"]), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.GetJob(gpb.GetJobRequest(job_id="nope"), timeout=10).job
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # Results come in pages (a 100k-user job would not fit one message); the counts always cover everyone.
    first = stub.GetJob(gpb.GetJobRequest(job_id="job-basic", page_size=2), timeout=10).job
    second = stub.GetJob(gpb.GetJobRequest(job_id="job-basic", page_size=2, page_token=first.next_page_token),
                         timeout=10).job
    assert len(first.results) == 2 and first.next_page_token and (first.total, first.done) == (3, 3)
    assert len(second.results) == 1 and second.next_page_token == "" and second.done == 3
    assert [r.user_id for r in [*first.results, *second.results]] == [r.user_id for r in job.results]
    for bad in (gpb.GetJobRequest(job_id="job-basic", page_size=-1),
                gpb.GetJobRequest(job_id="job-basic", page_size=10_001),
                gpb.GetJobRequest(job_id="job-basic", page_token="not-a-token")):
        with pytest.raises(grpc.RpcError) as err:
            stub.GetJob(bad, timeout=10).job
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_" in err.value.details()


def test_job_resumes_after_worker_is_killed_without_redoing_users(loop):
    from pigment.services.stack import Worker

    stub = loop["stub"]
    stub.SubmitBatch(gpb.SubmitBatchRequest(job_id="job-kill", user_ids=USERS, prompt="a star",
                                            images_per_user=1, num_inference_steps=3, chunk_size=2), timeout=30)
    before = wait_job(stub, "job-kill", until=lambda j: j.done >= 1 or j.status == gpb.JOB_STATUS_DONE)
    loop["worker"].kill()
    before = stub.GetJob(gpb.GetJobRequest(job_id="job-kill"), timeout=10).job
    assert before.status != gpb.JOB_STATUS_DONE, "the job finished before the kill; make it longer"
    done_before = {r.user_id: list(r.generation_ids) for r in before.results if r.status == gpb.USER_RESULT_STATUS_DONE}

    loop["worker"] = Worker(loop["settings"], log_path=loop["settings"].data_dir / "worker2.log").start()
    after = wait_job(stub, "job-kill")
    assert (after.status, after.done, after.failed) == (gpb.JOB_STATUS_DONE, len(USERS), 0)
    with loop["stack"].sessions() as s:
        rows = {r.user_id: r for r in s.scalars(select(JobUser).where(JobUser.job_id == "job-kill"))}
        per_request = dict(s.execute(select(Generation.request_id, func.count()).group_by(Generation.request_id)
                                     .where(Generation.request_id.like("job-kill-%"))).all())
    for user, gids in done_before.items():  # finished users were not redone
        assert rows[user].attempts == 1 and rows[user].generation_ids == gids
    assert per_request == {f"job-kill-{u}": 1 for u in USERS}


def test_cancel_stops_pending_users(loop):
    stub = loop["stub"]
    stub.SubmitBatch(gpb.SubmitBatchRequest(job_id="job-cancel", user_ids=USERS, prompt="a star",
                                            images_per_user=1, num_inference_steps=3, chunk_size=3), timeout=30)
    cancelled = stub.CancelJob(gpb.CancelJobRequest(job_id="job-cancel"), timeout=10).job
    assert cancelled.status == gpb.JOB_STATUS_CANCELLED
    job = wait_job(stub, "job-cancel", until=lambda j: all(r.status not in (gpb.USER_RESULT_STATUS_PENDING, gpb.USER_RESULT_STATUS_RUNNING) for r in j.results))
    statuses = [r.status for r in job.results]
    assert set(statuses) <= {gpb.USER_RESULT_STATUS_DONE, gpb.USER_RESULT_STATUS_CANCELLED} and statuses.count(gpb.USER_RESULT_STATUS_CANCELLED) >= len(USERS) - 1
    time.sleep(1.0)  # queued chunk tasks run and find nothing to do
    again = stub.GetJob(gpb.GetJobRequest(job_id="job-cancel"), timeout=10).job
    assert [r.status for r in again.results] == statuses and again.status == gpb.JOB_STATUS_CANCELLED


def test_batch_cli_segment_writes_manifest(loop, tmp_path, monkeypatch):
    from pigment.services.cli import main
    from pigment.services.stack import settings_env

    for key, value in settings_env(loop["settings"]).items():
        if key.startswith("PIGMENT_"):
            monkeypatch.setenv(key, value)
    out = tmp_path / "posters"
    assert main(["batch", "--segment", "posters", "--prompt", "a star", "--images", "1", "--steps", "1",
                 "--job-id", "cli-seg", "--out", str(out), "--no-worker"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and set(manifest["users"]) == {"u4", "u5"}
    for entry in manifest["users"].values():
        assert (out / entry["images"][0]["file"]).read_bytes()[:4] == b"\x89PNG"
        assert entry["images"][0]["model_version"]


# -- the job core alone: leases, resume sweep, cancel (no models; SQLite, and PostgreSQL when present) ------
def check_job_core_leases(url: str) -> None:
    import socket
    import subprocess
    import sys
    from types import SimpleNamespace

    from pigment.services.common.settings import Settings
    from pigment.services.gateway.jobs import BatchParams, ChunkRunner, JobsCore
    from pigment.services.store.db import make_sessionmaker
    from pigment.services.store.migrate import upgrade
    from pigment.services.store.tables import User

    upgrade(url)
    sessions = make_sessionmaker(url)
    with sessions.begin() as s:
        s.add_all(User(user_id=u, tenant="t") for u in USERS)
    sent = []
    jobs = JobsCore(Settings(database_url=url), sessions, lambda job, chunk, size: sent.append((job, chunk)))
    rendered = []

    def fake_generate(p):
        rendered.append(p.user_id)
        return SimpleNamespace(images=[SimpleNamespace(generation_id=f"g-{p.request_id}")])

    view = jobs.submit(BatchParams(job_id="core-1", segment="t", prompt="a star", chunk_size=4))
    assert (view.total, sent) == (6, [("core-1", 0), ("core-1", 1)])
    assert jobs.submit(BatchParams(job_id="core-1", segment="t", prompt="a star", chunk_size=4)).total == 6

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dead_owner = f"{socket.gethostname()}:{dead.pid}"
    first = ChunkRunner(sessions, fake_generate, owner=dead_owner)
    assert first.claim("core-1", 0) == ["u0", "u1", "u2", "u3"]
    assert first._start("core-1", "u0") and first._render_user("core-1", "u0", {"prompt": "a star"}) == "done"
    assert first._start("core-1", "u1")  # ... and its worker dies while rendering u1

    alive = ChunkRunner(sessions, fake_generate, owner=f"{socket.gethostname()}:1")  # pid 1 is always alive
    assert alive.claim("core-1", 1) == ["u4", "u5"]
    sent.clear()
    assert jobs.resend_stalled() == [("core-1", 0)] and sent == [("core-1", 0)]  # chunk 1's owner is alive

    resumed = ChunkRunner(sessions, fake_generate)
    assert resumed.run("core-1", 0) == {"claimed": 3, "done": 3, "failed": 0, "skipped": 0}
    assert resumed.run("core-1", 1)["claimed"] == 0  # leased by a live worker: not taken over
    assert rendered == ["u0", "u1", "u2", "u3"]  # u0 was not redone
    assert jobs.get("core-1").status == "running"
    assert jobs.cancel("core-1").status == "cancelled"
    assert {r.user_id: r.status for r in jobs.get("core-1").results if r.status != "done"} == {
        "u4": "cancelled", "u5": "cancelled"}
    assert alive.run("core-1", 1)["claimed"] == 0
    pages = [jobs.get("core-1", 0, 4), jobs.get("core-1", 4, 4)]  # pages in chunk, user order
    assert [[r.user_id for r in p.results] for p in pages] == [USERS[:4], USERS[4:]]
    assert [p.next_offset for p in pages] == [4, None] and all(p.done == 4 for p in pages)


def test_job_core_leases_sqlite(tmp_path):
    check_job_core_leases(f"sqlite:///{tmp_path / 'jobs.db'}")


@pytest.mark.integration
def test_job_core_leases_postgres(pg_database):
    check_job_core_leases(pg_database())


# -- registry: workers pick up a promotion without a restart --------------------------------------------
def test_generations_record_the_active_adapter_versions(loop, tmp_path):
    import torch

    registry = Registry(loop["stack"].sessions)
    save_file({"w": torch.ones(2)}, str(tmp_path / "head.safetensors"))
    registry.register("pmg_head", tmp_path / "head.safetensors", version="head-live")
    registry.promote("head-live")
    gen = generate(loop, "reg-1", n=1)
    with loop["stack"].sessions() as s:
        assert s.get(RenderRequest, "reg-1").adapters == {"pmg_head": "head-live"}
        assert s.get(Generation, gen.images[0].generation_id).adapter_version == "pmg_head=head-live"

    save_file({"w": torch.ones(2)}, str(tmp_path / "lora.safetensors"))  # a render-side adapter, then tampered
    registry.register("unet_lora", tmp_path / "lora.safetensors", version="lora-bad")
    registry.promote("lora-bad")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(grpc.RpcError) as err:
        generate(loop, "reg-2", n=1)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "sha256" in err.value.details()
    registry.rollback("unet_lora", notes="tampered")
    registry.rollback("pmg_head")
    gen = generate(loop, "reg-3", n=1)  # the same worker, no restart, back on the preset weights
    with loop["stack"].sessions() as s:
        assert s.get(Generation, gen.images[0].generation_id).adapter_version is None


# -- preference pairs (pure) -------------------------------------------------------------------------------
class FB:
    def __init__(self, fid, user, gid, kind, value=0.0, others=(), minutes=0):
        self.feedback_id, self.user_id, self.generation_id, self.kind, self.value = fid, user, gid, kind, value
        self.other_generation_ids = list(others)
        self.created_at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=minutes)


def gens(user: str, prompt: str, n: int, request: str) -> dict[str, GenerationInfo]:
    return {f"{request}/{i}": GenerationInfo(f"{request}/{i}", user, prompt, request) for i in range(n)}


def test_pairs_from_picks_ratings_and_likes_with_per_user_cap():
    g = {**gens("ann", "a star", 3, "r1"), **gens("ann", "a moon", 2, "r2"), **gens("flood", "a star", 40, "r3"),
         **gens("cid", "a star", 2, "r4")}
    feedback = [
        FB("f1", "ann", "r1/0", "pick", others=["r1/1", "r1/2"]),
        FB("f2", "ann", "r1/1", "rating", 5), FB("f3", "ann", "r1/2", "rating", 1),
        FB("f4", "ann", "r2/0", "dislike"),  # a different prompt: never paired with "a star" images
        FB("f5", "ann", "r1/2", "like", minutes=-5),  # older than the rating of 1: the rating wins
        FB("f6", "cid", "r1/0", "like"),  # not cid's generation: ignored
        FB("f7", "cid", "r4/0", "like"), FB("f8", "cid", "r4/1", "click"),
    ]
    feedback += [FB(f"x{i}", "flood", f"r3/{i}", "like" if i % 2 else "dislike") for i in range(40)]
    pairs = build_pairs(feedback, g, max_per_user=5)
    ann = {(p.chosen, p.rejected, p.source) for p in pairs if p.user_id == "ann"}
    assert ann == {("r1/0", "r1/1", "pick"), ("r1/0", "r1/2", "pick"), ("r1/1", "r1/2", "explicit")}
    assert sum(p.user_id == "flood" for p in pairs) == 5  # capped: 400 possible pairs
    assert not any(p.user_id == "cid" for p in pairs)
    assert all(p.prompt == "a star" for p in pairs)

    # contradictory picks by the same user cancel out
    both = build_pairs([FB("p1", "ann", "r1/0", "pick", others=["r1/1"]),
                        FB("p2", "ann", "r1/1", "pick", others=["r1/0"])], g)
    assert both == []


def test_auto_pairs_best_vs_worst_by_a_scorer_that_is_not_the_evaluator():
    groups = {"r1": list(gens("ann", "a star", 3, "r1").values()), "solo": list(gens("bo", "x", 1, "solo").values())}
    score = {"r1/0": 0.2, "r1/1": 0.9, "r1/2": 0.5}.get
    pairs = auto_pairs(groups, lambda g: score(g.generation_id))
    assert pairs == [Pair("ann", "a star", "r1/1", "r1/0", "auto", pytest.approx(0.7))]

    def clip_metric(g):
        return 0.0

    with pytest.raises(ValueError, match="not the evaluation metric"):
        auto_pairs(groups, clip_metric, evaluator=clip_metric)
    assert auto_pairs(groups, lambda g: 1.0) == []  # no gap, no pair
