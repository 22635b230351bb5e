"""Wires the cores, servicers and the render worker together from one Settings object.

In the embedded default every gRPC service shares one process and one port and
a real Celery worker runs as a child process on the filesystem broker; in
production the same ``Stack`` runs against PostgreSQL and Redis/RabbitMQ.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from functools import cached_property
from pathlib import Path

from pigment.services.common.errors import FailedPrecondition
from pigment.services.common.settings import Settings
from pigment.services.common.storage import ImageStorage
from pigment.services.store.db import make_sessionmaker

log = logging.getLogger("pigment")


def ensure_preset(settings: Settings) -> Path:
    """The preset directory, building ``tiny`` from configs on first use (nothing is downloaded)."""
    preset_dir = settings.preset_dir
    if (preset_dir / "manifest.json").is_file():
        return preset_dir
    if settings.preset == "tiny":
        from pigment.models.tiny import build_tiny

        return build_tiny(preset_dir)
    raise FailedPrecondition(f"preset {settings.preset!r} not found at {preset_dir}: point PIGMENT_PRESET at a "
                             "directory with a manifest.json (`pigment models manifest DIR` writes one)")


class Stack:
    def __init__(self, settings: Settings):
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.preset_dir = ensure_preset(settings)
        self.sessions = make_sessionmaker(settings.database_url)
        self.storage = ImageStorage(settings.storage_dir)

    def verify_models(self) -> dict:
        """Every component's files against the manifest (ModelIntegrityError names a bad one); files verified
        before, unchanged since (size, mtime, inode), are not re-hashed."""
        from pigment.models.loader import verify_preset

        return verify_preset(self.preset_dir, self.settings.verified_files)

    def close(self) -> None:
        """Save and release what the stack opened (the item index), when the server stops."""
        history = self.__dict__.get("history")
        index = history._index if history is not None else None
        if index is not None:
            index.close()
        if "notifier" in self.__dict__:  # the LISTEN connection (PostgreSQL)
            self.notifier.close()

    @cached_property
    def keys(self):
        """The operator's API keys, or None: no auth (refused off loopback, see ``check_exposure``)."""
        from pigment.services.common.auth import KeyStore

        return KeyStore(self.settings.auth_keys_file) if self.settings.auth_keys_file else None

    @cached_property
    def limiter(self):
        """Per-tenant call limits and image quotas, or None when none are configured."""
        from pigment.services.common.auth import RateLimiter

        s = self.settings
        limiter = RateLimiter(s.rate_limit_storage, s.rate_limit_calls, s.rate_limit_images, s.rate_limit_tenants)
        return limiter if limiter.enabled else None

    def _charge_images(self, principal, n: int) -> None:
        if self.limiter is not None:
            self.limiter.charge(principal, "images", n)

    def check_exposure(self) -> None:
        """Refuse (FailedPrecondition) to serve without keys off loopback; call before starting anything."""
        from pigment.services.common.auth import check_exposure, is_loopback

        check_exposure(self.settings.host, self.keys is not None)
        if not self.settings.tls_cert_file and not is_loopback(self.settings.host) and not self.__dict__.get("_warned"):
            self._warned = True
            log.warning("serving plaintext on %s: API keys cross the network in clear unless TLS terminates in "
                        "front (set PIGMENT_TLS_CERT_FILE/PIGMENT_TLS_KEY_FILE otherwise)", self.settings.host)

    @cached_property
    def history(self):
        from pigment.services.common.limits import InputLimits
        from pigment.services.history.core import HistoryCore

        core = HistoryCore(self.sessions, self.storage, self._embedder, self._index,
                           limits=InputLimits.from_settings(self.settings))
        core.on_delete_user.append(self._forget_user)
        return core

    def _forget_user(self, user_id: str) -> None:
        """After a GDPR deletion: drop cached preferences (keyed by history, not user, so all of them)."""
        if "preference" in self.__dict__:  # built: it may hold keywords computed from the user's history
            self.preference.clear_cache()

    def _embedder(self):
        from pigment.models.clip_embedder import ClipEmbedder
        from pigment.models.loader import has_component

        return ClipEmbedder(self.preset_dir) if has_component(self.preset_dir, "clip") else None

    def _index(self, embedder):
        if embedder is None:
            return None
        from pigment.services.history.index import ItemIndex

        return ItemIndex.open(self.settings.index_dir, self.sessions, embedding_model=embedder.model_id, dim=embedder.dim,
                              config=self.settings.index_config())

    @cached_property
    def preference(self):
        from pigment.services.preference.core import PreferenceCore
        from pigment.services.registry import Registry

        def encoder(adapter_dir=None):
            from pigment.models.preference import PreferenceEncoder

            return PreferenceEncoder(self.preset_dir, device=self.settings.render_device, adapter_dir=adapter_dir)

        return PreferenceCore(encoder, Registry(self.sessions), explore_rate=self.settings.preference_explore_rate,
                              explore_seed=self.settings.preference_explore_seed)

    @cached_property
    def celery(self):
        from pigment.services.render.celery_app import make_celery

        return make_celery(self.settings)

    @cached_property
    def gateway(self):
        from pigment.services.render.celery_app import dispatcher

        return self.make_gateway(dispatcher(self.celery, self.settings.render_batch_window_ms / 1000,
                                            self.settings.render_max_batch))

    def make_gateway(self, dispatch):
        """A GatewayCore handing renders to ``dispatch(request_id)``: the queue, or a local render core (batch jobs)."""
        from pigment.models.loader import (
            image_limits,
            preset_file,
            preset_version,
            sampler_defaults,
        )
        from pigment.services.gateway.core import GatewayCore
        from pigment.services.registry import Registry

        defaults = sampler_defaults(self.preset_dir)
        pref_cfg = preset_file(self.preset_dir, "preference.json")
        if pref_cfg:
            cfg = json.loads(pref_cfg.read_text())
            defaults.update({k: cfg[k] for k in ("keyword_weight", "soft_weight", "soft_weight_alone") if k in cfg})
        return GatewayCore(self.settings, self.sessions, self.history, self.preference, dispatch,
                           self.storage, defaults, lambda: preset_version(self.preset_dir),
                           decider=self._decider(), adapters=self._stamped_adapters(Registry(self.sessions)),
                           charge_images=self._charge_images,
                           limits=image_limits(self.preset_dir, self.settings.render_backend),
                           notifier=self.notifier, references=self._references())

    def _references(self):
        """Reference images are accepted when the preset ships a reference projector (models/reference.py)."""
        from pigment.models.loader import has_component
        from pigment.services.common.limits import InputLimits
        from pigment.services.gateway.references import References

        why = None if has_component(self.preset_dir, "reference_projector") else (
            f"the preset at {self.preset_dir} has no reference_projector (`pigment train reference --install` "
            "trains one)")
        return References(self.history, self.storage, InputLimits.from_settings(self.settings), unavailable=why)

    @cached_property
    def notifier(self):
        """How waiting calls learn a render finished: LISTEN/NOTIFY on PostgreSQL, else SQL polling."""
        from pigment.services.store.notify import make_notifier

        return make_notifier(self.settings)

    def _stamped_adapters(self, registry):
        """Active adapter versions to stamp on a request; the preference kinds are those that wrote its keywords."""
        from pigment.services.preference.core import PIGEON_KIND

        def adapters() -> dict:
            active = registry.active_versions()
            used = self.preference.used_versions()
            if used is None:
                return active
            return {**{k: v for k, v in active.items() if k != PIGEON_KIND}, **used}

        return adapters

    def _decider(self):
        """GILL-style retrieve-or-generate, when the preset has a CLIP to embed the catalog with.

        Cheap to build: the CLIP and the index load on the first decision (HistoryCore is lazy).
        """
        from pigment.models.loader import has_component

        if not has_component(self.preset_dir, "clip"):
            return None
        from pigment.models.loader import read_manifest
        from pigment.services.gateway.decision import Decider

        tuned = read_manifest(self.preset_dir).get("retrieval", {}).get("threshold")
        return Decider.from_settings(self.history, self.settings, tuned)

    @cached_property
    def edit(self):
        """EditImage on the gateway: instructions read with the preset's vocabulary, rendered by the workers."""
        from pigment.models.edit import EditConfig, describe_image
        from pigment.models.loader import has_component, preset_file
        from pigment.models.preference import KeywordVocabulary
        from pigment.services.common.limits import InputLimits
        from pigment.services.gateway.edit import EditCore

        vocab = preset_file(self.preset_dir, "keywords.json")
        pref = preset_file(self.preset_dir, "preference.json")
        schema = json.loads(pref.read_text()).get("prompt_schema") if pref else None
        words = KeywordVocabulary(json.loads(vocab.read_text()) if vocab else None)
        config = EditConfig.load(self.preset_dir)
        describe = None
        if config.describe and has_component(self.preset_dir, "clip"):  # an upload has no prompt: CLIP reads one

            def describe(image):
                return describe_image(image, self.history.embedder, words, config.describe, schema)

        return EditCore(self.gateway, words, config, InputLimits.from_settings(self.settings), schema, describe)

    @cached_property
    def feedback(self):
        from pigment.services.gateway.feedback import FeedbackCore

        return FeedbackCore(self.sessions)

    @cached_property
    def jobs(self):
        from pigment.services.gateway.jobs import JobsCore
        from pigment.services.render.celery_app import chunk_dispatcher

        return JobsCore(self.settings, self.sessions, chunk_dispatcher(self.celery, self.settings),
                        charge_images=self._charge_images)

    @cached_property
    def url_signer(self):
        """Signs short-lived image URLs the HTTP face serves (services/gateway/urls.py)."""
        from pigment.services.gateway.urls import UrlSigner, load_secret

        s = self.settings
        secret = load_secret(s.url_signing_key_file or s.data_dir / "url-signing.key")
        return UrlSigner(secret, s.image_url_ttl_s, s.public_http_url)

    @cached_property
    def generations(self):
        from pigment.services.gateway.generations import GenerationsCore

        return GenerationsCore(self.sessions, self.storage, self.url_signer, self.settings.inline_image_max_bytes)

    @cached_property
    def servicers(self) -> dict:
        """The gRPC servicers by service name; the HTTP face transcodes to the same objects."""
        from pigment.services.gateway.servicer import GenerationServicer
        from pigment.services.history.servicer import HistoryServicer
        from pigment.services.preference.servicer import PreferenceServicer

        return {"pigment.v1.HistoryService": HistoryServicer(self.history, self.generations),
                "pigment.v1.PreferenceService": PreferenceServicer(self.preference, self.history),
                "pigment.v1.GenerationService": GenerationServicer(self.gateway, self.feedback, self.jobs,
                                                                   self.generations, self.edit)}

    def http_server(self, port: int = 0):
        """The HTTP/JSON face and gallery (not started); port 0 binds a free one. Same keys, limits and TLS as
        gRPC. Unless PIGMENT_PUBLIC_HTTP_URL says otherwise, signed image URLs point at it."""
        from pigment.services.gateway.http import HttpContext, HTTPServer

        self.check_exposure()
        s = self.settings
        ctx = HttpContext(generation=self.servicers["pigment.v1.GenerationService"],
                          history=self.servicers["pigment.v1.HistoryService"], generations=self.generations,
                          sessions=self.sessions, settings=s, keys=self.keys, limiter=self.limiter)
        server = HTTPServer(ctx, s.host, port, tls=(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)
                            if s.tls_cert_file else None)
        if not self.url_signer.base_url:
            from pigment.services.common.auth import is_loopback

            if not is_loopback(s.host):
                log.warning("signed image URLs point at %s, the address the HTTP face binds: set "
                            "PIGMENT_PUBLIC_HTTP_URL to where clients reach it", server.url)
            self.url_signer.base_url = server.url
        return server

    def server(self, port: int | None = None):
        """A gRPC server with all three services; returns (server, bound port)."""
        from pigment.services.common.server import create_server
        from pigment.v1 import generation_pb2_grpc, history_pb2_grpc, preference_pb2_grpc

        adders = {"pigment.v1.HistoryService": history_pb2_grpc.add_HistoryServiceServicer_to_server,
                  "pigment.v1.PreferenceService": preference_pb2_grpc.add_PreferenceServiceServicer_to_server,
                  "pigment.v1.GenerationService": generation_pb2_grpc.add_GenerationServiceServicer_to_server}
        registrations = [(adders[name], servicer, name) for name, servicer in self.servicers.items()]
        from pigment.services.common.grpc_auth import AuthInterceptor, server_credentials
        from pigment.services.common.metrics import watch_queue_depth

        self.check_exposure()
        s = self.settings
        port = s.port if port is None else port
        credentials = server_credentials(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file) \
            if s.tls_cert_file else None
        server, bound, self.health = create_server(registrations, f"{s.host}:{port}",
                                                   max_concurrent_rpcs=s.max_concurrent_rpcs,
                                                   reserve=s.grpc_reserve_threads,
                                                   interceptors=[AuthInterceptor(self.keys, self.limiter)],
                                                   credentials=credentials)
        self._start_background(server, self.health, [name for _, _, name in registrations])
        watch_queue_depth(self.sessions)
        return server, bound

    def readiness(self):
        from pigment.services.common.readiness import Readiness

        return Readiness(self.sessions, self.settings.render_queue, self.settings.heartbeat_stale_s,
                         broker_check=None if self.settings.broker_url.startswith("filesystem") else self._broker_ping)

    def _broker_ping(self) -> None:
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=3)

    def _start_background(self, server, health, names: list[str]) -> None:
        """Readiness into the health service, and the reaper of stranded requests; both stop with the server."""
        import threading

        from pigment.services.common.readiness import Periodic
        from pigment.services.common.server import set_readiness

        readiness, interval = self.readiness(), self.settings.heartbeat_interval_s
        loops = [Periodic("readiness", lambda: set_readiness(health, names, readiness.problems()), interval),
                 # an unmigrated database has nothing to sweep: readiness says so, once, instead
                 Periodic("reaper", lambda: readiness.schema_ok and self.gateway.reaper.sweep(),
                          self.settings.reaper_interval_s)]
        set_readiness(health, names, ["starting: readiness not checked yet"])

        def run() -> None:
            for loop in loops:
                loop.start()
            server.wait_for_termination()
            for loop in loops:
                loop.stop()

        threading.Thread(target=run, name="stack-background", daemon=True).start()


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that reproduces ``settings`` in a child process (the worker)."""
    env = dict(os.environ)
    for name in ("data_dir", "database_url", "broker_url", "storage_dir", "index_dir", "preset", "render_backend",
                 "render_device", "render_queue", "render_timeout_s", "worker_max_tasks_per_child",
                 "heartbeat_interval_s", "heartbeat_stale_s", "max_render_attempts",
                 "retrain_every_s", "retrain_kind", "retrain_queue", "retrain_timeout_s", "retrain_max_pairs_per_user",
                 "retrain_min_pairs", "retrain_eval_samples", "retrain_eval_seed", "retrain_max_fidelity_drop",
                 "render_dtype", "retrain_gate", "worker_plugins", "retrieval_threshold",
                 "log_format", "trace_exporter", "render_notify", "trace_file", "worker_metrics_port"):
        value = getattr(settings, name)
        if value is None:  # optional: unset stays unset
            env.pop(f"PIGMENT_{name.upper()}", None)
            continue
        env[f"PIGMENT_{name.upper()}"] = json.dumps(value) if isinstance(value, list) else str(value)
    env["PIGMENT_PRESET"] = str(settings.preset_dir)
    if settings.retrain_config:
        env["PIGMENT_RETRAIN_CONFIG"] = str(settings.retrain_config)
    return env


_WORKER_SEQ = itertools.count(1)


class Worker:
    """A real Celery worker process consuming the render queue and the batch queue.

    It dies with the process that started it (PR_SET_PDEATHSIG on Linux and a parent watchdog, both in
    services/render/liveness.py; not a preexec_fn, which would run gRPC's fork handlers in the child), and with ``supervise=True`` a monitor thread restarts it whenever it dies."""

    def __init__(self, settings: Settings, log_path: Path | None = None, concurrency: int = 1,
                 supervise: bool = False):
        self.settings = settings
        self.log_path = log_path or settings.data_dir / "worker.log"
        self.concurrency = concurrency
        self.supervise = supervise
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        # a node name of its own: two workers of one process named alike collide on RabbitMQ (the second
        # dies declaring its exclusive remote-control queue: RESOURCE_LOCKED)
        self.name = f"{os.getpid()}-{next(_WORKER_SEQ)}"

    def _command(self) -> list[str]:
        from pigment.services.render.celery_app import batch_queue

        queues = [self.settings.render_queue, batch_queue(self.settings), self.settings.retrain_queue]
        cmd = [sys.executable, "-m", "celery", "-A", "pigment.services.render.worker", "worker",
               "-Q", ",".join(queues), "--pool", "solo" if self.concurrency == 1 else "prefork",
               "--concurrency", str(self.concurrency), "--loglevel", "INFO",
               "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"render-{self.name}@%h"]
        if self.settings.retrain_every_s > 0:  # embedded: this worker also runs beat (the retrain schedule)
            cmd += ["-B", "--schedule", str(self.settings.data_dir / "celerybeat-schedule")]
        return cmd

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a")  # noqa: SIM115 - the child writes to it until stop()
        self._log_start = self.log_path.stat().st_size
        env = {**settings_env(self.settings), "PIGMENT_PARENT_PID": str(os.getpid())}
        self.proc = subprocess.Popen(self._command(), env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._spawned_at = time.monotonic()

    def start(self, wait_ready_s: float = 120.0) -> Worker:
        if self.log_path.exists():
            self.log_path.unlink()
        self._spawn()
        self.wait_ready(wait_ready_s)
        if self.supervise:
            threading.Thread(target=self._monitor, name="worker-supervisor", daemon=True).start()
        return self

    def wait_ready(self, wait_ready_s: float = 120.0) -> None:
        deadline = time.monotonic() + wait_ready_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"render worker exited with {self.proc.returncode}; see {self.log_path}")
            with open(self.log_path) as f:
                f.seek(self._log_start)
                if "ready." in f.read():
                    return
            time.sleep(0.2)
        raise RuntimeError(f"render worker not ready after {wait_ready_s}s; see {self.log_path}")

    def _monitor(self) -> None:
        """Restart the worker when it dies; back off (up to 30 s) while it keeps dying within 30 s of its start."""
        backoff = 1.0
        while not self._stopping.wait(0.5):
            if self.proc.poll() is None:
                continue
            if time.monotonic() - self._spawned_at > 30:  # it ran a while: not a crash at start-up, no backoff
                backoff = 1.0
            log.error("render worker (pid %d) exited with %s; restarting it in %.0f s", self.proc.pid,
                      self.proc.returncode, backoff)
            if self._stopping.wait(backoff):
                return
            self._log.close()
            self._spawn()
            self.restarts += 1
            backoff = min(backoff * 2, 30.0)

    def stop(self, timeout: float = 20.0) -> None:
        self._stopping.set()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def kill(self) -> None:
        """Simulate a worker loss (tests): kill -9; a supervised worker is restarted."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
