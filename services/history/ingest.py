"""`pigment ingest --items FILE.jsonl`: load a catalog in batches, resumably; `pigment index rebuild|stats`.

One JSON object per line::

    {"item_id": "sku-1", "caption": "a red star", "image_path": "images/sku-1.png",
     "tenant": "acme", "attributes": {"colour": "red"}}

``image_path`` is relative to the JSONL file and must lie under the ingest root
(``ingest_root``, default the JSONL file's folder; absolute or ``../`` paths that
leave it are refused, so a catalog file cannot publish other files of the server).
``image_b64`` carries the bytes inline instead; an item with neither is embedded
from its caption. Items go
to the history service in batches (``UpsertItems``: CLIP-embedded, written to
SQL with the embedding model's id, then the FAISS index catches up), either
in-process (default; needs the index's writer lock, so no server may be
running on the same data) or through a running server (``--address``).

Resuming: after each committed batch a progress file beside the input
(``FILE.jsonl.progress.json``) records how many lines are done and with which
embedding model; a rerun starts after them. If the file's head changed, or the
service now embeds with another model, it starts over. In-process, items that
already have an embedding from the current model are also skipped, so a rerun
without the progress file costs only reading the file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from pigment.services.common.errors import InvalidInput, PigmentError, Unavailable
from pigment.services.common.ids import check_id, show
from pigment.services.common.limits import InputLimits
from pigment.services.history.core import ItemRecord

log = logging.getLogger(__name__)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEAD_BYTES = 1 << 16  # the file identity for resuming: sha256 of its first 64 KiB
MAX_BATCH_BYTES = 3 << 20  # stay under gRPC's default 4 MiB message limit


class Sink(Protocol):
    def upsert(self, records: Sequence[ItemRecord]) -> str:
        """Upsert and embed; return the embedding model id."""

    def embedded(self, item_ids: Sequence[str]) -> set[str]:
        """Which of ``item_ids`` already have an embedding from the current model (may be empty if unknown)."""

    def current_model(self) -> str:
        """The embedding model id, if known before an upsert ("" if not)."""


# --------------------------------------------------------------------------- sinks


class LocalSink:
    """In-process: a HistoryCore (its embedder and the index's writer lock)."""

    def __init__(self, history_core):
        self.core = history_core

    def upsert(self, records: Sequence[ItemRecord]) -> str:
        self.core.upsert_items(records)
        return self.current_model()

    def current_model(self) -> str:
        return self.core.embedder.model_id if self.core.embedder is not None else ""

    def embedded(self, item_ids: Sequence[str]) -> set[str]:
        from pigment.services.store.db import transaction
        from pigment.services.store.tables import Item
        from sqlalchemy import select

        if self.core.embedder is None:
            return set()
        with transaction(self.core.sessions) as s:
            return set(
                s.scalars(
                    select(Item.item_id).where(
                        Item.item_id.in_(list(item_ids)),
                        Item.deleted.is_(False),
                        Item.embedding.is_not(None),
                        Item.embedding_model == self.core.embedder.model_id,
                    )
                )
            )


class GrpcSink:
    """Through a running server's ``HistoryService.UpsertItems``."""

    def __init__(self, channel, timeout_s: float = 300.0):
        from pigment.v1 import history_pb2_grpc

        self.stub = history_pb2_grpc.HistoryServiceStub(channel)
        self.timeout_s = timeout_s

    def upsert(self, records: Sequence[ItemRecord]) -> str:
        import grpc
        from pigment.v1 import history_pb2 as pb

        request = pb.UpsertItemsRequest(
            items=[
                pb.Item(
                    item_id=r.item_id,
                    caption=r.caption,
                    image_png=r.image_png or b"",
                    tenant=r.tenant or "",
                    attributes={k: str(v) for k, v in r.attributes.items()},
                )
                for r in records
            ]
        )
        try:
            return self.stub.UpsertItems(request, timeout=self.timeout_s).embedding_model
        except grpc.RpcError as exc:
            error = next((c for c in _error_classes() if c.status == exc.code().name), Unavailable)
            raise error(f"UpsertItems failed: {exc.details()}") from None

    def embedded(self, item_ids: Sequence[str]) -> set[str]:
        return set()  # the service does not say; the progress file does the resuming

    def current_model(self) -> str:
        return ""  # UpsertItems reports it


def _error_classes():
    stack = list(PigmentError.__subclasses__())
    while stack:
        cls = stack.pop(0)
        stack += cls.__subclasses__()
        yield cls


# --------------------------------------------------------------------------- reading


def parse_line(obj: object, base_dir: Path, where: str, root: Path | None = None,
               limits: InputLimits | None = None) -> ItemRecord:
    """One JSONL object -> ItemRecord (image as PNG bytes); InvalidInput names the line and field."""
    if not isinstance(obj, dict):
        raise InvalidInput(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"item_id", "caption", "image_path", "image_b64", "tenant", "attributes"}
    if unknown:
        raise InvalidInput(
            f"{where}: unknown fields {sorted(unknown)}: allowed item_id, caption, image_path, "
            "image_b64, tenant, attributes"
        )
    item_id, caption = obj.get("item_id"), obj.get("caption", "")
    check_id(f"{where}: item_id", item_id)
    if not isinstance(caption, str):
        raise InvalidInput(f"{where}: caption must be a string")
    attributes = obj.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise InvalidInput(f"{where}: attributes must be an object of strings")
    return ItemRecord(
        item_id,
        caption,
        _image(obj, base_dir, where, root or base_dir, limits or InputLimits()),
        None,
        obj.get("tenant") or None,
        {str(k): str(v) for k, v in attributes.items()},
    )


def _image_file(image_path: object, base_dir: Path, root: Path, where: str, limits: InputLimits) -> bytes:
    """The bytes of ``image_path`` if it resolves (links followed) under ``root``; InvalidInput otherwise."""
    if not isinstance(image_path, str) or "\x00" in image_path:
        raise InvalidInput(f"{where}: image_path must be a path string")
    path = (base_dir / image_path).resolve()
    if not path.is_relative_to(root.resolve()):
        raise InvalidInput(f"{where}: image_path {show(image_path)} is outside the ingest root {root} "
                           "(set PIGMENT_INGEST_ROOT to allow another folder)")
    if path.is_file() and path.stat().st_size > limits.max_image_bytes:
        raise InvalidInput(f"{where}: image {show(image_path)} is over {limits.max_image_bytes} bytes")
    return path.read_bytes()


def _image(obj: dict, base_dir: Path, where: str, root: Path, limits: InputLimits) -> bytes | None:
    if obj.get("image_path") and obj.get("image_b64"):
        raise InvalidInput(f"{where}: give image_path or image_b64, not both")
    try:
        if obj.get("image_path"):
            data = _image_file(obj["image_path"], base_dir, root, where, limits)
        elif obj.get("image_b64"):
            data = base64.b64decode(obj["image_b64"], validate=True)
        else:
            return None
    except (OSError, binascii.Error) as exc:
        raise InvalidInput(f"{where}: image cannot be read: {exc}") from None
    return data if data.startswith(PNG_MAGIC) else _to_png(data, where, limits)


def _to_png(data: bytes, where: str, limits: InputLimits) -> bytes:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        if image.width * image.height > limits.max_image_pixels:
            raise InvalidInput(f"{where}: image is {image.width}x{image.height}: allowed at most "
                               f"{limits.max_image_pixels} pixels")
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"{where}: not a readable image: {exc}") from None
    return buf.getvalue()


def _lines(path: Path, start: int) -> Iterator[tuple[int, object]]:
    """(1-based line number, parsed JSON) for every non-blank line after the first ``start`` lines."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if number <= start or not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"{path}:{number}: not JSON: {exc}") from None


# --------------------------------------------------------------------------- progress


@dataclass
class Progress:
    items_file: str
    head_sha256: str
    lines_done: int = 0
    upserted: int = 0
    skipped: int = 0
    embedding_model: str = ""
    complete: bool = False


def progress_path(items: Path) -> Path:
    return items.with_name(items.name + ".progress.json")


def _head_sha(items: Path) -> str:
    with open(items, "rb") as fh:
        return hashlib.sha256(fh.read(HEAD_BYTES)).hexdigest()


def load_progress(items: Path, path: Path, restart: bool) -> Progress:
    fresh = Progress(str(items.resolve()), _head_sha(items))
    if restart or not path.is_file():
        return fresh
    try:
        saved = Progress(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        log.warning("ignoring unreadable progress file %s (%s): starting over", path, exc)
        return fresh
    if saved.head_sha256 != fresh.head_sha256:
        log.warning("%s changed since the last run: starting over", items)
        return fresh
    return saved


def save_progress(progress: Progress, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(progress), indent=2) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------- the loop


@dataclass
class IngestReport:
    upserted: int
    """Items upserted by this run."""
    skipped: int
    """Items this run skipped because the current model had already embedded them."""
    total_upserted: int
    """Items upserted from this file over every run since it was started (the progress file)."""
    lines_done: int
    batches: int
    seconds: float
    embedding_model: str
    resumed_from: int

    @property
    def items_per_s(self) -> float:
        return self.upserted / self.seconds if self.seconds > 0 else 0.0


def ingest(
    items: str | Path,
    sink: Sink,
    batch: int = 256,
    restart: bool = False,
    show_progress: bool = True,
    max_batch_bytes: int = MAX_BATCH_BYTES,
    root: str | Path | None = None,
    limits: InputLimits | None = None,
) -> IngestReport:
    """Upsert every item of ``items`` (JSONL) through ``sink`` in batches; resumes where a previous run stopped.

    ``root``: image_path files are read only under it (default: the items file's folder)."""
    from tqdm import tqdm

    items = Path(items)
    if batch < 1 or batch > 10_000:
        raise InvalidInput(f"batch={batch} is out of range: allowed 1..10000")
    if not items.is_file():
        raise InvalidInput(f"items file {items} does not exist")
    ppath = progress_path(items)
    prog = load_progress(items, ppath, restart)
    resumed_from, started, batches = prog.lines_done, time.perf_counter(), 0
    upserted = skipped = 0
    with open(items, "rb") as fh:
        total = sum(1 for _ in fh)
    bar = tqdm(
        total=total,
        initial=prog.lines_done,
        unit="line",
        desc=f"ingest {items.name}",
        disable=not show_progress,
    )
    try:
        for last_line, records in _batches(items, prog.lines_done, batch, max_batch_bytes, root, limits):
            done = sink.embedded([r.item_id for r in records])
            todo = [r for r in records if r.item_id not in done]
            model = sink.upsert(todo) if todo else (prog.embedding_model or sink.current_model())
            if prog.lines_done and prog.embedding_model and model != prog.embedding_model:
                log.warning(
                    "embedding model changed (%s -> %s): re-ingesting from the start",
                    prog.embedding_model,
                    model,
                )
                bar.close()
                return ingest(items, sink, batch, True, show_progress, max_batch_bytes, root, limits)
            prog.embedding_model, prog.lines_done = model, last_line
            prog.upserted += len(todo)
            prog.skipped += len(records) - len(todo)
            upserted, skipped = upserted + len(todo), skipped + len(records) - len(todo)
            save_progress(prog, ppath)
            batches += 1
            bar.update(last_line - bar.n)
        prog.lines_done, prog.complete = total, True
        save_progress(prog, ppath)
    finally:
        bar.close()
    return IngestReport(
        upserted,
        skipped,
        prog.upserted,
        prog.lines_done,
        batches,
        time.perf_counter() - started,
        prog.embedding_model or sink.current_model(),
        resumed_from,
    )


def _batches(
    items: Path, start: int, size: int, max_bytes: int, root: str | Path | None = None,
    limits: InputLimits | None = None,
) -> Iterator[tuple[int, list[ItemRecord]]]:
    """(last line number consumed, records) in batches of at most ``size`` items and about ``max_bytes``."""
    records: list[ItemRecord] = []
    nbytes, last = 0, start
    for number, obj in _lines(items, start):
        rec = parse_line(obj, items.parent, f"{items}:{number}", Path(root) if root else None, limits)
        size_of = len(rec.image_png or b"") + len(rec.caption) + 64
        if records and (len(records) >= size or nbytes + size_of > max_bytes):
            yield last, records
            records, nbytes = [], 0
        records.append(rec)
        nbytes += size_of
        last = number
    if records:
        yield last, records


# --------------------------------------------------------------------------- CLI


def cmd_ingest(args, settings) -> int:
    if args.address:
        import grpc
        from pigment.services.common.grpc_auth import bearer_channel

        with grpc.insecure_channel(args.address) as channel:
            report = ingest(args.items, GrpcSink(bearer_channel(channel, settings.api_key)), args.batch, args.restart,
                            root=settings.ingest_root, limits=InputLimits.from_settings(settings))
    else:
        from pigment.services.stack import Stack
        from pigment.services.store.migrate import upgrade

        upgrade(settings.database_url)
        stack = Stack(settings)
        _ = (
            stack.history.index
        )  # load the CLIP and open the index (writer lock) before the clock starts
        try:
            report = ingest(args.items, LocalSink(stack.history), args.batch, args.restart,
                            root=settings.ingest_root, limits=InputLimits.from_settings(settings))
        finally:
            if stack.history.index is not None:
                stack.history.index.close()
    print(
        f"ingested {args.items}: {report.upserted} upserted ({report.total_upserted} in all runs), "
        f"{report.skipped} already embedded, "
        f"{report.batches} batches in {report.seconds:.1f}s ({report.items_per_s:.1f} items/s)"
        + (f", resumed after line {report.resumed_from}" if report.resumed_from else "")
        + f"; embedding model {report.embedding_model or '(none: no CLIP in this preset)'}"
    )
    return 0


def cmd_index(args, settings) -> int:
    from pigment.services.stack import Stack

    # Opening catches up with SQL (or rebuilds a damaged index).
    index = Stack(settings).history.index
    if index is None:
        raise InvalidInput(f"preset {settings.preset!r} has no CLIP, so there is no item index")
    try:
        if args.action == "rebuild":
            index.rebuild()
        elif args.action == "measure":
            index.measure()
        print(json.dumps(index.stats(), indent=2))
    finally:
        index.close()
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "ingest", help="upsert catalog items from a JSONL file in batches (resumable)"
    )
    p.add_argument(
        "--items",
        required=True,
        type=Path,
        help="JSONL: item_id, caption, image_path|image_b64, tenant?, attributes?",
    )
    p.add_argument("--batch", type=int, default=256, help="items per UpsertItems call")
    p.add_argument(
        "--address",
        default=None,
        help="HOST:PORT of a running server (default: in-process, "
        "which needs the index writer lock)",
    )
    p.add_argument("--restart", action="store_true", help="ignore the progress file and start over")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "index",
        help="the FAISS item index: stats (kind, tuned effort, measured recall@10), "
        "rebuild it from SQL, or measure recall on the catalog now",
    )
    p.add_argument("action", choices=["stats", "rebuild", "measure"])
    p.set_defaults(func=cmd_index)
