"""`pigment` console script: serve, demo, db, models (and later eval, train)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from pigment.services.common.errors import PigmentError
from pigment.services.common.settings import Settings


def cmd_serve(args, settings: Settings) -> int:
    from pigment.services.stack import Stack, Worker
    from pigment.services.store.migrate import upgrade

    stack = Stack(settings)
    print(f"verifying model files of {stack.preset_dir} ...", flush=True)
    print(f"models verified: {stack.verify_models()}", flush=True)  # before anything serves
    upgrade(settings.database_url)
    worker = Worker(settings).start() if not args.no_worker else None
    server, port = stack.server(port=args.port)
    server.start()
    http = stack.http_server(args.http_port).start() if args.http_port is not None else None
    print(f"pigment serving on {settings.host}:{port} (preset {stack.preset_dir}, db {settings.database_url}, "
          f"broker {settings.broker_url}); Ctrl-C to stop", flush=True)
    if http:
        print(f"HTTP feedback on http://{settings.host}:{http.port}/v1/feedback", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("draining in-flight requests ...", flush=True)
    server.stop(grace=10).wait()
    if http:
        http.stop()
    if worker:
        worker.stop()
    return 0


def cmd_db(args, settings: Settings) -> int:
    from pigment.services.store import migrate

    if args.action == "upgrade":
        migrate.upgrade(settings.database_url, args.revision or "head")
    else:
        migrate.downgrade(settings.database_url, args.revision or "base")
    print(f"database {settings.database_url}: {args.action} to {args.revision or ('head' if args.action == 'upgrade' else 'base')}")
    return 0


def cmd_models(args, settings: Settings) -> int:
    from pigment.services.models_cli import run

    return run(args, settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pigment", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the embedded stack (gRPC + render worker) until interrupted")
    p.add_argument("--port", type=int, default=None, help="gRPC port (default from settings: 50051)")
    p.add_argument("--no-worker", action="store_true", help="do not start a render worker (one runs elsewhere)")
    p.add_argument("--http-port", type=int, default=None, help="also serve HTTP feedback (POST /v1/feedback) "
                   "on this port (0 = a free one); off by default")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("db", help="database migrations")
    p.add_argument("action", choices=["upgrade", "downgrade"])
    p.add_argument("revision", nargs="?")
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("models", help="build, record and verify model presets; the adapter registry")
    from pigment.services.models_cli import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_models)

    for register in _extensions():
        register(sub)
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
            if exc.name != module:
                raise


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # names after an option (`manifest --dir D unet --size 512x512 vae`) belong to the positional list
    if extra and isinstance(getattr(args, "components", None), list) and not any(x.startswith("-") for x in extra):
        args.components += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args, Settings())
    except PigmentError as exc:
        print(f"pigment {args.command}: {exc.status}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
