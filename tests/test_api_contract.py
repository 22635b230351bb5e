"""Issue 19, the v1 contract: google.rpc.Status details over real gRPC, `optional` defaults, enums, history
paging and idempotent interaction batches, buf lint/breaking against the committed v1 contract, and
docs/API.md generated from the protos."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pigment.services.common.errors import (
    DOMAIN,
    InvalidInput,
    RateLimited,
    Unavailable,
    check_range,
    to_rpc_status,
)
from pigment.services.common.server import create_server
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"


def details_of(fn) -> tuple[grpc.StatusCode, dict]:
    """The call's status code and its details by type name (what a client reads with rpc_status.from_call)."""
    with pytest.raises(grpc.RpcError) as err:
        fn()
    status = rpc_status.from_call(err.value)
    assert status is not None, f"no google.rpc.Status details: {err.value.details()}"
    out = {}
    for any_detail in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo,
                    error_details_pb2.QuotaFailure):
            if any_detail.Is(cls.DESCRIPTOR):
                msg = cls()
                any_detail.Unpack(msg)
                out[cls.__name__] = msg
    assert status.message == err.value.details()
    return err.value.code(), out


@pytest.fixture(scope="module")
def api(embedded):
    stack, channel, _ = embedded
    hist = history_pb2_grpc.HistoryServiceStub(channel)
    hist.LogInteractions(history_pb2.LogInteractionsRequest(user_id="api-u", create_user=True))
    hist.UpsertItems(history_pb2.UpsertItemsRequest(items=[
        history_pb2.Item(item_id=f"api-{n}", caption=caption) for n, caption in
        enumerate(["a red star", "a blue circle", "a red square", "a green star"])]))
    return {"stack": stack, "hist": hist, "gen": generation_pb2_grpc.GenerationServiceStub(channel)}


# -- structured errors ---------------------------------------------------------------------------------------
def test_out_of_range_names_the_field_and_range(api):
    code, d = details_of(lambda: api["gen"].GeneratePersonalized(gpb.GenerateRequest(
        request_id="api-bad-1", user_id="api-u", num_images=99), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = d["ErrorInfo"], d["BadRequest"]
    assert (info.reason, info.domain, info.metadata["field"]) == ("OUT_OF_RANGE", DOMAIN, "num_images")
    assert [v.field for v in bad.field_violations] == ["num_images"]
    assert bad.field_violations[0].description == "allowed 1..8" and "RetryInfo" not in d


@pytest.mark.parametrize("fields, field, reason", [
    (dict(request_id="has spaces!"), "request_id", "MALFORMED_ID"),
    (dict(method=77), "method", "UNKNOWN_ENUM_VALUE"),
    (dict(width=36), "width", "NOT_A_MULTIPLE"),
    (dict(guidance_scale=-2.0), "guidance_scale", "OUT_OF_RANGE"),
])
def test_invalid_fields_have_violations_and_no_python_reprs(api, fields, field, reason):
    request = gpb.GenerateRequest(**{"request_id": "api-bad-2", "user_id": "api-u", **fields})
    code, d = details_of(lambda: api["gen"].GeneratePersonalized(request, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and d["ErrorInfo"].reason == reason
    violation = d["BadRequest"].field_violations[0]
    assert violation.field == field and violation.description
    assert "'" not in violation.description and "-2.0" not in violation.description


def test_unknown_items_are_reported_per_row_and_nothing_is_logged(api):
    rows = [history_pb2.Interaction(item_id=i) for i in ("api-0", "nope-1", "api-1", "nope-2")]
    code, d = details_of(lambda: api["hist"].LogInteractions(history_pb2.LogInteractionsRequest(
        user_id="api-u", interactions=rows), timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND and d["ErrorInfo"].reason == "ITEM_NOT_FOUND"
    assert [v.field for v in d["BadRequest"].field_violations] == ["interactions[1].item_id",
                                                                  "interactions[3].item_id"]
    page = api["hist"].GetHistory(history_pb2.GetHistoryRequest(user_id="api-u"), timeout=30)
    assert page.total_size == 0  # all or nothing


def test_duplicate_ids_in_one_upsert_name_the_row(api):
    code, d = details_of(lambda: api["hist"].UpsertItems(history_pb2.UpsertItemsRequest(items=[
        history_pb2.Item(item_id="dup-a"), history_pb2.Item(item_id="dup-a")]), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and d["ErrorInfo"].reason == "DUPLICATE_ID"
    assert d["BadRequest"].field_violations[0].field == "items[1].item_id"


def test_rate_limits_and_unavailability_carry_retry_info_over_grpc():
    """A real server whose one method raises what the cores raise; the client reads RetryInfo and QuotaFailure."""
    errors = {"quota": RateLimited("tenant acme is over its images limit", 2.5, subject="tenant:acme",
                                   quota="images 10 per 1 hour"),
              "down": Unavailable("render queue unavailable"), "bug": KeyError("x")}

    def raise_it(request, context):
        raise errors[request.decode()]

    handler = grpc.method_handlers_generic_handler("t.T", {"Call": grpc.unary_unary_rpc_method_handler(raise_it)})
    server, port, _ = create_server([(lambda _s, srv: srv.add_generic_rpc_handlers((handler,)), None, "t.T")])
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/t.T/Call")
            code, d = details_of(lambda: call(b"quota", timeout=10))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and d["ErrorInfo"].reason == "RATE_LIMITED"
            assert d["RetryInfo"].retry_delay.ToMilliseconds() == 2500
            assert d["QuotaFailure"].violations[0].subject == "tenant:acme"
            code, d = details_of(lambda: call(b"down", timeout=10))
            assert code == grpc.StatusCode.UNAVAILABLE and d["RetryInfo"].retry_delay.seconds >= 1
            code, d = details_of(lambda: call(b"bug", timeout=10))
            assert code == grpc.StatusCode.INTERNAL and d["ErrorInfo"].reason == "INTERNAL"
    finally:
        server.stop(None)


def test_to_rpc_status_is_the_body_for_every_face():
    with pytest.raises(InvalidInput) as err:
        check_range("value", 9.0, 1, 5)
    status = to_rpc_status(err.value)
    assert status.code == 3 and status.message == "value=9 is out of range: allowed 1..5"
    assert to_rpc_status(ValueError("secret path /etc")).message == "internal error: ValueError (logged)"


# -- optional fields, enums, history paging ----------------------------------------------------------------
def test_unset_means_default_and_zero_is_a_value(api):
    gateway = api["stack"].gateway
    from pigment.services.gateway.core import GenerateParams, derive_seed

    default = gateway.resolve(GenerateParams(request_id="api-opt", user_id="api-u"))
    assert default.seed == derive_seed("api-opt") and default.keyword_weight > 0 and default.num_images >= 1
    zero = gateway.resolve(GenerateParams(request_id="api-opt", user_id="api-u", seed=0, keyword_weight=0.0))
    assert zero.seed == 0 and zero.keyword_weight == 0.0


def test_history_pages_with_totals_and_epoch_zero(api):
    hist = api["hist"]
    rows = [history_pb2.Interaction(item_id=f"api-{n % 4}", kind="view", timestamp_ms=n * 1000) for n in range(25)]
    hist.LogInteractions(history_pb2.LogInteractionsRequest(user_id="api-p", create_user=True, interactions=rows),
                         timeout=30)
    pages, token = [], ""
    while True:
        page = hist.GetHistory(history_pb2.GetHistoryRequest(user_id="api-p", page_size=10, page_token=token),
                               timeout=30)
        assert page.total_size == 25
        pages.insert(0, [e.interaction.timestamp_ms for e in page.entries])  # older pages go first
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [5, 10, 10]
    assert sum(pages, []) == [n * 1000 for n in range(25)]  # epoch 0 stays 0: unset is "now", not 0

    before = int(time.time() * 1000)
    hist.LogInteractions(history_pb2.LogInteractionsRequest(user_id="api-p", interactions=[
        history_pb2.Interaction(item_id="api-0")]), timeout=30)
    newest = hist.GetHistory(history_pb2.GetHistoryRequest(user_id="api-p", page_size=1), timeout=30)
    assert newest.entries[0].interaction.timestamp_ms >= before - 1000 and newest.total_size == 26
    code, d = details_of(lambda: hist.GetHistory(history_pb2.GetHistoryRequest(
        user_id="api-p", page_token="'; drop table"), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and d["ErrorInfo"].reason == "INVALID_PAGE_TOKEN"


def test_interaction_batches_are_idempotent(api):
    hist = api["hist"]
    rows = [history_pb2.Interaction(item_id="api-2", kind="like", timestamp_ms=5), history_pb2.Interaction(
        item_id="api-3")]
    request = history_pb2.LogInteractionsRequest(user_id="api-b", create_user=True, interactions=rows,
                                                 batch_id="load-0001")
    first = hist.LogInteractions(request, timeout=30)
    again = hist.LogInteractions(request, timeout=30)  # a reload of the same file
    assert (first.logged, first.duplicate, again.logged, again.duplicate) == (2, False, 2, True)
    assert hist.GetHistory(history_pb2.GetHistoryRequest(user_id="api-b"), timeout=30).total_size == 2
    changed = history_pb2.LogInteractionsRequest(user_id="api-b", interactions=rows[:1], batch_id="load-0001")
    code, d = details_of(lambda: hist.LogInteractions(changed, timeout=30))
    assert code == grpc.StatusCode.ALREADY_EXISTS and d["ErrorInfo"].reason == "IDEMPOTENCY_KEY_REUSED"
    assert d["ErrorInfo"].metadata["field"] == "batch_id"


def test_response_enums_timings_flags_and_decision(api):
    """One render: the response's method is the enum, timings have no _ms suffix, and an unset retrieval mode
    is reported as the server's choice (KEYWORDS_REJECTED: test_preference.py, the tiny LLM writes none)."""
    hist = api["hist"]
    hist.LogInteractions(history_pb2.LogInteractionsRequest(user_id="api-r", create_user=True, interactions=[
        history_pb2.Interaction(item_id="api-0", kind="like"), history_pb2.Interaction(item_id="api-2",
                                                                                       kind="like")]), timeout=30)
    resp = api["gen"].GeneratePersonalized(gpb.GenerateRequest(
        request_id="api-render-1", user_id="api-r", prompt="a star", num_inference_steps=1), timeout=120)
    assert resp.method == gpb.METHOD_PMG and len(resp.images) == api["stack"].gateway.defaults.get("num_images", 1)
    assert {"history", "preference", "render", "total"} <= set(resp.timings_ms)
    assert not any(k.endswith("_ms") for k in resp.timings_ms)
    assert resp.decision.policy == gpb.DECISION_POLICY_FORCED and not resp.decision.retrieved
    assert "server's retrieval_mode" in resp.decision.reason and "asked" not in resp.decision.reason
    events = list(api["gen"].GeneratePersonalizedStream(gpb.GeneratePersonalizedStreamRequest(
        request=gpb.GenerateRequest(request_id="api-render-1", user_id="api-r", prompt="a star",
                                    num_inference_steps=1)), timeout=120))
    assert events[0].progress.status == gpb.PROGRESS_STATUS_DONE and "REPLAYED" in events[-1].result.flags


# -- buf and the generated reference -------------------------------------------------------------------------
def buf() -> str:
    path = shutil.which("buf") or next((str(p) for p in [ROOT / "node_modules/.bin/buf"] if p.exists()), None)
    if path is None:
        pytest.skip("buf is not installed (`make buf` installs it with npm)")
    return path


def test_buf_lint_is_clean():
    result = subprocess.run([buf(), "lint"], cwd=PROTOS, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_against_the_v1_contract():
    result = subprocess.run([buf(), "breaking", "--against", "contract/pigment-v1.binpb"], cwd=PROTOS,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_api_reference_is_generated_from_the_protos():
    from pigment.services.common import apidoc

    assert (ROOT / "docs/API.md").read_text() == apidoc.render(), "docs/API.md is stale: run `make api-docs`"
    text = apidoc.render()
    for flag in apidoc.FLAGS:
        assert f"`{flag}`" in text
    assert "Default (unset)" in text and "KEYWORDS_REJECTED" in text


def test_every_error_reason_in_the_code_is_documented():
    import re

    from pigment.services.common import apidoc, errors

    raised = set()
    for path in (ROOT / "services").rglob("*.py"):
        raised |= set(re.findall(r'reason="([A-Z_]+)"', path.read_text()))
    classes = {c.reason for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.PigmentError)}
    assert raised | classes <= set(apidoc.REASONS), sorted((raised | classes) - set(apidoc.REASONS))
