"""Issue 15 (storage safety, input caps, GDPR delete) and issue 16 (caller errors are never INTERNAL).

Each test here failed on the main before the fix: a caller could name server files, write outside the
image storage, send unbounded or non-finite input, or be told ``duplicate`` for something not stored.
"""

from __future__ import annotations

import io
import json
import math
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import grpc
import pytest
from conftest import make_settings, running_stack
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc
from PIL import Image


def png(size=(16, 16), colour=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming ``width`` x ``height``, and no pixels (what a bomb starts with)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def status_of(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


@pytest.fixture(scope="module")
def sec(tmp_path_factory, tiny_preset):
    settings = make_settings(tmp_path_factory.mktemp("security"), tiny_preset)
    with running_stack(settings) as (stack, channel, _):
        hist = history_pb2_grpc.HistoryServiceStub(channel)
        hist.LogInteractions(history_pb2.LogInteractionsRequest(user_id="alice", create_user=True))
        hist.UpsertItems(history_pb2.UpsertItemsRequest(items=[
            history_pb2.Item(item_id="star-1", caption="a red star", image_png=png())]))
        http = stack.http_server(0).start()
        yield {"stack": stack, "hist": hist, "gen": generation_pb2_grpc.GenerationServiceStub(channel),
               "http": http, "settings": settings}
        http.stop()


# -- file read / write holes ----------------------------------------------------------------------------
def test_image_uri_is_read_only(sec):
    """An item pointing at a server file (here the SQLite database) would later be served as its image."""
    db = sec["settings"].data_dir / "pigment.db"
    for uri in (f"file://{db}", "file:///etc/passwd", "/etc/passwd"):
        code, details = status_of(lambda uri=uri: sec["hist"].UpsertItems(history_pb2.UpsertItemsRequest(items=[
            history_pb2.Item(item_id="evil-1", caption="x", image_uri=uri)])))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "image_uri is read-only" in details


@pytest.mark.parametrize("item_id", ["../../escaped", "a/../../b", "..", "abc\n", "a\x00b", "/abs", ".hidden",
                                     "x" * 129, "has space"])
def test_item_ids_that_could_name_a_path_are_refused(sec, item_id):
    root = Path(sec["settings"].storage_dir)
    before = {p for p in root.parent.rglob("*")}
    code, details = status_of(lambda: sec["hist"].UpsertItems(history_pb2.UpsertItemsRequest(items=[
        history_pb2.Item(item_id=item_id, caption="x", image_png=png())])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "item_id" in details and "malformed" in details
    assert {p for p in root.parent.rglob("*")} - before == set()  # nothing was written anywhere


def test_item_image_keys_are_hashes(sec):
    from pigment.services.store.tables import Item
    from sqlalchemy import select

    stack = sec["stack"]
    with stack.sessions() as s:
        uri = s.scalar(select(Item.image_uri).where(Item.item_id == "star-1"))
    assert "star-1" not in uri and stack.storage.key_of(uri).startswith("items/")
    assert stack.storage.get(uri) == png()


@pytest.mark.parametrize("field, value", [
    ("user_id", "alice\n"), ("user_id", "../alice"), ("user_id", "al\x00ice"), ("request_id", "req-1\n"),
    ("request_id", "../../x"),
])
def test_generate_ids_are_strict(sec, field, value):
    request = {"request_id": "sec-ids-1", "user_id": "alice", "num_images": 1, "num_inference_steps": 1}
    code, details = status_of(lambda: sec["gen"].GeneratePersonalized(
        gpb.GenerateRequest(**{**request, field: value}), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"{field}=" in details and "malformed" in details


def test_history_ids_are_strict(sec):
    hist = sec["hist"]
    for call in (lambda: hist.GetHistory(history_pb2.GetHistoryRequest(user_id="alice\n")),
                 lambda: hist.DeleteUser(history_pb2.DeleteUserRequest(user_id="alice\n")),
                 lambda: hist.LogInteractions(history_pb2.LogInteractionsRequest(user_id="abc\n", create_user=True)),
                 lambda: hist.LogInteractions(history_pb2.LogInteractionsRequest(
                     user_id="bob-x", create_user=True, tenant="../t")),
                 lambda: hist.LogInteractions(history_pb2.LogInteractionsRequest(
                     user_id="alice", interactions=[history_pb2.Interaction(item_id="star-1\n")]))):
        code, details = status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in details


def test_storage_reads_and_writes_only_under_its_root(tmp_path):
    from pigment.services.common.errors import InvalidInput
    from pigment.services.common.storage import ImageStorage

    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    storage = ImageStorage(tmp_path / "images")
    uri = storage.put("items/ok.png", b"png")
    assert storage.get(uri) == b"png"
    for bad in (f"file://{secret}", f"{storage.root}/../secret.txt", f"{storage.root}/items/../../secret.txt",
                f"{storage.root}-other/x.png", "/etc/passwd"):
        with pytest.raises(InvalidInput, match="outside this server's image storage"):
            storage.get(bad)
        assert storage.exists(bad) is False
    for key in ("../x.png", "/abs.png", "a//b.png", "a/./b.png", "x\n.png", "x\x00.png"):
        with pytest.raises(InvalidInput, match="storage key"):
            storage.put(key, b"x")
    assert not (tmp_path / "x.png").exists()


def test_ingest_reads_images_only_under_its_root(tmp_path):
    from pigment.services.common.errors import InvalidInput
    from pigment.services.history.ingest import parse_line

    catalog = tmp_path / "catalog"
    (catalog / "images").mkdir(parents=True)
    (catalog / "images" / "ok.png").write_bytes(png())
    (tmp_path / "private.png").write_bytes(png(colour=(0, 0, 255)))
    (catalog / "images" / "link.png").symlink_to(tmp_path / "private.png")
    where = "items.jsonl:1"
    assert parse_line({"item_id": "ok", "image_path": "images/ok.png"}, catalog, where).image_png == png()
    for path in ("../private.png", str(tmp_path / "private.png"), "images/link.png", "/etc/passwd"):
        with pytest.raises(InvalidInput, match="outside the ingest root"):
            parse_line({"item_id": "x", "image_path": path}, catalog, where)
    # an operator widens the root with ingest_root
    widened = parse_line({"item_id": "x", "image_path": "../private.png"}, catalog, where, root=tmp_path)
    assert widened.image_png == png(colour=(0, 0, 255))


# -- caps -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("item, needle", [
    ({"caption": "c" * 2001}, "caption is 2001 characters: allowed at most 2000"),
    ({"caption": "nul\x00"}, "NUL"),
    ({"tenant": "t" * 129}, "tenant="),
    ({"attributes": {"k": "v" * 257}}, "allowed at most 256"),
    ({"attributes": {f"k{i}": "v" for i in range(65)}}, "allowed at most 64"),
    ({"image_png": png_header(13000, 13000)}, "13000x13000 pixels: allowed 1..16777216 pixels"),
    ({"image_png": png_header(20000, 20000)}, "20000x20000 pixels"),
    ({"image_png": b"GIF89a" + b"\x00" * 100}, "is not a PNG or JPEG image"),
    ({"image_png": b"definitely not an image"}, "is not a PNG or JPEG image"),
    ({"image_png": png()[:60]}, "is not a readable PNG image"),
    ({"image_png": png_header(16, 16) + b"\x00" * 40}, "is not a readable PNG image"),
])
def test_item_fields_are_capped_before_anything_is_stored(sec, item, needle):
    code, details = status_of(lambda: sec["hist"].UpsertItems(history_pb2.UpsertItemsRequest(items=[
        history_pb2.Item(item_id="capped-1", **{"caption": "x", **item})])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details, details


def test_image_caps_follow_settings_and_jpeg_is_accepted(tmp_path):
    from pigment.services.common.errors import InvalidInput
    from pigment.services.common.limits import InputLimits, check_image

    small = InputLimits(max_image_bytes=10_000, max_image_pixels=64 * 64)
    assert check_image("img", png((64, 64)), small) == png((64, 64))
    with pytest.raises(InvalidInput, match="65x64 pixels"):
        check_image("img", png((65, 64)), small)
    with pytest.raises(InvalidInput, match="bytes: allowed at most 10000"):
        check_image("img", png((8, 8)) + b"\x00" * 10_000, small)
    out = check_image("img", png((32, 24), fmt="JPEG"), small)  # JPEG size read from its SOF header
    assert out.startswith(b"\x89PNG") and Image.open(io.BytesIO(out)).size == (32, 24)
    with pytest.raises(InvalidInput, match="100x70 pixels"):
        check_image("img", png((100, 70), fmt="JPEG"), small)


def http_post(sec, body: bytes, content_type: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(f"http://127.0.0.1:{sec['http'].port}/v1/feedback", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_feedback_accepts_only_json(sec):
    """A cross-site form posts text/plain or form bodies without a preflight: refused with 415."""
    body = json.dumps({"feedback_id": "fb-x", "user_id": "alice", "generation_id": "g", "kind": "FEEDBACK_KIND_LIKE"}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        status, err = http_post(sec, body, ctype)
        assert status == 415 and "application/json" in err["message"], (ctype, status, err)
    assert http_post(sec, body, "application/json; charset=utf-8")[0] == 404  # the JSON gets through (no such gen)


# -- caller errors are never INTERNAL (issue 16) ----------------------------------------------------------------
@pytest.mark.parametrize("interaction, needle", [
    ({"value": math.nan}, "value=nan is out of range"),
    ({"value": math.inf}, "value=inf is out of range"),
    ({"value": 1e300}, "is out of range"),
    ({"timestamp_ms": 2**62}, "timestamp_ms="),
    ({"timestamp_ms": -1}, "timestamp_ms=-1"),
    ({"kind": "k" * 33}, "kind is 33 characters"),
    ({"kind": "li\x00ke"}, "kind="),
])
def test_bad_interactions_are_invalid_argument(sec, interaction, needle):
    code, details = status_of(lambda: sec["hist"].LogInteractions(history_pb2.LogInteractionsRequest(
        user_id="alice", interactions=[history_pb2.Interaction(item_id="star-1", **interaction)])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details, details


def test_duplicate_ids_in_one_upsert_are_invalid_argument(sec):
    code, details = status_of(lambda: sec["hist"].UpsertItems(history_pb2.UpsertItemsRequest(items=[
        history_pb2.Item(item_id="dup-1", caption="a"), history_pb2.Item(item_id="dup-1", caption="b")])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "more than once" in details


@pytest.mark.parametrize("token", ["9" * 40, "²", "-1", "1e9", "99999999999"])
def test_page_tokens_that_were_never_issued(sec, token):
    code, details = status_of(lambda: sec["gen"].GetJob(gpb.GetJobRequest(job_id="nojob", page_token=token)).job)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not one this server issued" in details
    assert len(details) < 400


def test_huge_ids_are_not_echoed_whole(sec):
    huge = "x" * (3 << 20)
    calls = [lambda: sec["hist"].GetHistory(history_pb2.GetHistoryRequest(user_id=huge)),
             lambda: sec["gen"].GetJob(gpb.GetJobRequest(job_id=huge)).job,
             lambda: sec["gen"].LogFeedback(gpb.LogFeedbackRequest(feedback_id=huge, user_id="alice",
                                                                   generation_id="g", kind=gpb.FEEDBACK_KIND_LIKE)),
             lambda: sec["gen"].GeneratePersonalized(gpb.GenerateRequest(request_id="r", user_id=huge))]
    for call in calls:
        code, details = status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 400, (code, len(details))


@pytest.mark.parametrize("field", ["guidance_scale", "keyword_weight", "soft_weight"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_generate_floats(sec, field, value):
    code, details = status_of(lambda: sec["gen"].GeneratePersonalized(gpb.GenerateRequest(
        request_id="sec-nan", user_id="alice", num_images=1, num_inference_steps=1, **{field: value}), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"{field}=" in details


def test_feedback_is_honest_about_what_it_stored(sec):
    gen = sec["gen"]
    resp = gen.GeneratePersonalized(gpb.GenerateRequest(request_id="sec-fb", user_id="alice", num_images=2,
                                                        num_inference_steps=1), timeout=120)
    a, b = (i.generation_id for i in resp.images)

    def log(fid, gid, kind=gpb.FEEDBACK_KIND_LIKE, value=0.0, others=()):
        return gen.LogFeedback(gpb.LogFeedbackRequest(feedback_id=fid, user_id="alice", generation_id=gid,
                                                      kind=kind, value=value, other_generation_ids=others))

    for value in (math.nan, math.inf):  # was duplicate=true with nothing stored
        code, details = status_of(lambda value=value: log("fb-nan", a, gpb.FEEDBACK_KIND_CLICK, value))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "value=" in details
    assert log("fb-1", a).duplicate is False
    assert log("fb-1", a).duplicate is True  # a replay of the same content
    code, details = status_of(lambda: log("fb-1", b))  # the same id, another generation
    assert code == grpc.StatusCode.ALREADY_EXISTS and "different content" in details
    code, _ = status_of(lambda: log("fb-1", a, gpb.FEEDBACK_KIND_DISLIKE))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    from pigment.services.store.tables import Feedback

    with sec["stack"].sessions() as s:
        row = s.get(Feedback, "fb-1")
        assert (row.generation_id, row.kind) == (a, "like") and s.get(Feedback, "fb-nan") is None


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory, tiny_preset, pg_database):
    settings = make_settings(tmp_path_factory.mktemp("security-pg"), tiny_preset, database_url=pg_database())
    with running_stack(settings, worker=False) as (_stack, channel, _):
        hist = history_pb2_grpc.HistoryServiceStub(channel)
        hist.LogInteractions(history_pb2.LogInteractionsRequest(user_id="alice", create_user=True))
        hist.UpsertItems(history_pb2.UpsertItemsRequest(items=[history_pb2.Item(item_id="i1", caption="a")]))
        yield hist, generation_pb2_grpc.GenerationServiceStub(channel)


def test_postgresql_nul_and_long_strings_are_invalid_argument(pg_stack):
    """PostgreSQL refuses NUL in text and over-long varchar values: both were INTERNAL."""
    hist, gen = pg_stack
    calls = [
        lambda: hist.UpsertItems(history_pb2.UpsertItemsRequest(items=[history_pb2.Item(item_id="i2", caption="a\x00")])),
        lambda: hist.UpsertItems(history_pb2.UpsertItemsRequest(items=[
            history_pb2.Item(item_id="i2", caption="a", attributes={"k": "v\x00"})])),
        lambda: hist.LogInteractions(history_pb2.LogInteractionsRequest(
            user_id="alice", interactions=[history_pb2.Interaction(item_id="i1", kind="k" * 40)])),
        lambda: hist.LogInteractions(history_pb2.LogInteractionsRequest(user_id="bob", create_user=True,
                                                                        tenant="t\x00")),
        lambda: gen.GeneratePersonalized(gpb.GenerateRequest(request_id="pg-1", user_id="alice", prompt="a\x00b")),
        lambda: gen.SubmitBatch(gpb.SubmitBatchRequest(job_id="pg-job", user_ids=["alice", "b\x00"])),
        lambda: gen.GetJob(gpb.GetJobRequest(job_id="j", page_token="9" * 19)).job,
    ]
    for n, call in enumerate(calls):
        code, details = status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (n, code, details)
