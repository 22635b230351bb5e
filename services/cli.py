"""`pigment` console script: serve, demo, db, models (and later eval, train)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from pigment.services.common.errors import FailedPrecondition, PigmentError
from pigment.services.common.settings import Settings


def cmd_serve(args, settings: Settings) -> int:
    from pigment.services.stack import Stack, Worker
    from pigment.services.store.migrate import upgrade

    stack = Stack(settings)
    stack.check_exposure()  # before the worker starts: a refused start leaves nothing running
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
        scheme = "https" if settings.tls_cert_file else "http"
        print(f"HTTP feedback on {scheme}://{settings.host}:{http.port}/v1/feedback", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("draining in-flight requests ...", flush=True)
    server.stop(grace=10).wait()
    stack.close()  # saves the item index: manifest and SQL agree after a clean stop
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

    p = sub.add_parser("auth", help="API keys: add-key prints a new key once and stores only its sha256")
    p.add_argument("action", choices=["add-key", "list", "revoke"])
    p.add_argument("prefix", nargs="?", help="for revoke: the first 8+ characters of the key's hash (list)")
    p.add_argument("--tenant", default=None, help="the tenant the key acts as ('*': every tenant, needs --admin)")
    p.add_argument("--admin", action="store_true", help="admin scope: DeleteUser and segment batches")
    p.add_argument("--note", default="", help="who or what the key is for")
    p.add_argument("--file", type=Path, default=None, help="key file (default PIGMENT_AUTH_KEYS_FILE)")
    p.set_defaults(func=cmd_auth)

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
