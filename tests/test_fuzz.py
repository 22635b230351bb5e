"""Property-based fuzz (hypothesis) of every RPC of the three services and the HTTP feedback endpoint,
on SQLite and on PostgreSQL (one real stack each, with a worker): a caller's input never maps to INTERNAL
or UNKNOWN, and whatever is answered as stored can be read back.

Strategies mix plausible values (so some calls succeed and are read back) with the hostile ones found by
hand in issues 15 and 16: NaN and infinities, huge and negative numbers, NUL bytes, newlines, ``../``,
over-long and multi-kilobyte strings, non-image bytes and images whose header claims 20000x20000 pixels.
"""

from __future__ import annotations

import http.client
import io
import json
import math
import os
import struct
import zlib

import grpc
import pytest
from conftest import make_settings, running_stack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import (
    generation_pb2_grpc,
    history_pb2,
    history_pb2_grpc,
    preference_pb2,
    preference_pb2_grpc,
)
from PIL import Image

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# Examples per property and backend; raise it for a longer hunt (PIGMENT_FUZZ_EXAMPLES=200 pytest tests/test_fuzz.py).
EXAMPLES = int(os.environ.get("PIGMENT_FUZZ_EXAMPLES", "12"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def png(size=(16, 16), colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


HOSTILE_TEXT = ["", "../etc/passwd", "a\n", "a\x00b", "\x00", "x" * 300, "y" * 5000, "²", "*", "Ω≈ç", " ",
                "a/b", "..", "-", "1e9", "keywords: 1. purple 2. light background 3. small"]
ids = st.one_of(st.sampled_from(["alice", "bob", "star-1", "fz-1", "fz-2", "u.1", "t-a"]),
                st.sampled_from(HOSTILE_TEXT), st.text(max_size=12))
texts = st.one_of(st.sampled_from(["a red star", "a blue heart", ""]), st.sampled_from(HOSTILE_TEXT),
                  st.text(max_size=40))
floats = st.one_of(st.sampled_from([0.0, 1.0, 3.0, -1.0, 1e300, -1e300]), st.floats())
int32 = st.one_of(st.sampled_from([0, 1, 2, -1, 8, 16, 32, 36, 4000]), st.integers(-2**31, 2**31 - 1))
int64 = st.one_of(st.sampled_from([0, 1, -1, 1_700_000_000_000, 2**62]), st.integers(-2**63, 2**63 - 1))
images = st.one_of(st.just(b""), st.just(png()), st.just(png_header(20000, 20000)), st.just(png()[:50]),
                   st.binary(max_size=64))


def code_of(call) -> tuple[grpc.StatusCode, object]:
    try:
        return grpc.StatusCode.OK, call()
    except grpc.RpcError as err:
        assert err.code() not in FORBIDDEN, f"{err.code()}: {err.details()}"
        return err.code(), None


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fz(request, tmp_path_factory, tiny_preset, pg_database):
    overrides = {"database_url": pg_database()} if request.param == "postgresql" else {}
    cfg = make_settings(tmp_path_factory.mktemp(f"fuzz-{request.param}"), tiny_preset,
                        max_steps=4, max_size=64, **overrides)
    with running_stack(cfg) as (stack, channel, _):
        hist = history_pb2_grpc.HistoryServiceStub(channel)
        gen = generation_pb2_grpc.GenerationServiceStub(channel)
        hist.UpsertItems(history_pb2.UpsertItemsRequest(items=[
            history_pb2.Item(item_id="star-1", caption="a red star", image_png=png())]))
        hist.LogInteractions(history_pb2.LogInteractionsRequest(
            user_id="alice", create_user=True, interactions=[history_pb2.Interaction(item_id="star-1")]))
        first = gen.GeneratePersonalized(gpb.GenerateRequest(request_id="fz-seed", user_id="alice", num_images=2,
                                                             num_inference_steps=1), timeout=120)
        http_server = stack.http_server(0).start()
        yield {"stack": stack, "hist": hist, "gen": gen, "http": http_server,
               "pref": preference_pb2_grpc.PreferenceServiceStub(channel),
               "gens": [i.generation_id for i in first.images]}
        http_server.stop()


# -- HistoryService ---------------------------------------------------------------------------------------
@FUZZ
@given(user=ids, create=st.booleans(), tenant=ids,
       rows=st.lists(st.tuples(ids, ids, floats, int64), max_size=3))
def test_log_interactions(fz, user, create, tenant, rows):
    interactions = [history_pb2.Interaction(item_id=i, kind=k, value=v, timestamp_ms=t) for i, k, v, t in rows]
    code, resp = code_of(lambda: fz["hist"].LogInteractions(history_pb2.LogInteractionsRequest(
        user_id=user, create_user=create, tenant=tenant, interactions=interactions), timeout=30))
    if code == grpc.StatusCode.OK:
        assert resp.logged == len(rows)
        history = fz["hist"].GetHistory(history_pb2.GetHistoryRequest(user_id=user, page_size=10_000), timeout=30)
        stored = [(e.interaction.item_id, e.interaction.value) for e in history.entries]
        for item_id, _, value, _ in rows:
            assert (item_id, value) in stored


@FUZZ
@given(user=ids, limit=int32)
def test_get_history(fz, user, limit):
    code_of(lambda: fz["hist"].GetHistory(history_pb2.GetHistoryRequest(user_id=user, page_size=limit), timeout=30))


@FUZZ
@given(items=st.lists(st.tuples(ids, texts, images, st.sampled_from(["", "file:///etc/passwd"]), ids,
                                st.dictionaries(texts, texts, max_size=2)), max_size=3))
def test_upsert_items(fz, items):
    from pigment.services.store.tables import Item
    from sqlalchemy import select

    request = history_pb2.UpsertItemsRequest(items=[
        history_pb2.Item(item_id=i, caption=c, image_png=img, image_uri=uri, tenant=t, attributes=a)
        for i, c, img, uri, t, a in items])
    code, resp = code_of(lambda: fz["hist"].UpsertItems(request, timeout=60))
    if code == grpc.StatusCode.OK:
        assert resp.upserted == len(items)
        with fz["stack"].sessions() as s:
            for item_id, caption, image, _, tenant, attributes in items:
                row = s.scalar(select(Item).where(Item.item_id == item_id))
                assert (row.caption, row.tenant or "", row.attributes) == (caption, tenant, attributes)
                if image:
                    assert fz["stack"].storage.exists(row.image_uri)


@FUZZ
@given(query=st.one_of(st.tuples(st.just("text"), texts), st.tuples(st.just("image_png"), images),
                       st.tuples(st.just("vector"), st.lists(floats, max_size=70))),
       k=int32, user=st.one_of(st.just(""), ids), seen=st.booleans())
def test_search_items(fz, query, k, user, seen):
    which, value = query
    fields = {"vector": history_pb2.EmbeddingVector(values=value)} if which == "vector" else {which: value}
    code_of(lambda: fz["hist"].SearchItems(history_pb2.SearchItemsRequest(
        k=k, user_id=user, include_seen=seen, **fields), timeout=30))


@FUZZ
@given(user=ids)
def test_delete_user(fz, user):
    if user == "alice":  # the fixture's user stays
        return
    code, _ = code_of(lambda: fz["hist"].DeleteUser(history_pb2.DeleteUserRequest(user_id=user), timeout=30))
    if code == grpc.StatusCode.OK:
        again, _ = code_of(lambda: fz["hist"].GetHistory(history_pb2.GetHistoryRequest(user_id=user)))
        assert again == grpc.StatusCode.NOT_FOUND


# -- PreferenceService --------------------------------------------------------------------------------------
@FUZZ
@given(user=st.one_of(st.just(""), ids), captions=st.lists(texts, max_size=4), method=texts, target=texts)
def test_encode_preferences(fz, user, captions, method, target):
    code_of(lambda: fz["pref"].EncodePreferences(preference_pb2.EncodePreferencesRequest(
        user_id=user, history_captions=captions, method=method, target=target), timeout=60))


# -- GenerationService --------------------------------------------------------------------------------------
generate_requests = st.builds(
    gpb.GenerateRequest, request_id=st.one_of(st.text("abcdef-", min_size=1, max_size=8), ids),
    user_id=st.one_of(st.just("alice"), ids), prompt=texts, num_images=st.sampled_from([0, 1, 2, -1, 99]),
    seed=int64, num_inference_steps=st.sampled_from([0, 1, 2, -5, 1000]), guidance_scale=floats,
    height=st.sampled_from([0, 16, 32, 36, -8, 4000]), width=st.sampled_from([0, 16, 32, 7]),
    method=st.integers(0, 6), keyword_weight=floats, soft_weight=floats, retrieval=st.integers(0, 6),
    include_seen=st.booleans())


@FUZZ
@given(request=generate_requests)
def test_generate(fz, request):
    code, resp = code_of(lambda: fz["gen"].GeneratePersonalized(request, timeout=60))
    if code == grpc.StatusCode.OK:
        assert resp.request_id == request.request_id and resp.images
        assert all(i.png.startswith(b"\x89PNG") for i in resp.images)


@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))
@given(request=generate_requests)
def test_generate_stream(fz, request):
    def run():
        return list(fz["gen"].GeneratePersonalizedStream(gpb.GeneratePersonalizedStreamRequest(request=request), timeout=60))

    code, events = code_of(run)
    if code == grpc.StatusCode.OK:
        assert events[-1].WhichOneof("event") == "result"


@FUZZ
@given(fid=st.one_of(st.sampled_from(["fb-1", "fb-2"]), ids), user=st.one_of(st.just("alice"), ids),
       which=st.integers(0, 2), other=ids, kind=st.integers(0, 7), value=floats, use_other=st.booleans())
def test_log_feedback(fz, fid, user, which, other, kind, value, use_other):
    from pigment.services.store.tables import Feedback

    gid = fz["gens"][which] if which < 2 else other
    others = [fz["gens"][1 - which] if which < 2 else other] if use_other else []
    code, _ = code_of(lambda: fz["gen"].LogFeedback(gpb.LogFeedbackRequest(
        feedback_id=fid, user_id=user, generation_id=gid, kind=kind, value=value, other_generation_ids=others),
        timeout=30))
    if code == grpc.StatusCode.OK:  # new or an honest replay: the row is there, with this content
        with fz["stack"].sessions() as s:
            row = s.get(Feedback, fid)
            assert row is not None and (row.user_id, row.generation_id, row.value) == (user, gid, value)


@FUZZ
@given(job_id=st.one_of(st.sampled_from(["job-1", "job-2"]), ids),
       users=st.lists(st.one_of(st.just("alice"), ids), max_size=3), segment=st.one_of(st.just(""), ids),
       prompt=texts, images=st.sampled_from([0, 1, -1, 99]), steps=st.sampled_from([0, 1, -1, 1000]),
       method=st.integers(0, 6), chunk=st.sampled_from([0, 1, -1, 10_000]))
def test_submit_batch(fz, job_id, users, segment, prompt, images, steps, method, chunk):
    code, _ = code_of(lambda: fz["gen"].SubmitBatch(gpb.SubmitBatchRequest(
        job_id=job_id, user_ids=users, segment=segment, prompt=prompt, images_per_user=images,
        num_inference_steps=steps, method=method, chunk_size=chunk), timeout=30))
    if code == grpc.StatusCode.OK:
        assert fz["gen"].GetJob(gpb.GetJobRequest(job_id=job_id), timeout=30).job_id == job_id


@FUZZ
@given(job_id=st.one_of(st.sampled_from(["job-1", "job-2"]), ids), size=int32,
       token=st.one_of(st.sampled_from(["", "0", "1", "9" * 30, "-1", "²"]), texts), cancel=st.booleans())
def test_get_and_cancel_job(fz, job_id, size, token, cancel):
    code_of(lambda: fz["gen"].GetJob(gpb.GetJobRequest(job_id=job_id, page_size=size, page_token=token), timeout=30).job)
    if cancel:
        code_of(lambda: fz["gen"].CancelJob(gpb.CancelJobRequest(job_id=job_id), timeout=30).job)


# -- HTTP ---------------------------------------------------------------------------------------------------------
json_values = st.one_of(st.none(), st.booleans(), floats, int64, texts, st.lists(texts, max_size=2))


@settings(FUZZ, max_examples=EXAMPLES * 5 // 2)
@given(body=st.one_of(
    st.fixed_dictionaries({"feedback_id": ids, "user_id": st.one_of(st.just("alice"), ids),
                           "generation_id": st.sampled_from(["g", "", "fz-seed"]), "kind": texts},
                          optional={"value": json_values, "other_generation_ids": json_values, "extra": json_values}),
    st.dictionaries(texts, json_values, max_size=3), json_values),
    raw=st.one_of(st.none(), st.binary(max_size=40), st.sampled_from([b"NaN", b"[" * 5000, b"1" * 5000])),
    ctype=st.sampled_from(["application/json", "text/plain", "", "application/JSON; charset=utf-8"]))
def test_http_feedback(fz, body, raw, ctype):
    data = raw if raw is not None else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", fz["http"].port, timeout=10)
    try:
        conn.request("POST", "/v1/feedback", body=data, headers={"Content-Type": ctype} if ctype else {})
        resp = conn.getresponse()
        payload = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status < 500, payload
    if resp.status in (200, 201):
        from pigment.services.store.tables import Feedback

        with fz["stack"].sessions() as s:
            assert s.get(Feedback, body["feedback_id"]) is not None


def test_nan_is_never_stored_as_duplicate(fz):
    """The concrete bug the fuzz stands for: NaN feedback was answered duplicate=true, nothing stored."""
    code, _ = code_of(lambda: fz["gen"].LogFeedback(gpb.LogFeedbackRequest(
        feedback_id="fb-nan", user_id="alice", generation_id=fz["gens"][0], kind=gpb.FEEDBACK_KIND_CLICK,
        value=math.nan)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
