"""Every failure maps to the status a caller can act on, with a message naming what to fix."""

from __future__ import annotations

import grpc
import pytest
from conftest import make_settings, running_stack
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc
from pydantic import SecretStr


def call(channel, **fields):
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    base = dict(request_id="bad-1", user_id="alice", num_images=1, num_inference_steps=2)
    return stub.GeneratePersonalized(gpb.GenerateRequest(**{**base, **fields}), timeout=60)


def status_of(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


@pytest.fixture(scope="module")
def known_user(embedded):
    _, channel, _ = embedded
    history_pb2_grpc.HistoryServiceStub(channel).LogInteractions(
        history_pb2.LogInteractionsRequest(user_id="alice", create_user=True))
    return embedded


@pytest.mark.parametrize("fields, needle", [
    (dict(num_inference_steps=1000), "num_inference_steps=1000 is out of range: allowed 1..150"),
    (dict(num_images=99), "num_images=99 is out of range: allowed 1..8"),
    (dict(height=4000), "height=4000 is out of range"),
    (dict(width=36), "width=36 must be a multiple of 8"),
    (dict(guidance_scale=-2), "guidance_scale=-2"),
    (dict(request_id="has spaces!"), 'request_id="has spaces!" is malformed'),
    (dict(request_id="x" * 65), "is malformed"),
    (dict(method=77), "method=77 is unknown: allowed METHOD_PMG"),
])
def test_invalid_arguments_name_the_field(known_user, fields, needle):
    _, channel, _ = known_user
    code, details = status_of(lambda: call(channel, **fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in details


def test_unknown_user_is_not_found(known_user):
    _, channel, _ = known_user
    code, details = status_of(lambda: call(channel, request_id="bad-unknown", user_id="nobody"))
    assert code == grpc.StatusCode.NOT_FOUND and "nobody" in details
    hist = history_pb2_grpc.HistoryServiceStub(channel)
    code, _ = status_of(lambda: hist.GetHistory(history_pb2.GetHistoryRequest(user_id="nobody")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = status_of(lambda: hist.LogInteractions(history_pb2.LogInteractionsRequest(
        user_id="alice", interactions=[history_pb2.Interaction(item_id="no-such-item")])))
    assert code == grpc.StatusCode.NOT_FOUND and "no-such-item" in details


def test_request_id_reused_with_other_parameters(known_user):
    _, channel, _ = known_user
    call(channel, request_id="bad-reuse", prompt="a star")
    code, details = status_of(lambda: call(channel, request_id="bad-reuse", prompt="a heart"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "different parameters" in details


def test_full_queue_is_resource_exhausted(tmp_path, tiny_preset):
    settings = make_settings(tmp_path, tiny_preset, max_queue_depth=0)
    with running_stack(settings, worker=False) as (_, channel, _):
        history_pb2_grpc.HistoryServiceStub(channel).LogInteractions(
            history_pb2.LogInteractionsRequest(user_id="alice", create_user=True))
        code, details = status_of(lambda: call(channel, request_id="bad-full"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in details


def test_broker_down_is_unavailable_and_replay_recovers(tmp_path, tiny_preset):
    """Nothing is lost: the request row stays, and a replay once the broker is back renders it."""
    down = make_settings(tmp_path, tiny_preset, broker_url="redis://127.0.0.1:6399/0")
    with running_stack(down, worker=False) as (_, channel, _):
        history_pb2_grpc.HistoryServiceStub(channel).LogInteractions(
            history_pb2.LogInteractionsRequest(user_id="alice", create_user=True))
        code, details = status_of(lambda: call(channel, request_id="bad-broker"))
    assert code == grpc.StatusCode.UNAVAILABLE and "retry with the same request_id" in details

    up = down.model_copy(update={"broker_secret": SecretStr("filesystem://")})
    with running_stack(up) as (_, channel, _):
        resp = call(channel, request_id="bad-broker")
    assert len(resp.images) == 1 and "REPLAYED" in resp.flags


def test_database_down_is_unavailable(tmp_path, tiny_preset):
    from pigment.services.stack import Stack

    settings = make_settings(tmp_path, tiny_preset,
                             database_url="postgresql+psycopg://postgres@127.0.0.1:5999/nowhere")
    server, port = Stack(settings).server(port=0)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            code, details = status_of(lambda: call(channel, request_id="bad-db"))
            assert code == grpc.StatusCode.UNAVAILABLE and "database unavailable" in details
    finally:
        server.stop(0)
