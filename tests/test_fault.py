"""Fault tolerance (issue 16) through real gRPC, real worker processes and real databases: a worker killed
mid-render, a lost task, a model that fails to load, readiness, capacity reserved for health, atomic
admission, concurrent calls with one request_id, and a server killed with its worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from conftest import make_settings, running_stack
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pigment.services.store.tables import Generation, RenderRequest, WorkerBeat
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc
from sqlalchemy import func, select

# Liveness at test speed: a worker silent for 4 s is dead, the reaper looks twice a second.
FAST = {"heartbeat_interval_s": 0.5, "heartbeat_stale_s": 4.0, "reaper_interval_s": 0.5,
        "requeue_queued_after_s": 5.0}
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


def add_user(channel, user: str = "alice") -> None:
    history = history_pb2_grpc.HistoryServiceStub(channel)
    history.UpsertItems(history_pb2.UpsertItemsRequest(items=[
        history_pb2.Item(item_id="red-circle", caption="a large red circle on a dark background")]))
    history.LogInteractions(history_pb2.LogInteractionsRequest(user_id=user, create_user=True, interactions=[
        history_pb2.Interaction(item_id="red-circle", kind="like", timestamp_ms=1_700_000_000_000)]))


def request(request_id: str, steps: int = 2, size: int = 32, n: int = 1) -> gpb.GenerateRequest:
    return gpb.GenerateRequest(request_id=request_id, user_id="alice", prompt="a star", num_images=n,
                               num_inference_steps=steps, height=size, width=size)


def render_row(stack, request_id: str) -> RenderRequest | None:
    with stack.sessions() as s:
        return s.get(RenderRequest, request_id)


def generations(stack, request_id: str) -> int:
    with stack.sessions() as s:
        return s.scalar(select(func.count()).select_from(Generation).where(Generation.request_id == request_id))


def health(channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def code_of(fn) -> tuple[grpc.StatusCode, str, float]:
    t0 = time.perf_counter()
    try:
        fn()
    except grpc.RpcError as err:
        return err.code(), err.details(), time.perf_counter() - t0
    return grpc.StatusCode.OK, "", time.perf_counter() - t0


def in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(code_of(fn)), daemon=True)
    thread.start()
    return thread, out


@pytest.fixture(scope="module")
def supervised(tmp_path_factory, tiny_preset):
    settings = make_settings(tmp_path_factory.mktemp("fault"), tiny_preset, render_timeout_s=240, **FAST)
    with running_stack(settings, supervise=True) as (stack, channel, worker):
        add_user(channel)
        yield stack, channel, worker


def test_worker_killed_mid_render_is_restarted_resent_and_answered_once(supervised):
    """kill -9 of the worker while it renders: the supervisor restarts it, the reaper re-sends the request
    (its heartbeat went stale), the waiting caller gets its images, and the rows exist once."""
    stack, channel, worker = supervised
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    wait_for(lambda: health(channel) == SERVING, 30, "readiness with a live worker")
    thread, out = in_thread(lambda: stub.GeneratePersonalized(request("kill-1", steps=30, size=64, n=2),
                                                              timeout=240))
    wait_for(lambda: (r := render_row(stack, "kill-1")) is not None and r.status == "running" and r.step >= 1,
             120, "the render to start")
    killed = worker.proc.pid
    worker.kill()
    thread.join(240)
    assert out and out[0][0] == grpc.StatusCode.OK, out
    assert worker.restarts >= 1 and worker.proc.pid != killed and worker.proc.poll() is None
    row = render_row(stack, "kill-1")
    assert (row.status, row.attempts, row.dispatches) == ("done", 2, 2)
    assert generations(stack, "kill-1") == 2


def test_concurrent_calls_with_one_request_id_render_once(supervised):
    stack, channel, _ = supervised
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    results: list = []

    def call():
        results.append(stub.GeneratePersonalized(request("same-1", steps=3, n=2), timeout=120))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert len(results) == 4
    assert len({tuple(i.generation_id for i in r.images) for r in results}) == 1
    assert sum("REPLAYED" not in r.flags for r in results) == 1
    assert generations(stack, "same-1") == 2 and render_row(stack, "same-1").attempts == 1


def test_log_feedback_and_get_history_over_grpc(supervised):
    _, channel, _ = supervised
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    image = stub.GeneratePersonalized(request("fb-grpc-1"), timeout=120).images[0]
    like = gpb.LogFeedbackRequest(feedback_id="fb-grpc-like", user_id="alice", generation_id=image.generation_id,
                                  kind=gpb.FEEDBACK_KIND_LIKE)
    assert stub.LogFeedback(like, timeout=10).duplicate is False
    assert stub.LogFeedback(like, timeout=10).duplicate is True
    code, _, _ = code_of(lambda: stub.LogFeedback(gpb.LogFeedbackRequest(
        feedback_id="fb-grpc-x", user_id="alice", generation_id="no-such-generation", kind=gpb.FEEDBACK_KIND_LIKE),
        timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    entries = history_pb2_grpc.HistoryServiceStub(channel).GetHistory(
        history_pb2.GetHistoryRequest(user_id="alice"), timeout=10).entries
    assert [(e.item.item_id, e.interaction.kind) for e in entries] == [("red-circle", "like")]
    assert entries[0].item.caption.startswith("a large red circle")


def test_model_that_fails_to_load_fails_the_request_at_once(tmp_path, tiny_preset):
    """A UNet file modified after start-up (same size) fails its sha256 when the worker loads it: the caller
    gets FAILED_PRECONDITION naming the file within seconds, not a 300 s wait; the row is failed."""
    import shutil

    preset = shutil.copytree(tiny_preset, tmp_path / "preset")
    settings = make_settings(tmp_path, preset, **FAST)
    with running_stack(settings) as (stack, channel, _):
        add_user(channel)
        weights = preset / "unet" / "diffusion_pytorch_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-16:] = bytes(16)
        weights.write_bytes(bytes(data))
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        code, details, took = code_of(lambda: stub.GeneratePersonalized(request("badmodel-1"), timeout=120))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "failed to load" in details and "sha256" in details
    assert took < 60
    assert render_row(stack, "badmodel-1").status == "failed"


def test_deadline_then_lost_task_then_replay_resends_the_queued_row(tmp_path, tiny_preset):
    """No worker: the render times out (DEADLINE_EXCEEDED, row queued). The broker then loses the task. A
    replay of the same request_id re-sends the queued row, and a worker renders it once."""
    from pigment.services.stack import Worker

    settings = make_settings(tmp_path, tiny_preset, render_timeout_s=2, **{**FAST, "requeue_queued_after_s": 600})
    with running_stack(settings, worker=False) as (stack, channel, _):
        add_user(channel)
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        code, details, _ = code_of(lambda: stub.GeneratePersonalized(request("lost-1"), timeout=60))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "replay the same request_id" in details
        assert render_row(stack, "lost-1").status == "queued"
        lost = [p for p in settings.broker_dir.iterdir() if p.is_file() and p.suffix == ".msg"]
        assert lost, "the task should be waiting in the broker"
        for path in lost:  # a broker restart without persistence
            path.unlink()
        worker = Worker(settings.model_copy(update={"render_timeout_s": 120})).start()
        try:  # the caller keeps replaying (each call waits at most 2 s here) until the render is done
            replays = [code_of(lambda: stub.GeneratePersonalized(request("lost-1"), timeout=60)) for _ in range(2)]
            while replays[-1][0] == grpc.StatusCode.DEADLINE_EXCEEDED and len(replays) < 60:
                replays.append(code_of(lambda: stub.GeneratePersonalized(request("lost-1"), timeout=60)))
            resp = stub.GeneratePersonalized(request("lost-1"), timeout=60)
        finally:
            worker.stop()
    assert "REPLAYED" in resp.flags and len(resp.images) == 1
    row = render_row(stack, "lost-1")
    # re-sent at least once (a replay of a still-queued row sends again); claimed and rendered once
    assert row.status == "done" and row.dispatches >= 2 and row.attempts == 1
    assert generations(stack, "lost-1") == 1


def test_readiness_follows_the_render_worker(tmp_path, tiny_preset):
    from pigment.services.stack import Worker

    settings = make_settings(tmp_path, tiny_preset, **FAST)
    with running_stack(settings, worker=False) as (stack, channel, _):
        wait_for(lambda: health(channel) == NOT_SERVING, 10, "NOT_SERVING without a worker")
        assert any("no live worker" in p for p in stack.readiness().problems())
        assert health(channel, "liveness") == SERVING  # the process itself is alive
        worker = Worker(settings).start()
        try:
            wait_for(lambda: health(channel) == SERVING, 20, "SERVING once a worker beats")
            wait_for(lambda: health(channel, "pigment.v1.GenerationService") == SERVING, 5, "service SERVING")
        finally:
            worker.kill()  # no clean shutdown: its row goes stale
        wait_for(lambda: health(channel) == NOT_SERVING, 20, "NOT_SERVING once the worker's heartbeat is stale")


def test_readiness_reports_unreachable_database_and_broker(tmp_path, tiny_preset):
    from pigment.services.stack import Stack

    no_db = make_settings(tmp_path / "a", tiny_preset, database_url="postgresql+psycopg://postgres@127.0.0.1:5999/x")
    assert any(p.startswith("database:") for p in Stack(no_db).readiness().problems())
    no_broker = make_settings(tmp_path / "b", tiny_preset, broker_url="redis://127.0.0.1:6399/0")
    from pigment.services.store.migrate import upgrade

    upgrade(no_broker.database_url)
    stack = Stack(no_broker)
    assert any(p.startswith("broker unreachable") for p in stack.readiness().problems())
    server, port = stack.server(port=0)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_for(lambda: health(channel) == NOT_SERVING, 10, "NOT_SERVING with the broker down")
    finally:
        server.stop(0)


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def test_readiness_says_once_that_the_schema_is_not_migrated(tmp_path, tiny_preset, caplog, request, db):
    """A server on an unmigrated database: NOT_SERVING with one clear line, not a "no such table: worker_beats"
    traceback from the readiness and reaper loops each pass; once migrated it goes on to the worker check."""
    import logging

    from pigment.services.stack import Stack
    from pigment.services.store.migrate import upgrade

    url = {"database_url": request.getfixturevalue("pg_database")()} if db == "postgresql" else {}
    settings = make_settings(tmp_path, tiny_preset, **FAST, **url)
    stack = Stack(settings)
    caplog.set_level(logging.WARNING, logger="pigment")
    server, port = stack.server(port=0)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_for(lambda: any("not migrated" in r.getMessage() for r in caplog.records), 10, "the schema line")
            time.sleep(4 * FAST["reaper_interval_s"])  # several passes of both loops
            assert health(channel) == NOT_SERVING
        said = [r.getMessage() for r in caplog.records]
        assert sum("not migrated" in m for m in said) == 1 and "pigment db upgrade" in "".join(said), said
        assert not any(r.exc_info or "no such table" in r.getMessage() for r in caplog.records), said
        upgrade(settings.database_url)
        assert any("no live worker" in p for p in stack.readiness().problems())
    finally:
        server.stop(0)


def p50(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def test_health_and_slots_answer_at_once_while_every_slot_renders(tmp_path, tiny_preset):
    """max_concurrent_rpcs calls blocked on renders: one more call is RESOURCE_EXHAUSTED at once, and health
    still answers within 100 ms (its threads are reserved)."""
    settings = make_settings(tmp_path, tiny_preset, max_concurrent_rpcs=3, render_timeout_s=60, **FAST)
    with running_stack(settings, worker=False) as (stack, channel, _):
        add_user(channel)
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        blocked = [in_thread(lambda i=i: stub.GeneratePersonalized(request(f"slot-{i}"), timeout=60))
                   for i in range(3)]
        wait_for(lambda: all(render_row(stack, f"slot-{i}") for i in range(3)), 60, "three renders waiting")
        health_s = []
        for _ in range(7):
            t0 = time.perf_counter()
            health(channel)
            health_s.append(time.perf_counter() - t0)
        code, details, took = code_of(lambda: stub.GeneratePersonalized(request("slot-x"), timeout=30))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent_rpcs" in details
        assert took < 1.0 and p50(health_s) < 0.1, (took, health_s)
        assert all(t.is_alive() for t, _ in blocked)  # still waiting: the slots were really full


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def test_admission_never_exceeds_the_queue_depth(tmp_path, tiny_preset, pg_database, database):
    """16 concurrent requests against max_queue_depth 4: exactly 4 admitted, 12 rejected quickly."""
    url = {"database_url": pg_database()} if database == "postgresql" else {}
    settings = make_settings(tmp_path, tiny_preset, max_queue_depth=4, render_timeout_s=5, **url, **FAST)
    with running_stack(settings, worker=False) as (stack, channel, _):
        add_user(channel)
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        barrier = threading.Barrier(16)

        def call(i):
            barrier.wait()
            return stub.GeneratePersonalized(request(f"adm-{i}"), timeout=30)

        calls = [in_thread(lambda i=i: call(i)) for i in range(16)]
        for t, _ in calls:
            t.join(60)
        codes = [out[0][0] for _, out in calls]
        with stack.sessions() as s:
            admitted = s.scalar(select(func.count()).select_from(RenderRequest))
        rejected = [out[0][2] for _, out in calls if out[0][0] == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert admitted == 4 and codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == 4, codes
        assert len(rejected) == 12
        # once the queue is full a rejection costs one count query
        late = [code_of(lambda i=i: stub.GeneratePersonalized(request(f"adm-late-{i}"), timeout=10))
                for i in range(5)]
        assert all(c == grpc.StatusCode.RESOURCE_EXHAUSTED for c, _, _ in late)
        assert p50([t for _, _, t in late]) < 0.25, late


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killed_server_takes_its_worker_down(tmp_path, tiny_preset):
    """kill -9 of `pigment serve`: its worker (PR_SET_PDEATHSIG / parent watchdog) stops consuming."""
    from pigment.services.store.db import make_sessionmaker

    settings = make_settings(tmp_path, tiny_preset, **FAST)
    env = {**os.environ, "PIGMENT_DATA_DIR": str(settings.data_dir), "PIGMENT_PRESET": str(tiny_preset),
           "PIGMENT_RENDER_QUEUE": settings.render_queue, "PIGMENT_HEARTBEAT_INTERVAL_S": "0.5"}
    server = subprocess.Popen([sys.executable, "-m", "pigment.services.cli", "serve", "--port", str(free_port())],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sessions = make_sessionmaker(settings.database_url)

        def worker_pid():
            try:
                with sessions() as s:
                    return s.scalar(select(WorkerBeat.pid))
            except Exception:  # noqa: BLE001 - tables not migrated yet
                return None

        pid = wait_for(worker_pid, 180, "the worker's heartbeat row")
        server.send_signal(signal.SIGKILL)
        server.wait(10)

        def gone():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            with open(f"/proc/{pid}/stat") as f:  # exited but not yet reaped by init counts as gone
                return f.read().split()[2] == "Z"

        wait_for(gone, 60, f"worker {pid} to exit after its server was killed")
    finally:
        if server.poll() is None:
            server.kill()


class WorkerKilled(BaseException):
    """kill -9 of a worker mid-render: nothing after the raise runs (no failure is recorded, no heartbeat)."""


class Dies:
    """A renderer whose process is killed as the render starts."""

    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def render_batch(self, inputs, on_step=None):
        raise WorkerKilled


class Stalls(Dies):
    """A renderer that stalls (cut off from the database, starved of CPU) until released, then finishes."""

    def __init__(self, real):
        super().__init__(real)
        self.release = threading.Event()

    def render_batch(self, inputs, on_step=None):
        self.release.wait(60)
        return self.real.render_batch(inputs, on_step=on_step)


@pytest.fixture(scope="module")
def tiny_renderer(tiny_preset):
    from pigment.models.pipeline import Renderer

    return Renderer(tiny_preset)


@pytest.fixture
def gave_up(tmp_path, tiny_preset, tiny_renderer):
    """A gateway core whose sends are recorded (the test plays the workers), one claim per request
    (``max_render_attempts`` 1) and a heartbeat stale after 0.5 s; the reaper runs when the test says."""
    from pigment.services.render.core import RenderCore
    from pigment.services.stack import Stack
    from pigment.services.store.migrate import upgrade

    settings = make_settings(tmp_path, tiny_preset, max_render_attempts=1, heartbeat_stale_s=0.5,
                             requeue_queued_after_s=600)
    upgrade(settings.database_url)
    stack = Stack(settings)
    stack.history.ensure_user("alice")
    sent: list[str] = []
    gateway = stack.make_gateway(sent.append)

    def worker(renderer):
        return RenderCore(stack.sessions, stack.storage, lambda: renderer, heartbeat_s=60, stale_s=0.5,
                          max_attempts=1)

    yield stack, gateway, sent, worker


def params(request_id: str):
    from pigment.services.gateway.core import GenerateParams

    return GenerateParams(request_id=request_id, user_id="alice", prompt="a star", num_images=1,
                          num_inference_steps=2, height=32, width=32, method="non_personalized",
                          retrieval="generate_only")


def call(gateway, request_id: str, wait_s: float = 0.3):
    """One GeneratePersonalized as a caller makes it: the result, or the error it got."""
    from pigment.services.common.errors import PigmentError

    try:
        return gateway.generate(params(request_id), deadline=time.monotonic() + wait_s)
    except PigmentError as exc:
        return exc


def test_replay_after_the_reaper_gave_up_is_rendered(gave_up, tiny_renderer):
    """The request the 15-fault chaos soak lost: its workers went silent max_render_attempts times, the reaper
    failed it UNAVAILABLE, the caller replayed (as UNAVAILABLE asks). The replay must be claimable: before the
    fix it was re-queued with its claims used up, so no worker would take it and it waited forever."""
    stack, gateway, sent, worker = gave_up
    assert type(call(gateway, "gaveup-1")).__name__ == "DeadlineExceeded" and sent == ["gaveup-1"]
    with pytest.raises(WorkerKilled):
        worker(Dies(tiny_renderer)).run("gaveup-1")  # claimed, then killed
    time.sleep(0.6)  # its heartbeat goes stale
    assert gateway.reaper.sweep() == []  # its one claim is used: failed, not re-sent
    row = render_row(stack, "gaveup-1")
    assert row.status == "failed" and row.error.startswith("UNAVAILABLE"), row.error
    assert type(call(gateway, "gaveup-1")).__name__ == "DeadlineExceeded"  # the replay re-sends it
    assert sent == ["gaveup-1", "gaveup-1"]
    assert worker(tiny_renderer).run("gaveup-1") == "done"  # a healthy worker may claim it
    result = call(gateway, "gaveup-1")
    assert "REPLAYED" in result.flags and len(result.images) == 1
    assert generations(stack, "gaveup-1") == 1


def test_replay_racing_the_late_worker_keeps_its_result(gave_up, tiny_renderer, monkeypatch):
    """The reaper gave up on a stalled worker; the caller's replay read the failed row, and just then the
    stalled worker stored its result. The replay must answer with it: before the fix it turned the done row
    back into a queued one no worker could claim (its claims were used), and the request never ended."""
    stack, gateway, sent, worker = gave_up
    call(gateway, "late-1")
    stalled = Stalls(tiny_renderer)
    rendering = threading.Thread(target=worker(stalled).run, args=("late-1",), daemon=True)
    rendering.start()
    wait_for(lambda: render_row(stack, "late-1").status == "running", 10, "the claim")
    time.sleep(0.6)
    gateway.reaper.sweep()
    assert render_row(stack, "late-1").status == "failed"
    read = gateway._existing_and_depth

    def read_then_worker_finishes(request_id):
        found = read(request_id)
        stalled.release.set()  # the stalled worker's result lands right after the caller's read
        rendering.join(60)
        return found

    monkeypatch.setattr(gateway, "_existing_and_depth", read_then_worker_finishes)
    result = call(gateway, "late-1", wait_s=5)
    assert not isinstance(result, Exception), result
    assert len(result.images) == 1 and sent == ["late-1"]  # answered by the late worker, nothing re-sent
    row = render_row(stack, "late-1")
    assert (row.status, row.attempts) == ("done", 1) and generations(stack, "late-1") == 1


def test_reaper_resends_queued_rows_only_while_a_worker_consumes(tmp_path, tiny_preset):
    """No live worker on the render queue: a stale queued row is not re-sent again and again into a queue nobody
    reads; once a worker beats, it is re-sent once. A long-dead worker's heartbeat row is deleted."""
    from datetime import timedelta

    from pigment.services.render.liveness import beat
    from pigment.services.stack import Stack
    from pigment.services.store.migrate import upgrade
    from pigment.services.store.tables import utcnow

    settings = make_settings(tmp_path, tiny_preset, requeue_queued_after_s=0.2, heartbeat_stale_s=2.0)
    upgrade(settings.database_url)
    stack = Stack(settings)
    stack.history.ensure_user("alice")
    sent: list[str] = []
    gateway = stack.make_gateway(sent.append)
    call(gateway, "idle-1", wait_s=0.1)
    assert sent == ["idle-1"]
    with stack.sessions.begin() as s:  # a worker killed long ago, on the same queue
        s.add(WorkerBeat(worker_id="gone:1", queues=[settings.render_queue], last_seen=utcnow() - timedelta(hours=1)))
    time.sleep(0.3)
    assert gateway.reaper.sweep() == [] and gateway.reaper.sweep() == []
    with stack.sessions() as s:
        assert s.get(WorkerBeat, "gone:1") is None
    beat(stack.sessions, "here:1", [settings.render_queue])
    assert gateway.reaper.sweep() == ["idle-1"] and gateway.reaper.sweep() == []  # once, then after requeue_s
    assert sent == ["idle-1", "idle-1"] and render_row(stack, "idle-1").dispatches == 2
