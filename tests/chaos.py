"""The chaos run behind tests/test_chaos.py: real PostgreSQL, a private broker (Redis or RabbitMQ), supervised
worker processes and a real ``pigment serve`` process, with faults injected while clients stream renders and retry.

Faults: kill -9 of a worker while it renders, a broker crash-restart while tasks are queued (Redis without
persistence: its tasks are gone; RabbitMQ: its durable queue keeps them and redelivers the unacked one), a
PostgreSQL crash-restart while renders are in flight (``pg_ctl stop -m immediate``, then start: every
pooled, LISTEN and heartbeat connection breaks at once) on a private cluster, SIGTERM of the server
mid-stream (it drains for 1 s, stops, and is started again) and kill -9 of the server (its worker must
exit with it, by PR_SET_PDEATHSIG; the restarted server answers the replays). Clients retry every failure
with the same request_id, as the API asks. Afterwards every request is counted in SQL: answered (a
response with its images), duplicated (Generation rows beyond the images asked, or two answers with
different ids), lost (never answered, or a row left unfinished); each lost or duplicated request is
reported with its row, its images and its client's failed calls.
"""

from __future__ import annotations

import json
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import grpc
from pigment.services.store.tables import Generation, RenderRequest
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc
from sqlalchemy import func, select

RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
         grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc: subprocess.Popen, port: int, timeout: float, what: str, log: Path, tail: int) -> None:
    """Until ``proc`` accepts connections on ``port``; its log's tail in the error if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}: {log.read_text()[-tail:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} not listening after {timeout}s: {log.read_text()[-tail:]}")


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


class PrivateRabbit:
    """A RabbitMQ node of our own (node name, ports, Mnesia, logs and Erlang cookie in a temp folder; no plugins),
    so crashing it disturbs nobody. Its durable queues keep the tasks published before a crash."""

    SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")

    @classmethod
    def unavailable(cls) -> str | None:
        if not cls.SERVER.exists():
            return f"no RabbitMQ server at {cls.SERVER}"
        return None

    def __init__(self, folder: Path):
        self.port, self.dist_port, self.folder, self.proc = free_port(), free_port(), folder, None
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "enabled_plugins").write_text("[].\n")
        (folder / "rabbitmq-env.conf").write_text("")  # not the machine's /etc/rabbitmq one (its node name)
        self.node = f"chaos{self.port}@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self, timeout: float = 90) -> None:
        import os

        f = self.folder
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(f),  # the cookie goes here
               "RABBITMQ_CONF_ENV_FILE": str(f / "rabbitmq-env.conf"), "RABBITMQ_NODENAME": self.node,
               "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.port),
               "RABBITMQ_DIST_PORT": str(self.dist_port), "RABBITMQ_MNESIA_BASE": str(f / "mnesia"),
               "RABBITMQ_LOG_BASE": str(f / "log"), "RABBITMQ_ENABLED_PLUGINS_FILE": str(f / "enabled_plugins"),
               "RABBITMQ_CONFIG_FILE": str(f / "none"), "RABBITMQ_ADVANCED_CONFIG_FILE": str(f / "none.config"),
               "RABBITMQ_PID_FILE": str(f / "pid"), "ERL_EPMD_ADDRESS": "127.0.0.1"}
        self.proc = subprocess.Popen([str(self.SERVER)], env=env, stdout=open(f / "server.log", "a"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_listening(self.proc, self.port, timeout, "private rabbitmq", f / "server.log", tail=2000)

    def crash(self) -> None:
        """kill -9 of the whole node (the Erlang VM and its helpers)."""
        import os
        import signal

        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def restart(self, down_s: float = 2.0) -> None:
        self.crash()
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        self.crash()
        shutil.rmtree(self.folder, ignore_errors=True)


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


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Running (an exited process not yet reaped, a zombie, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ServerProcess:
    """``pigment serve`` in a process of its own, with the render worker it starts as its child: the process an
    operator runs, so a fault can be a real SIGTERM (drain, then stop) or a real kill -9."""

    def __init__(self, settings, port: int):
        from pigment.services.stack import settings_env

        self.port, self.proc, self.log_path = port, None, settings.data_dir / "server.log"
        self.env = {**settings_env(settings), "PIGMENT_HOST": "127.0.0.1",
                    "PIGMENT_REAPER_INTERVAL_S": str(settings.reaper_interval_s),
                    "PIGMENT_REQUEUE_QUEUED_AFTER_S": str(settings.requeue_queued_after_s),
                    "PIGMENT_MAX_QUEUE_DEPTH": str(settings.max_queue_depth),
                    "PIGMENT_SHUTDOWN_GRACE_S": "1"}  # SIGTERM: calls in flight get 1 s, then the server stops

    def start(self, timeout: float = 240) -> None:
        import sys

        log = open(self.log_path, "a")  # noqa: SIM115 - the server writes to it until it exits
        self.proc = subprocess.Popen([sys.executable, "-m", "pigment.services.cli", "--log-level", "INFO", "serve",
                                      "--port", str(self.port), "--no-migrate"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        wait_listening(self.proc, self.port, timeout, "pigment serve", self.log_path, tail=3000)

    def worker_pids(self) -> list[int]:
        return children(self.proc.pid) if self.proc else []

    def stop(self, sig: int, timeout: float = 90) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_chaos(settings, requests: int = 16, clients: int = 4, steps: int = 10, size: int = 64,
              budget_s: float = 150.0, faults=("kill_worker", "broker_restart", "server_stop", "kill_worker")) -> dict:
    """Faults: kill_worker (kill -9 of one of two supervised workers), broker_restart and pg_restart (a crash
    of the private broker or PostgreSQL, then a start), server_stop (SIGTERM of ``pigment serve``: drain 1 s,
    stop) and server_kill (kill -9 of it: its worker must exit too); both server faults start it again."""
    import signal

    from pigment.services.stack import Worker
    from pigment.services.store.db import make_sessionmaker
    from pigment.services.store.migrate import upgrade

    upgrade(settings.database_url)
    sessions = make_sessionmaker(settings.database_url)
    workers = [Worker(settings, log_path=settings.data_dir / f"worker{i}.log", supervise=True) for i in range(2)]
    server = ServerProcess(settings, free_port())
    starters = [threading.Thread(target=w.start) for w in workers] + [threading.Thread(target=server.start)]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    history = history_pb2_grpc.HistoryServiceStub(channel)
    history.UpsertItems(history_pb2.UpsertItemsRequest(items=[history_pb2.Item(item_id="c", caption="a red circle")]),
                        timeout=60)
    history.LogInteractions(history_pb2.LogInteractionsRequest(user_id="chaos", create_user=True, interactions=[
        history_pb2.Interaction(item_id="c", kind="like")]), timeout=30)
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    # `requests` at least; on a fast (idle) machine clients keep sending new ones until every fault has landed
    # in traffic (at most 10x: with the embedded broker polling every 0.1 s, 4x = 48 requests were all
    # answered before the fourth fault), so a fault never hits an idle system and proves nothing.
    sent: list[str] = []

    def next_request_id() -> str | None:
        with lock:
            n = len(sent)
            more = n < 10 * requests and injector.is_alive() and time.monotonic() < stop_at - 60
            if n < requests or more:
                sent.append(f"chaos-{n}")
                return sent[-1]
            return None
    answers: dict[str, list[list[str]]] = {}
    tried: dict[str, list[str]] = {}  # request id -> "t_s CODE" of each failed call, and why its client stopped
    calls = {"attempts": 0, "errors": {}}
    lock = threading.Lock()
    stop_at = time.monotonic() + budget_s

    def client() -> None:
        while True:
            rid = next_request_id()
            if rid is None:
                return
            req = gpb.GenerateRequest(request_id=rid, user_id="chaos", prompt="a star", num_images=1,
                                      num_inference_steps=steps, height=size, width=size)
            while time.monotonic() < stop_at:
                with lock:
                    calls["attempts"] += 1
                try:
                    events = list(stub.GeneratePersonalizedStream(gpb.GeneratePersonalizedStreamRequest(request=req), timeout=30))
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

    def statuses() -> dict[str, int]:
        try:
            with sessions() as s:
                return dict(s.execute(select(RenderRequest.status, func.count()).group_by(RenderRequest.status)).all())
        except Exception:  # noqa: BLE001 - the database is mid-restart: nothing known
            return {}

    def running() -> bool:
        try:
            with sessions() as s:
                return bool(s.scalar(select(func.count()).select_from(RenderRequest)
                                     .where(RenderRequest.status == "running", RenderRequest.step >= 1)))
        except Exception:  # noqa: BLE001 - the database is mid-restart: not known to be running yet
            return False

    injected: list[dict] = []
    orphans: dict[int, float | None] = {}  # worker pid of a killed server -> seconds it took to exit
    watches: list[threading.Thread] = []

    def watch_orphan(pid: int, since: float) -> None:  # SIGTERM'd: a warm shutdown finishes its render first
        while alive(pid) and time.monotonic() - since < settings.render_timeout_s + 120:
            time.sleep(0.1)
        orphans[pid] = None if alive(pid) else round(time.monotonic() - since, 1)

    def inject() -> None:
        broker = settings.broker_url
        for n, fault in enumerate(faults):
            deadline = time.monotonic() + 30
            while not running() and time.monotonic() < deadline:
                time.sleep(0.05)
            t = round(budget_s - (stop_at - time.monotonic()), 1)
            at = {"t_s": t, "rows": statuses()}
            if fault == "kill_worker":
                w = workers[n % 2]
                if w.proc.poll() is None:
                    w.kill()
                    injected.append({"fault": fault, **at, "pid": w.proc.pid})
            elif fault == "broker_restart" and chaos_broker.get(broker):
                chaos_broker[broker].restart()
                injected.append({"fault": fault, **at})
            elif fault == "pg_restart" and chaos_pg.get(settings.database_url):
                chaos_pg[settings.database_url].restart()
                injected.append({"fault": fault, **at})
            elif fault in ("server_stop", "server_kill"):
                its_workers, killed_at = server.worker_pids(), time.monotonic()
                server.stop(signal.SIGTERM if fault == "server_stop" else signal.SIGKILL)
                for pid in its_workers:
                    watches.append(threading.Thread(target=watch_orphan, args=(pid, killed_at), daemon=True))
                    watches[-1].start()
                server.start()
                injected.append({"fault": fault, **at, "its_workers": its_workers,
                                 "down_s": round(time.monotonic() - killed_at, 1)})
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
        with sessions() as s:
            gens = dict(s.execute(select(Generation.request_id, func.count()).group_by(Generation.request_id)).all())
            detail = {r.request_id: {"status": r.status, "error": r.error, "step": r.step, "claims": r.attempts,
                                     "sends": r.dispatches, "worker": r.worker, "heartbeat_at": str(r.heartbeat_at)}
                      for r in s.scalars(select(RenderRequest))}
    finally:
        channel.close()
        injector.join(60)
        for watch in watches:  # a killed server's worker: gone by now, or reported as an orphan
            watch.join(settings.render_timeout_s + 120)
        server.stop(signal.SIGTERM)
        for w in workers:
            w.stop()
        sessions.kw["bind"].dispose()
    rows = {rid: d["status"] for rid, d in detail.items()}
    rids = list(sent)
    answered = [r for r in rids if answers.get(r)]
    duplicated = [r for r in rids if gens.get(r, 0) > 1 or len({tuple(a) for a in answers.get(r, [])}) > 1]
    lost = [r for r in rids if not answers.get(r) or rows.get(r) != "done" or gens.get(r, 0) != 1]
    # what a lost or duplicated request went through: its row, its images, its client's failed calls
    diagnosis = {r: {"row": detail.get(r), "generations": gens.get(r, 0), "answers": answers.get(r, []),
                     "failed_calls": tried.get(r, [])[-12:]} for r in dict.fromkeys(lost + duplicated)}
    return {"faults_injected": len(injected), "faults": injected, "requests": len(rids), "answered": len(answered),
            "duplicated": len(duplicated), "lost": len(lost), "lost_ids": lost, "duplicated_ids": duplicated,
            "diagnosis_ids": diagnosis, "killed_servers_workers_exit_s": orphans,
            "orphaned_workers": sum(1 for v in orphans.values() if v is None),
            "re_rendered": sum(1 for d in detail.values() if d["claims"] > 1), "calls": calls["attempts"],
            "errors_retried": calls["errors"], "workers_restarted": sum(w.restarts for w in workers),
            "elapsed_s": round(elapsed, 1)}


chaos_broker: dict[str, PrivateRedis | PrivateRabbit] = {}  # broker url -> the private broker behind it
chaos_pg: dict[str, PrivatePostgres] = {}  # database url -> the private cluster behind it (restartable)


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
