"""The production topology in one place: each role's process, as compose, k8s and ``pigment stack`` start it.

Roles (one process each; scale each on its own):

| role | command | consumes |
|---|---|---|
| migrate | ``pigment db upgrade`` (one-shot, under a PostgreSQL advisory lock) | - |
| gateway | ``pigment serve --no-worker --no-migrate`` (gRPC + HTTP /metrics) | - |
| render | ``pigment worker render`` | ``render_queue`` (one device class per pool) |
| batch | ``pigment worker batch`` | ``<render_queue>.batch`` |
| retrain | ``pigment worker retrain`` | ``retrain_queue`` |
| beat | ``pigment beat`` (exactly one) | - (schedules retrain) |

``deploy/compose.yaml`` and ``deploy/k8s/`` start these commands; the
manifest test checks that every queue has a consumer and one beat runs, and
``ProductionStack`` runs the same commands here as child processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

WORKER_ROLES = ("render", "batch", "retrain")
CELERY_APP = "pigment.services.render.worker"


def worker_queue(settings, role: str) -> str:
    from pigment.services.render.celery_app import batch_queue

    queues = {"render": settings.render_queue, "batch": batch_queue(settings), "retrain": settings.retrain_queue}
    if role not in queues:
        raise ValueError(f"worker role {role!r} is unknown: allowed {', '.join(WORKER_ROLES)}")
    return queues[role]


def celery_worker_argv(settings, role: str, name: str | None = None) -> list[str]:
    """Celery's arguments for one worker role: solo pool (one process per device), late ack from the app."""
    return ["-A", CELERY_APP, "worker", "-Q", worker_queue(settings, role), "--pool", "solo",
            "--loglevel", "INFO", "--without-gossip", "--without-mingle", "-n", name or f"{role}-{os.getpid()}@%h"]


def celery_beat_argv(settings) -> list[str]:
    return ["-A", CELERY_APP, "beat", "--loglevel", "INFO",
            "--schedule", str(Path(settings.data_dir) / "celerybeat-schedule")]


def exec_celery(argv: list[str]) -> None:
    """Replace this process with Celery (signals such as SIGTERM reach Celery itself: warm shutdown)."""
    os.execv(sys.executable, [sys.executable, "-m", "celery", *argv])


class ProductionStack:
    """The production topology as child processes on this machine: migrate once, then a gateway, one worker per
    queue and one beat, each its own process started by the same ``pigment`` commands as the manifests."""

    def __init__(self, settings, port: int, log_dir: Path, http_port: int | None = None):
        from pigment.services.stack import settings_env

        if settings.embedded or settings.database_url.startswith("sqlite"):
            raise ValueError("the production stack needs PostgreSQL and a broker server (PIGMENT_DATABASE_URL, "
                             "PIGMENT_BROKER_URL); the embedded mode is `pigment serve`")
        self.settings, self.port, self.http_port = settings, port, http_port
        self.log_dir = Path(log_dir)
        self.env = settings_env(settings)
        self.env["PIGMENT_HOST"] = settings.host
        self.procs: dict[str, subprocess.Popen] = {}

    def commands(self) -> dict[str, list[str]]:
        cli = [sys.executable, "-m", "pigment.services.cli", "--log-level", "INFO"]
        gateway = [*cli, "serve", "--no-worker", "--no-migrate", "--port", str(self.port)]
        if self.http_port is not None:
            gateway += ["--http-port", str(self.http_port)]
        return {"gateway": gateway, **{f"worker-{r}": [*cli, "worker", r] for r in WORKER_ROLES},
                "beat": [*cli, "beat"]}

    def start(self, ready_s: float = 180.0) -> ProductionStack:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        migrate = subprocess.run([sys.executable, "-m", "pigment.services.cli", "db", "upgrade"], env=self.env, check=False,
                                 capture_output=True, text=True, timeout=300)
        if migrate.returncode:
            raise RuntimeError(f"migration failed: {migrate.stderr[-2000:]}")
        for name, cmd in self.commands().items():
            with open(self.log_dir / f"{name}.log", "w") as log:  # the child keeps its own descriptor
                self.procs[name] = subprocess.Popen(cmd, env=self.env_of(name), stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready(ready_s)
        return self

    def metrics_port(self, name: str) -> int | None:
        """Pods each own port 9100; on one machine the workers take consecutive ports from the setting."""
        base = self.settings.worker_metrics_port
        if base is None or not name.startswith("worker-"):
            return None
        return base + WORKER_ROLES.index(name.removeprefix("worker-"))

    def env_of(self, name: str) -> dict[str, str]:
        env = dict(self.env)
        env.pop("PIGMENT_WORKER_METRICS_PORT", None)
        if self.metrics_port(name) is not None:
            env["PIGMENT_WORKER_METRICS_PORT"] = str(self.metrics_port(name))
        return env

    def _wait_ready(self, ready_s: float) -> None:
        deadline = time.monotonic() + ready_s
        markers = {name: ("ready." if name.startswith("worker") else "beat: Starting" if name == "beat"
                          else "pigment serving") for name in self.procs}
        pending = set(self.procs)
        while pending and time.monotonic() < deadline:
            for name in list(pending):
                if self.procs[name].poll() is not None:
                    raise RuntimeError(f"{name} exited with {self.procs[name].returncode}: {self.tail(name)}")
                if markers[name] in self.tail(name, 100_000):
                    pending.discard(name)
            time.sleep(0.3)
        if pending:
            raise RuntimeError(f"not ready after {ready_s}s: {sorted(pending)}")

    def tail(self, name: str, chars: int = 2000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, timeout: float = 30.0) -> dict[str, int]:
        """SIGTERM everything (gateway first: it drains), then wait; returns the exit codes."""
        for name in sorted(self.procs, key=lambda n: n != "gateway"):
            if self.procs[name].poll() is None:
                self.procs[name].terminate()
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = proc.wait()
        return codes
