"""The chaos run behind tests/test_chaos.py: real PostgreSQL, a private Redis broker, supervised worker
processes and a real gRPC server, with faults injected while clients stream renders and retry.

Faults: kill -9 of a worker while it renders (twice), a broker restart without persistence while tasks
are queued (``redis-cli shutdown nosave``, then started again), a PostgreSQL crash-restart while renders
are in flight (``pg_ctl stop -m immediate``, then start: every pooled, LISTEN and heartbeat connection
breaks at once) on a private cluster, and a server stop mid-stream (what SIGTERM does once its grace is
over), each during live traffic. Clients retry every failure with the
same request_id, as the API asks. Afterwards every request is counted in SQL: answered (a response with
its images), duplicated (Generation rows beyond the images asked, or two answers with different ids),
lost (never answered, or a row left unfinished).
"""

from __future__ import annotations

import json
import pwd
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import grpc
from sqlalchemy import func, select

from pigment.services.store.tables import Generation, RenderRequest
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc

RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
         grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of our own on a free port, so restarting it disturbs nobody else."""

    def __init__(self, folder: Path):
        self.port, self.folder, self.proc = free_port(), folder, None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, check=False,
                              text=True).stdout.strip() == "PONG":
                return
            time.sleep(0.1)
        raise RuntimeError("private redis did not start")

    def restart(self, down_s: float = 2.0) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"], capture_output=True, check=False)
        self.proc.wait(10)
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class PrivatePostgres:
    """A PostgreSQL cluster of our own (initdb in a temp folder, a free port), so restarting it disturbs nobody.

    The binaries refuse to run as root, so they run as the ``postgres`` user on a folder it owns (not under
    pytest's tmp_path, which only root may enter)."""

    BIN = Path("/usr/lib/postgresql/15/bin")

    @classmethod
    def unavailable(cls) -> str | None:
        """Why a private cluster cannot be made here, or None."""
        if not (cls.BIN / "initdb").exists() or not (cls.BIN / "pg_ctl").exists():
            return f"no PostgreSQL binaries in {cls.BIN}"
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "no postgres user to run the PostgreSQL binaries as"
        if shutil.which("runuser") is None:
            return "no runuser to run the PostgreSQL binaries as postgres"
        return None

    def __init__(self):
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="pigment-chaos-pg-"))
        self.data, self.log = self.folder / "data", self.folder / "pg.log"
        shutil.chown(self.folder, "postgres", "postgres")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _pg(self, *args: str, timeout: float = 60) -> None:
        done = subprocess.run(["runuser", "-u", "postgres", "--", *args], capture_output=True, text=True,
                              timeout=timeout, check=False)
        if done.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()[-1000:]}\n{log}")

    def start(self) -> None:
        if not (self.data / "PG_VERSION").exists():
            self._pg(str(self.BIN / "initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres", "--no-sync",
                     "-E", "UTF8", "--locale=C")
        self._pg(str(self.BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o",
                 f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                 "-c max_connections=200", "start")

    def create_database(self, name: str) -> str:
        from sqlalchemy import create_engine, text

        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        return self.url(name)

    def crash(self) -> None:
        """A crash, not a polite stop: every client connection breaks mid-whatever."""
        self._pg(str(self.BIN / "pg_ctl"), "-D", str(self.data), "-w", "stop", "-m", "immediate")

    def restart(self, down_s: float = 2.0) -> None:
        self.crash()
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._pg(str(self.BIN / "pg_ctl"), "-D", str(self.data), "-w", "stop", "-m", "immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.folder, ignore_errors=True)


def run_chaos(settings, requests: int = 16, clients: int = 4, steps: int = 10, size: int = 64,
              budget_s: float = 150.0, faults=("kill_worker", "broker_restart", "server_stop", "kill_worker")) -> dict:
    from pigment.services.stack import Stack, Worker
    from pigment.services.store.migrate import upgrade

    upgrade(settings.database_url)
    stack = Stack(settings)
    workers = [Worker(settings, log_path=settings.data_dir / f"worker{i}.log", supervise=True) for i in range(2)]
    starters = [threading.Thread(target=w.start) for w in workers]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    port = free_port()
    server = {"now": stack.server(port=port)[0]}
    server["now"].start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    history = history_pb2_grpc.HistoryServiceStub(channel)
    history.UpsertItems(history_pb2.UpsertItemsRequest(items=[history_pb2.Item(item_id="c", caption="a red circle")]),
                        timeout=30)
    history.LogInteractions(history_pb2.LogInteractionsRequest(user_id="chaos", create_user=True, interactions=[
        history_pb2.Interaction(item_id="c", kind="like")]), timeout=30)
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    todo: queue.Queue = queue.Queue()
    for i in range(requests):
        todo.put(f"chaos-{i}")
    answers: dict[str, list[list[str]]] = {}
    tried: dict[str, list[str]] = {}  # request id -> "t_s CODE" of each failed call, and why its client stopped
    calls = {"attempts": 0, "errors": {}}
    lock = threading.Lock()
    stop_at = time.monotonic() + budget_s

    def client() -> None:
        while True:
            try:
                rid = todo.get_nowait()
            except queue.Empty:
                return
            req = gpb.GenerateRequest(request_id=rid, user_id="chaos", prompt="a star", num_images=1,
                                      num_inference_steps=steps, height=size, width=size)
            while time.monotonic() < stop_at:
                with lock:
                    calls["attempts"] += 1
                try:
                    events = list(stub.GeneratePersonalizedStream(req, timeout=30))
                    result = events[-1].result
                    with lock:
                        answers.setdefault(rid, []).append([i.generation_id for i in result.images])
                    break
                except grpc.RpcError as err:
                    with lock:
                        calls["errors"][err.code().name] = calls["errors"].get(err.code().name, 0) + 1
                        tried.setdefault(rid, []).append(f"{budget_s - (stop_at - time.monotonic()):.1f}s "
                                                         f"{err.code().name}: {(err.details() or '')[:160]}")
                    if err.code() not in RETRY:
                        tried[rid].append("gave up: not retryable")
                        break
                    time.sleep(0.5)
            else:
                tried.setdefault(rid, []).append("gave up: out of the retry budget")

    def running() -> bool:
        try:
            with stack.sessions() as s:
                return bool(s.scalar(select(func.count()).select_from(RenderRequest)
                                     .where(RenderRequest.status == "running", RenderRequest.step >= 1)))
        except Exception:  # noqa: BLE001 - the database is mid-restart: not known to be running yet
            return False

    injected: list[dict] = []

    def inject() -> None:
        redis = settings.broker_url
        for n, fault in enumerate(faults):
            deadline = time.monotonic() + 30
            while not running() and time.monotonic() < deadline:
                time.sleep(0.05)
            t = round(budget_s - (stop_at - time.monotonic()), 1)
            if fault == "kill_worker":
                w = workers[n % 2]
                if w.proc.poll() is None:
                    w.kill()
                    injected.append({"fault": fault, "t_s": t, "pid": w.proc.pid})
            elif fault == "broker_restart" and chaos_redis.get(redis):
                chaos_redis[redis].restart()
                injected.append({"fault": fault, "t_s": t})
            elif fault == "pg_restart" and chaos_pg.get(settings.database_url):
                chaos_pg[settings.database_url].restart()
                injected.append({"fault": fault, "t_s": t})
            elif fault == "server_stop":
                server["now"].stop(grace=0).wait()
                time.sleep(1.0)
                server["now"] = stack.server(port=port)[0]
                server["now"].start()
                injected.append({"fault": fault, "t_s": t})
            time.sleep(4.0)

    started = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    injector = threading.Thread(target=inject, daemon=True)
    for t in threads:
        t.start()
    injector.start()
    for t in threads:
        t.join(budget_s + 60)
    elapsed = time.monotonic() - started
    try:
        with stack.sessions() as s:
            gens = dict(s.execute(select(Generation.request_id, func.count()).group_by(Generation.request_id)).all())
            rows = dict(s.execute(select(RenderRequest.request_id, RenderRequest.status)).all())
            claims = dict(s.execute(select(RenderRequest.request_id, RenderRequest.attempts)).all())
            detail = {r.request_id: {"status": r.status, "error": r.error, "step": r.step, "claims": r.attempts,
                                     "sends": r.dispatches, "worker": r.worker, "heartbeat_at": str(r.heartbeat_at)}
                      for r in s.scalars(select(RenderRequest))}
    finally:
        channel.close()
        server["now"].stop(0)
        for w in workers:
            w.stop()
    rids = [f"chaos-{i}" for i in range(requests)]
    answered = [r for r in rids if answers.get(r)]
    duplicated = [r for r in rids if gens.get(r, 0) > 1 or len({tuple(a) for a in answers.get(r, [])}) > 1]
    lost = [r for r in rids if not answers.get(r) or rows.get(r) != "done" or gens.get(r, 0) != 1]
    # what a lost or duplicated request went through: its row, its images, its client's failed calls
    diagnosis = {r: {"row": detail.get(r), "generations": gens.get(r, 0), "answers": answers.get(r, []),
                     "failed_calls": tried.get(r, [])[-12:]} for r in dict.fromkeys(lost + duplicated)}
    return {"faults_injected": len(injected), "faults": injected, "requests": requests, "answered": len(answered),
            "duplicated": len(duplicated), "lost": len(lost), "lost_ids": lost, "duplicated_ids": duplicated,
            "diagnosis_ids": diagnosis,
            "re_rendered": sum(1 for r in rids if claims.get(r, 0) > 1), "calls": calls["attempts"],
            "errors_retried": calls["errors"], "workers_restarted": sum(w.restarts for w in workers),
            "elapsed_s": round(elapsed, 1)}


chaos_redis: dict[str, PrivateRedis] = {}  # broker url -> the private redis behind it (restartable)
chaos_pg: dict[str, PrivatePostgres] = {}  # database url -> the private cluster behind it (restartable)


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
