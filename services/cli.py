"""`pigment` console script: serve, demo, db, models (and later eval, train)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from pigment.services.common.errors import FailedPrecondition, PigmentError
from pigment.services.common.logs import configure_logging
from pigment.services.common.settings import Settings


def cmd_serve(args, settings: Settings) -> int:
    from pigment.services.common.tracing import setup_tracing
    from pigment.services.stack import Stack, Worker
    from pigment.services.store.migrate import upgrade

    setup_tracing(settings, "pigment-gateway")  # before the engines and the server exist
    stack = Stack(settings)
    stack.check_exposure()  # before the worker starts: a refused start leaves nothing running
    print(f"verifying model files of {stack.preset_dir} ...", flush=True)
    print(f"models verified: {stack.verify_models()}", flush=True)  # before anything serves
    if not args.no_migrate:
        upgrade(settings.database_url)
    worker = Worker(settings, supervise=True).start() if not args.no_worker else None  # restarted when it dies
    server, port = stack.server(port=args.port)
    server.start()
    http = stack.http_server(args.http_port).start() if args.http_port is not None else None
    # URLs stay out of the output: they carry passwords (settings keeps them as SecretStr)
    print(f"pigment serving on {settings.host}:{port} (preset {stack.preset_dir}, db {redact(settings.database_url)}, "
          f"broker {redact(settings.broker_url)}); Ctrl-C to stop", flush=True)
    if http:
        print(f"HTTP/JSON API on {http.url}/v1 (OpenAPI at {http.url}/openapi.json, /healthz, /metrics); "
              f"gallery: open {http.url}/ in a browser", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    drain(server, stack.health, settings)
    stack.close()  # saves the item index: manifest and SQL agree after a clean stop
    if http:
        http.stop()
    if worker:
        worker.stop()
    return 0


def drain(server, health, settings: Settings) -> None:
    """SIGTERM: NOT_SERVING first (load balancers stop routing), then refuse new calls and let those in flight
    finish within the grace (default render timeout + 10 s, so a render in hand completes), then stop."""
    health.enter_graceful_shutdown()
    print(f"NOT_SERVING; draining in-flight calls (grace {settings.grace_s:.0f}s) ...", flush=True)
    if settings.shutdown_delay_s:
        time.sleep(settings.shutdown_delay_s)
    server.stop(grace=settings.grace_s).wait()
    print("drained", flush=True)


def redact(url: str) -> str:
    """A URL with its password masked (for the start-up line)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL (a broker URL): mask user:password@ by hand
        scheme, sep, rest = url.partition("://")
        return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}" if "@" in rest else url


def cmd_worker(args, settings: Settings) -> int:
    from pigment.services.topology import celery_worker_argv, exec_celery

    exec_celery(celery_worker_argv(settings, args.role))
    return 0


def cmd_beat(args, settings: Settings) -> int:
    from pigment.services.topology import celery_beat_argv, exec_celery

    exec_celery(celery_beat_argv(settings))
    return 0


def cmd_probe(args, settings: Settings) -> int:
    """Container HEALTHCHECK: grpc = this host's gRPC health is SERVING; metrics = the worker's /metrics answers."""
    target = args.target or os.environ.get("PIGMENT_PROBE", "grpc")
    try:
        if target == "grpc":
            import grpc
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            with grpc.insecure_channel(f"127.0.0.1:{settings.port}") as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3).status
            ok = status == health_pb2.HealthCheckResponse.SERVING
        elif target == "metrics":
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{settings.worker_metrics_port}/metrics", timeout=3) as r:
                ok = r.status == 200
        elif target == "beat":  # beat syncs its schedule file every few minutes (celery beat_sync_every, 180 s)
            files = list(Path(settings.data_dir).glob("celerybeat-schedule*"))
            age = time.time() - max(f.stat().st_mtime for f in files) if files else float("inf")
            ok = age < 900
            if not ok:
                print(f"probe beat: schedule file not written for {age:.0f}s", file=sys.stderr)
        else:  # the one-shot migration job: its exit status is the check
            ok = True
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", said in one line
        print(f"probe {target}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def cmd_stack(args, settings: Settings) -> int:
    from pigment.services.topology import ProductionStack

    prod = ProductionStack(settings, args.port, Path(args.log_dir), http_port=args.http_port).start()
    print(f"pigment production stack: gateway on {settings.host}:{args.port}, processes "
          f"{', '.join(prod.procs)}; logs in {args.log_dir}; Ctrl-C to stop", flush=True)
    if args.http_port is not None:
        scheme = "https" if settings.tls_cert_file else "http"
        print(f"gallery: open {scheme}://{settings.host}:{args.http_port}/ in a browser "
              f"(HTTP/JSON API under /v1, OpenAPI at /openapi.json)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print(f"exit codes: {prod.stop(timeout=settings.grace_s)}", flush=True)
    return 0


def cmd_db(args, settings: Settings) -> int:
    from pigment.services.store import migrate

    if args.action == "upgrade":
        migrate.upgrade(settings.database_url, args.revision or "head")
    else:
        migrate.downgrade(settings.database_url, args.revision or "base")
    print(f"database {redact(settings.database_url)}: {args.action} to {args.revision or ('head' if args.action == 'upgrade' else 'base')}")
    return 0


def cmd_models(args, settings: Settings) -> int:
    from pigment.services.models_cli import run

    return run(args, settings)


def cmd_auth(args, settings: Settings) -> int:
    from pigment.services.common import auth

    path = args.file or settings.auth_keys_file
    if path is None:
        raise FailedPrecondition("no key file: pass --file PATH or set PIGMENT_AUTH_KEYS_FILE")
    if args.action == "add-key":
        if not args.tenant:
            raise FailedPrecondition("add-key needs --tenant NAME ('*' with --admin: an operator key)")
        key = auth.add_key(path, args.tenant, admin=args.admin, note=args.note)
        print(f"# tenant {args.tenant}{' (admin)' if args.admin else ''}; sha256 {auth.hash_key(key)[:12]} "
              f"stored in {path}. The key is shown only now:", file=sys.stderr)
        print(key)
    elif args.action == "list":
        for digest, entry in auth.list_keys(path).items():
            print(f"{digest[:12]}  tenant={entry['tenant']}  scopes={','.join(entry.get('scopes') or []) or '-'}"
                  f"  {entry.get('created', '')}  {entry.get('note', '')}")
    else:
        print(f"revoked {auth.revoke_key(path, args.prefix or '')[:12]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pigment", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the embedded stack (gRPC + render worker) until interrupted")
    p.add_argument("--port", type=int, default=None, help="gRPC port (default from settings: 50051)")
    p.add_argument("--no-worker", action="store_true", help="do not start a render worker (one runs elsewhere)")
    p.add_argument("--http-port", type=int, default=None, help="also serve the HTTP/JSON API (/v1, OpenAPI at "
                   "/openapi.json), the gallery (/) and Prometheus /metrics on this port (0 = a free one); off by "
                   "default")
    p.add_argument("--no-migrate", action="store_true", help="do not migrate at start (a one-shot job does)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run one Celery worker role (exec's celery): render | batch | retrain")
    p.add_argument("role", choices=["render", "batch", "retrain"])
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("beat", help="run Celery beat (the retrain schedule); exactly one per deployment")
    p.set_defaults(func=cmd_beat)

    p = sub.add_parser("probe", help="container health check: grpc (gateway) | metrics (worker) | beat (its "
                       "schedule file is fresh) | none (migration job); default $PIGMENT_PROBE or grpc")
    p.add_argument("target", nargs="?", choices=["grpc", "metrics", "beat", "none"])
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("stack", help="run the production topology here: migrate once, gateway, a worker per "
                       "queue and beat as separate processes (needs PostgreSQL and Redis/RabbitMQ)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=None, help="the gateway's HTTP/JSON API and gallery port")
    p.add_argument("--log-dir", default="pigment-stack-logs")
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("db", help="database migrations")
    p.add_argument("action", choices=["upgrade", "downgrade"])
    p.add_argument("revision", nargs="?")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("models", help="build, record and verify model presets; the adapter registry")
    from pigment.services.models_cli import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("auth", help="API keys: add-key prints a new key once and stores only its sha256")
    p.add_argument("action", choices=["add-key", "list", "revoke"])
    p.add_argument("prefix", nargs="?", help="for revoke: the first 8+ characters of the key's hash (list)")
    p.add_argument("--tenant", default=None, help="the tenant the key acts as ('*': every tenant, needs --admin)")
    p.add_argument("--admin", action="store_true", help="admin scope: DeleteUser and segment batches")
    p.add_argument("--note", default="", help="who or what the key is for")
    p.add_argument("--file", type=Path, default=None, help="key file (default PIGMENT_AUTH_KEYS_FILE)")
    p.set_defaults(func=cmd_auth)

    for register in _extensions():
        try:
            register(sub)
        except ModuleNotFoundError as exc:  # its extra is not installed (see _extensions)
            if (exc.name or "pigment").split(".")[0] == "pigment":
                raise
    return parser


# Modules with a `register(subparsers)` adding their own subcommands: plug-ins found by name, so serving
# code never imports them (`pigment.training.cli` adds eval, train and the toy world's demo).
EXTENSIONS = ("pigment.training.cli", "pigment.services.batch_cli", "pigment.services.history.ingest")


def _extensions():
    """Subcommands contributed by other modules (eval, train ...), if present."""
    import importlib

    for module in EXTENSIONS:
        try:
            yield importlib.import_module(module).register
        except ModuleNotFoundError as exc:
            # absent module, or a third-party package of an extra this role did not install (a gateway
            # image without torch has no `train`/`eval`); a broken pigment import still raises
            if exc.name != module and (exc.name or "pigment").split(".")[0] == "pigment":
                raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # names after an option (`manifest --dir D unet --size 512x512 vae`) belong to the positional list
    if extra and isinstance(getattr(args, "components", None), list) and not any(x.startswith("-") for x in extra):
        args.components += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        settings = Settings()
        configure_logging(args.log_level, settings.log_format)
        return args.func(args, settings)
    except PigmentError as exc:
        print(f"pigment {args.command}: {exc.status}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
