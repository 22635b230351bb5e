"""Issue 19, the app developer's side: generations and item images by id over gRPC (inline, signed URL,
streamed), tenant isolation of all of them, and the FastAPI HTTP/JSON face (protobuf JSON, SSE progress,
google.rpc.Status errors, JSON-only bodies, body cap, CORS, per-request timeout, OpenAPI).

One real stack on PostgreSQL with a real worker and API keys for two tenants; the HTTP face is started
before anything is generated, so responses can carry URLs. The inline budget is 50 bytes, so every image
is past it and travels as a URL unless the caller asks for bytes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import urllib.error
import urllib.request
import uuid

import grpc
import pytest
from conftest import make_settings, running_stack
from google.rpc import code_pb2
from pigment.services.common import auth
from pigment.services.common.grpc_auth import bearer_channel
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc, media_pb2
from PIL import Image

RUN = uuid.uuid4().hex[:6]
ACME, GLOBEX = f"acme{RUN}", f"globex{RUN}"
ALICE, BOB = f"alice{RUN}", f"bob{RUN}"


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def http(
    url: str,
    body=None,
    key: str | None = None,
    ctype: str | None = "application/json",
    method=None,
    headers: dict | None = None,
):
    """(status, headers, body bytes) of one request."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    h = {
        **({"Content-Type": ctype} if ctype and data is not None else {}),
        **({"Authorization": f"Bearer {key}"} if key else {}),
        **(headers or {}),
    }
    req = urllib.request.Request(url, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def status_of(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


@pytest.fixture(scope="module")
def face(tmp_path_factory, tiny_preset, pg_database):
    tmp = tmp_path_factory.mktemp("httpface")
    keyfile = tmp / "keys.yaml"
    keys = {"a": auth.add_key(keyfile, ACME), "b": auth.add_key(keyfile, GLOBEX)}
    settings = make_settings(
        tmp,
        tiny_preset,
        database_url=pg_database(),
        auth_keys_file=keyfile,
        inline_image_max_bytes=50,
    )
    with running_stack(settings) as (stack, channel, _worker):
        http_face = stack.http_server(0).start()
        a, b = bearer_channel(channel, keys["a"]), bearer_channel(channel, keys["b"])
        hist_a, hist_b = (
            history_pb2_grpc.HistoryServiceStub(a),
            history_pb2_grpc.HistoryServiceStub(b),
        )
        hist_a.UpsertItems(
            history_pb2.UpsertItemsRequest(
                items=[
                    history_pb2.Item(
                        item_id=f"star-{RUN}",
                        caption="a red star",
                        image_png=png((200, 30, 30)),
                        tenant=ACME,
                    )
                ]
            )
        )
        hist_b.UpsertItems(
            history_pb2.UpsertItemsRequest(
                items=[
                    history_pb2.Item(
                        item_id=f"moon-{RUN}",
                        caption="a yellow moon",
                        image_png=png((220, 220, 0)),
                        tenant=GLOBEX,
                    )
                ]
            )
        )
        hist_a.LogInteractions(
            history_pb2.LogInteractionsRequest(
                user_id=ALICE,
                create_user=True,
                interactions=[history_pb2.Interaction(item_id=f"star-{RUN}", kind="like")],
            )
        )
        hist_b.LogInteractions(history_pb2.LogInteractionsRequest(user_id=BOB, create_user=True))
        gen_a = generation_pb2_grpc.GenerationServiceStub(a)
        first = gen_a.GeneratePersonalized(
            gpb.GenerateRequest(
                request_id=f"f-{RUN}",
                user_id=ALICE,
                prompt="a star",
                num_images=2,
                num_inference_steps=2,
            ),
            timeout=120,
        )
        yield {
            "stack": stack,
            "keys": keys,
            "http": http_face,
            "url": http_face.url,
            "first": first,
            "gen_a": gen_a,
            "gen_b": generation_pb2_grpc.GenerationServiceStub(b),
            "hist_a": hist_a,
            "hist_b": hist_b,
        }
        http_face.stop()


def test_get_generation_inline_url_and_stream(face):
    first, gen_a = face["first"], face["gen_a"]
    image = first.images[0]
    assert (
        image.url.startswith(face["url"] + "/v1/generations/") and not image.png
    )  # past the 50-byte budget
    got = gen_a.GetGeneration(
        gpb.GetGenerationRequest(generation_id=image.generation_id), timeout=10
    ).generation
    assert (got.generation_id, got.request_id, got.user_id, got.prompt) == (
        image.generation_id,
        f"f-{RUN}",
        ALICE,
        "a star",
    )
    assert got.source == gpb.RESULT_SOURCE_GENERATED and list(got.keywords) == list(first.keywords)
    assert (
        list(got.flags) == list(first.flags) and got.create_time_ms > 0 and got.seed == image.seed
    )
    assert got.image.url and not got.image.png and got.image.url_expire_time_ms > 0

    inline = gen_a.GetGeneration(
        gpb.GetGenerationRequest(
            generation_id=image.generation_id, delivery=media_pb2.IMAGE_DELIVERY_INLINE
        )
    ).generation.image
    assert (
        inline.png.startswith(b"\x89PNG")
        and inline.size_bytes == len(inline.png)
        and not inline.url
    )
    bare = gen_a.GetGeneration(
        gpb.GetGenerationRequest(
            generation_id=image.generation_id, delivery=media_pb2.IMAGE_DELIVERY_NONE
        )
    ).generation
    assert not bare.HasField("image")

    # the signed URL needs no key; a forged or altered one is refused
    status, headers, body = http(got.image.url)
    assert status == 200 and headers["content-type"] == "image/png" and body == inline.png
    assert http(got.image.url.replace("sig=", "sig=0"))[0] == 403
    other = first.images[1].generation_id
    assert (
        http(got.image.url.replace(image.generation_id, other))[0] == 403
    )  # a signature grants one image
    # without a signature the path takes the bearer key like any call
    path = f"{face['url']}/v1/generations/{image.generation_id}/image"
    assert http(path)[0] == 401
    assert http(path, key=face["keys"]["a"])[2] == inline.png

    pieces = list(
        gen_a.StreamGenerationImage(
            gpb.StreamGenerationImageRequest(generation_id=image.generation_id, chunk_bytes=1024),
            timeout=10,
        )
    )
    assert b"".join(p.chunk.data for p in pieces) == inline.png
    assert [p.chunk.offset for p in pieces] == list(range(0, len(inline.png), 1024))
    assert {p.chunk.total_bytes for p in pieces} == {len(inline.png)}
    code, details = status_of(
        lambda: list(
            gen_a.StreamGenerationImage(
                gpb.StreamGenerationImageRequest(generation_id=image.generation_id, chunk_bytes=10)
            )
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "1024..4194304" in details

    page = gen_a.ListGenerations(gpb.ListGenerationsRequest(user_id=ALICE, page_size=1))
    assert (
        len(page.generations) == 1
        and page.next_page_token
        and not page.generations[0].HasField("image")
    )
    rest = gen_a.ListGenerations(
        gpb.ListGenerationsRequest(user_id=ALICE, page_token=page.next_page_token)
    )
    assert {g.generation_id for g in [*page.generations, *rest.generations]} == {
        i.generation_id for i in first.images
    }


def test_another_tenants_generations_and_items_do_not_exist(face):
    gid = face["first"].images[0].generation_id
    gen_b, hist_b = face["gen_b"], face["hist_b"]
    for call in (
        lambda: gen_b.GetGeneration(gpb.GetGenerationRequest(generation_id=gid)),
        lambda: list(
            gen_b.StreamGenerationImage(gpb.StreamGenerationImageRequest(generation_id=gid))
        ),
        lambda: gen_b.ListGenerations(gpb.ListGenerationsRequest(user_id=ALICE)),
        lambda: hist_b.GetItemImage(history_pb2.GetItemImageRequest(item_id=f"star-{RUN}")),
    ):
        code, details = status_of(call)
        assert code == grpc.StatusCode.NOT_FOUND and "not found" in details
    assert http(f"{face['url']}/v1/generations/{gid}/image", key=face["keys"]["b"])[0] == 404
    assert http(f"{face['url']}/v1/items/star-{RUN}/image", key=face["keys"]["b"])[0] == 404
    status, _, body = http(f"{face['url']}/v1/users", key=face["keys"]["b"])
    assert status == 200 and json.loads(body) == {"userIds": [BOB]}


def test_item_images_and_history_urls(face):
    hist_a = face["hist_a"]
    ref = hist_a.GetItemImage(
        history_pb2.GetItemImageRequest(
            item_id=f"star-{RUN}", delivery=media_pb2.IMAGE_DELIVERY_INLINE
        )
    ).image
    assert Image.open(io.BytesIO(ref.png)).getpixel((0, 0)) == (200, 30, 30)
    by_url = hist_a.GetItemImage(history_pb2.GetItemImageRequest(item_id=f"star-{RUN}")).image
    assert by_url.url and http(by_url.url)[2] == ref.png
    streamed = b"".join(
        c.chunk.data
        for c in hist_a.StreamItemImage(history_pb2.StreamItemImageRequest(item_id=f"star-{RUN}"))
    )
    assert streamed == ref.png
    entry = hist_a.GetHistory(history_pb2.GetHistoryRequest(user_id=ALICE)).entries[0]
    assert entry.item.image_url and http(entry.item.image_url)[2] == ref.png


def test_http_json_face_speaks_protobuf_json(face):
    url, key = face["url"], face["keys"]["a"]
    body = {
        "requestId": f"h-{RUN}",
        "userId": ALICE,
        "prompt": "a moon",
        "numImages": 1,
        "numInferenceSteps": 2,
        "method": "METHOD_PMG",
        "retrieval": "RETRIEVAL_MODE_GENERATE_ONLY",
    }
    status, _, raw = http(f"{url}/v1/generate", body, key=key)
    result = json.loads(raw)
    assert (
        status == 200
        and result["requestId"] == f"h-{RUN}"
        and result["images"][0]["url"].startswith(url)
    )
    assert result["images"][0]["source"] == "RESULT_SOURCE_GENERATED"

    # SSE: progress events, then the result
    status, headers, raw = http(
        f"{url}/v1/generate/stream", {**body, "requestId": f"s-{RUN}"}, key=key
    )
    events = [block.split("\n") for block in raw.decode().strip().split("\n\n")]
    kinds = [e[0].removeprefix("event: ") for e in events]
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert kinds[-1] == "result" and "progress" in kinds, kinds
    assert json.loads(events[-1][1].removeprefix("data: "))["requestId"] == f"s-{RUN}"

    gens = json.loads(http(f"{url}/v1/users/{ALICE}/generations", key=key)[2])["generations"]
    assert {g["requestId"] for g in gens} == {f"f-{RUN}", f"h-{RUN}", f"s-{RUN}"}
    assert all(g["image"]["url"] for g in gens)
    hist = json.loads(http(f"{url}/v1/users/{ALICE}/history", key=key)[2])
    assert hist["entries"][0]["item"]["imageUrl"]

    # feedback in protobuf JSON: camelCase and snake_case names, enum names
    gid = gens[0]["generationId"]
    fb = {
        "feedbackId": f"fb-{RUN}",
        "userId": ALICE,
        "generationId": gid,
        "kind": "FEEDBACK_KIND_LIKE",
    }
    assert http(f"{url}/v1/feedback", fb, key=key)[:3:2] == (201, b'{"duplicate":false}')
    snake = {
        "feedback_id": f"fb-{RUN}",
        "user_id": ALICE,
        "generation_id": gid,
        "kind": "FEEDBACK_KIND_LIKE",
    }
    assert http(f"{url}/v1/feedback", snake, key=key)[0] == 200  # the same feedback: a replay


def test_http_errors_are_rpc_status_json(face):
    url, key = face["url"], face["keys"]["a"]
    status, headers, raw = http(f"{url}/v1/feedback", {"feedbackId": "x", "kind": "like"}, key=key)
    err = json.loads(raw)
    assert (
        status == 400
        and err["code"] == code_pb2.INVALID_ARGUMENT
        and "FeedbackKind" in err["message"]
    )
    status, headers, raw = http(f"{url}/v1/generate", {"userId": ALICE})
    assert status == 401 and json.loads(raw)["code"] == code_pb2.UNAUTHENTICATED
    assert headers["www-authenticate"].startswith("Bearer")
    status, _, raw = http(f"{url}/v1/generate", b"{}", key=key, ctype="text/plain")
    assert status == 415 and "application/json" in json.loads(raw)["message"]
    status, _, raw = http(f"{url}/v1/generations/nope-{RUN}", key=key)
    err = json.loads(raw)
    assert status == 404 and err["code"] == code_pb2.NOT_FOUND
    assert err["message"] == f'generation "nope-{RUN}" not found'
    assert err["details"] == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "domain": "pigment.dev",
            "reason": "GENERATION_NOT_FOUND",
        }
    ]
    status, _, raw = http(f"{url}/v1/generations/x?delivery=IMAGE_DELIVERY_FAX", key=key)
    assert status == 400 and "IMAGE_DELIVERY_URL" in json.loads(raw)["message"]
    assert json.loads(http(f"{url}/v1/nowhere")[2])["code"] == code_pb2.NOT_FOUND


def test_openapi_cors_body_cap_and_timeout(face):
    url = face["url"]
    doc = json.loads(http(f"{url}/openapi.json")[2])
    assert {
        "/v1/generate",
        "/v1/generate/stream",
        "/v1/feedback",
        "/v1/generations/{generation_id}",
        "/v1/generations/{generation_id}/image",
        "/v1/users/{user_id}/history",
        "/v1/jobs",
    } <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    assert schemas["pigment.v1.GenerateRequest"]["properties"]["numImages"] == {
        "type": "integer",
        "format": "int32",
    }
    assert "METHOD_PMG" in schemas["pigment.v1.GenerateRequest"]["properties"]["method"]["enum"]
    assert "google.rpc.Status" in schemas
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in {
        k.lower() for k in http(f"{url}/v1/generate", method="OPTIONS", headers=preflight)[1]
    }  # CORS is off by default

    stack, base = face["stack"], face["http"].ctx
    strict = base.settings.model_copy(
        update={
            "http_cors_origins": ["https://app.example"],
            "http_max_body_bytes": 1024,
            "http_request_timeout_s": 1.5,
        }
    )
    from pigment.services.gateway.http import HTTPServer

    other = HTTPServer(dataclasses.replace(base, settings=strict)).start()
    try:
        status, headers, _ = http(f"{other.url}/v1/generate", method="OPTIONS", headers=preflight)
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
        status, _, raw = http(
            f"{other.url}/v1/feedback", {"feedbackId": "x" * 2000}, key=face["keys"]["a"]
        )
        assert status == 413 and json.loads(raw)["code"] == code_pb2.INVALID_ARGUMENT
        slow = {"requestId": f"t-{RUN}", "userId": ALICE, "numImages": 1, "numInferenceSteps": 40}
        status, _, raw = http(f"{other.url}/v1/generate", slow, key=face["keys"]["a"])
        assert status == 504 and json.loads(raw)["code"] == code_pb2.DEADLINE_EXCEEDED
    finally:
        other.stop()
    assert stack is not None


def test_overload_is_a_status_body_with_a_retry_hint(face):
    """Past 4 x max_concurrent_rpcs requests in flight the face answers 503 with the google.rpc.Status body of
    every other error (uvicorn's own limit answered plain text), and recovers once they end."""
    import socket
    import time

    from pigment.services.gateway.http import HTTPServer

    base, key = face["http"].ctx, face["keys"]["a"]
    busy = base.settings.model_copy(update={"max_concurrent_rpcs": 1, "http_request_timeout_s": 30})
    other = HTTPServer(dataclasses.replace(base, settings=busy)).start()
    held = []
    try:
        for _ in range(4):  # each waits for a body that never comes: in flight until its socket closes
            conn = socket.create_connection((other.host, other.port))
            conn.sendall(f"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode())
            held.append(conn)
        deadline = time.monotonic() + 20
        while (answer := http(f"{other.url}/v1/users", key=key))[0] != 503:
            assert time.monotonic() < deadline, answer
            time.sleep(0.05)
        _, headers, raw = answer
        err = json.loads(raw)
        assert err["code"] == code_pb2.RESOURCE_EXHAUSTED and "in flight" in err["message"]
        kinds = {d["@type"].rsplit(".", 1)[1]: d for d in err["details"]}
        assert kinds["ErrorInfo"]["reason"] == "SERVER_BUSY" and kinds["RetryInfo"]["retryDelay"] == "1s"
        assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
        assert http(f"{other.url}/healthz")[0] == 200  # probes are never refused
    finally:
        for conn in held:
            conn.close()
    try:
        deadline = time.monotonic() + 20
        while (answer := http(f"{other.url}/v1/users", key=key))[0] != 200:
            assert time.monotonic() < deadline, answer
            time.sleep(0.05)
    finally:
        other.stop()


def test_edit_and_references_over_http_say_why_on_a_preset_without_them(face):
    """The tiny preset has no keyword vocabulary and no reference projector: both features answer
    FAILED_PRECONDITION with their reason over HTTP, as over gRPC (a real edit over HTTP: test_llmga.py)."""
    url, key = face["url"], face["keys"]["a"]
    gid = face["first"].images[0].generation_id
    edit = {
        "requestId": f"e-{RUN}",
        "userId": ALICE,
        "generationId": gid,
        "instruction": "make it smaller",
    }
    status, _, raw = http(f"{url}/v1/edit", edit, key=key)
    err = json.loads(raw)
    assert status == 400 and err["code"] == code_pb2.FAILED_PRECONDITION, err
    assert "no keyword vocabulary" in err["message"]
    assert err["details"][0]["reason"] == "EDIT_NOT_UNDERSTOOD"
    # the source is checked first: neither a generation nor image bytes
    status, _, raw = http(f"{url}/v1/edit", {**edit, "generationId": ""}, key=key)
    assert status == 400 and json.loads(raw)["code"] == code_pb2.INVALID_ARGUMENT
    # another tenant's user is refused before the instruction is read
    status, _, raw = http(f"{url}/v1/edit", {**edit, "userId": BOB}, key=key)
    assert status == 404 and json.loads(raw)["code"] == code_pb2.NOT_FOUND

    gen = {
        "requestId": f"r-{RUN}",
        "userId": ALICE,
        "prompt": "a star",
        "numImages": 1,
        "references": [{"itemId": f"star-{RUN}"}],
    }
    status, _, raw = http(f"{url}/v1/generate", gen, key=key)
    err = json.loads(raw)
    assert status == 400 and err["code"] == code_pb2.FAILED_PRECONDITION, err
    assert (
        "reference_projector" in err["message"]
        and err["details"][0]["reason"] == "NO_REFERENCE_SUPPORT"
    )
    # a reference that is not base64 is a parse error of the body, not a server error
    status, _, raw = http(
        f"{url}/v1/generate", {**gen, "references": [{"image": "not base64!"}]}, key=key
    )
    assert status == 400 and json.loads(raw)["code"] == code_pb2.INVALID_ARGUMENT

    doc = json.loads(http(f"{url}/openapi.json")[2])
    body = doc["paths"]["/v1/edit"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/pigment.v1.EditImageRequest"}
    assert {"instruction", "generationId", "mask"} <= set(
        doc["components"]["schemas"]["pigment.v1.EditImageRequest"]["properties"]
    )
    assert "pigment.v1.EditPlan" in doc["components"]["schemas"]
