"""Identity and access (issue 15): API keys on gRPC and HTTP, tenant isolation, admin scope, TLS/mTLS,
per-tenant rate limits with RetryInfo, and the refusal to serve unauthenticated off loopback.

The isolation tests run one real stack on PostgreSQL + Redis (broker and rate-limit storage) with a real
worker; tenants are named per run so Redis counters of earlier runs never interfere.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
import urllib.error
import urllib.request
import uuid

import grpc
import pytest
from conftest import REDIS_URL, make_settings, running_stack
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from pigment.services.common import auth
from pigment.services.common.errors import (
    FailedPrecondition,
    Overloaded,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from pigment.services.common.grpc_auth import bearer_channel
from pigment.services.store.tables import Job, User
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import (
    generation_pb2_grpc,
    history_pb2,
    history_pb2_grpc,
    preference_pb2,
    preference_pb2_grpc,
)
from sqlalchemy import select

RUN = uuid.uuid4().hex[:6]
ACME, GLOBEX, QUOTA = f"acme{RUN}", f"globex{RUN}", f"quota{RUN}"
ALICE, ALICE2, BOB, QUSER = f"alice{RUN}", f"alice2{RUN}", f"bob{RUN}", f"q{RUN}"


def status_of(fn, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kwargs)
    return err.value.code(), err.value.details()


class Client:
    """The three stubs over one channel carrying one key."""

    def __init__(self, channel, key):
        ch = bearer_channel(channel, key)
        self.history = history_pb2_grpc.HistoryServiceStub(ch)
        self.gen = generation_pb2_grpc.GenerationServiceStub(ch)
        self.pref = preference_pb2_grpc.PreferenceServiceStub(ch)

    def create_user(self, user_id, tenant="", items=()):
        return self.history.LogInteractions(history_pb2.LogInteractionsRequest(
            user_id=user_id, create_user=True, tenant=tenant,
            interactions=[history_pb2.Interaction(item_id=i, kind="like") for i in items]), timeout=30)

    def generate(self, request_id, user_id, n=1):
        return self.gen.GeneratePersonalized(gpb.GenerateRequest(
            request_id=request_id, user_id=user_id, prompt="a star", num_images=n, num_inference_steps=2),
            timeout=120)


@pytest.fixture(scope="module")
def secured(tmp_path_factory, tiny_preset, pg_database):
    """PostgreSQL + Redis stack with keys for two tenants (plain and admin), an operator, and a quota tenant."""
    tmp = tmp_path_factory.mktemp("auth")
    keyfile = tmp / "keys.yaml"
    keys = {"a": auth.add_key(keyfile, ACME), "a_admin": auth.add_key(keyfile, ACME, admin=True),
            "b": auth.add_key(keyfile, GLOBEX), "op": auth.add_key(keyfile, "*", admin=True),
            "q": auth.add_key(keyfile, QUOTA)}
    settings = make_settings(tmp, tiny_preset, database_url=pg_database(), broker_url=REDIS_URL,
                             auth_keys_file=keyfile, rate_limit_storage=REDIS_URL, rate_limit_images="4/hour")
    with running_stack(settings) as (stack, channel, _worker):
        clients = {name: Client(channel, key) for name, key in keys.items()}
        op = clients["op"]
        op.history.UpsertItems(history_pb2.UpsertItemsRequest(items=[
            history_pb2.Item(item_id=f"pub-{RUN}", caption="a large red circle on a dark background")]))
        clients["a"].history.UpsertItems(history_pb2.UpsertItemsRequest(items=[
            history_pb2.Item(item_id=f"acme-item-{RUN}", caption="a small blue star on a light background",
                             tenant=ACME)]))
        clients["b"].history.UpsertItems(history_pb2.UpsertItemsRequest(items=[
            history_pb2.Item(item_id=f"globex-item-{RUN}", caption="a small yellow heart on a grey background",
                             tenant=GLOBEX)]))
        clients["a"].create_user(ALICE, items=[f"pub-{RUN}", f"acme-item-{RUN}"])
        clients["a"].create_user(ALICE2, tenant=ACME, items=[f"pub-{RUN}"])
        clients["b"].create_user(BOB, items=[f"globex-item-{RUN}"])
        http = stack.http_server(0).start()
        yield {"stack": stack, "channel": channel, "keys": keys, "http": http, **clients}
        http.stop()


def test_keys_file_holds_hashes_only_and_reloads(tmp_path):
    path = tmp_path / "keys.yaml"
    key = auth.add_key(path, "t1")
    text = path.read_text()
    assert key not in text and auth.hash_key(key) in text
    assert path.stat().st_mode & 0o077 == 0  # not readable by others
    store = auth.KeyStore(path)
    assert store.authenticate(f"Bearer {key}") == auth.Principal("t1", frozenset(), auth.hash_key(key)[:12])
    for header in (None, "", f"Basic {key}", "Bearer wrong", key):
        with pytest.raises(Unauthenticated):
            store.authenticate(header)
    second = auth.add_key(path, "t2", admin=True)  # a running store sees new and revoked keys without restart
    assert store.authenticate(f"Bearer {second}").is_admin
    auth.revoke_key(path, auth.hash_key(key)[:10])
    with pytest.raises(Unauthenticated):
        store.authenticate(f"Bearer {key}")
    with pytest.raises(FailedPrecondition, match="needs --admin"):
        auth.add_key(path, "*")
    for tenant in ("Acme Corp", "../t", "t\n"):  # a key's tenant follows the one id pattern requests follow
        with pytest.raises(FailedPrecondition, match="tenant must be"):
            auth.add_key(path, tenant)
    path.write_text(f"{key}: {{tenant: t1}}\n")  # a plain key where a hash belongs is refused
    with pytest.raises(FailedPrecondition, match="not a sha256"):
        auth.KeyStore(path)


def test_no_or_wrong_key_is_unauthenticated_health_stays_open(secured):
    channel = secured["channel"]
    anonymous = history_pb2_grpc.HistoryServiceStub(channel)
    request = history_pb2.GetHistoryRequest(user_id=ALICE)
    code, details = status_of(lambda: anonymous.GetHistory(request, timeout=10))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details
    wrong = history_pb2_grpc.HistoryServiceStub(bearer_channel(channel, "pgm_not-a-key"))
    assert status_of(lambda: wrong.GetHistory(request, timeout=10))[0] == grpc.StatusCode.UNAUTHENTICATED
    anon_gen = generation_pb2_grpc.GenerationServiceStub(channel)
    stream = anon_gen.GeneratePersonalizedStream(gpb.GeneratePersonalizedStreamRequest(request=gpb.GenerateRequest(request_id="anon", user_id=ALICE)), timeout=10)
    assert status_of(lambda: list(stream))[0] == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    listed = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for r in listed for s in r.list_services_response.service}
    assert "pigment.v1.GenerationService" in names
    assert len(secured["a"].history.GetHistory(request, timeout=10).entries) == 2


def test_users_get_the_callers_tenant_and_ids_of_others_are_not_taken(secured):
    with secured["stack"].sessions() as s:
        assert s.get(User, ALICE).tenant == ACME and s.get(User, BOB).tenant == GLOBEX
    a = secured["a"]
    code, details = status_of(lambda: a.create_user(f"x{RUN}", tenant=GLOBEX))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not the caller's tenant" in details
    assert status_of(lambda: a.create_user(BOB))[0] == grpc.StatusCode.PERMISSION_DENIED
    # another tenant's private item cannot enter a history (its caption would leak through GetHistory)
    code, _ = status_of(lambda: a.history.LogInteractions(history_pb2.LogInteractionsRequest(
        user_id=ALICE, interactions=[history_pb2.Interaction(item_id=f"globex-item-{RUN}")]), timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    # items: a tenant key writes only its own tenant's, and cannot take over another's id or the catalog's
    for item in (history_pb2.Item(item_id=f"new-{RUN}", caption="c"),
                 history_pb2.Item(item_id=f"new-{RUN}", caption="c", tenant=GLOBEX),
                 history_pb2.Item(item_id=f"globex-item-{RUN}", caption="mine now", tenant=ACME),
                 history_pb2.Item(item_id=f"pub-{RUN}", caption="mine now", tenant=ACME)):
        code, _ = status_of(a.history.UpsertItems, history_pb2.UpsertItemsRequest(items=[item]), timeout=30)
        assert code == grpc.StatusCode.PERMISSION_DENIED, item


def test_tenant_cannot_read_generate_feedback_or_search_another_tenants_user(secured):
    a, b = secured["a"], secured["b"]
    bob_gen = b.generate(f"b-{RUN}", BOB).images[0].generation_id
    alice_gen = a.generate(f"a-{RUN}", ALICE).images[0].generation_id
    not_found = [
        lambda: a.history.GetHistory(history_pb2.GetHistoryRequest(user_id=BOB), timeout=10),
        lambda: a.generate(f"a-on-bob-{RUN}", BOB),
        lambda: a.generate(f"b-{RUN}", BOB),  # replaying bob's own request returns nothing to another tenant
        lambda: list(a.gen.GeneratePersonalizedStream(gpb.GeneratePersonalizedStreamRequest(request=gpb.GenerateRequest(
            request_id=f"b-{RUN}", user_id=BOB, prompt="a star", num_images=1, num_inference_steps=2)), timeout=60)),
        lambda: a.pref.EncodePreferences(preference_pb2.EncodePreferencesRequest(user_id=BOB), timeout=30),
        lambda: a.history.SearchItems(history_pb2.SearchItemsRequest(text="a heart", user_id=BOB), timeout=30),
        lambda: a.gen.LogFeedback(gpb.LogFeedbackRequest(feedback_id=f"f1-{RUN}", user_id=BOB,
                                                         generation_id=bob_gen, kind=gpb.FEEDBACK_KIND_LIKE)),
        lambda: a.gen.LogFeedback(gpb.LogFeedbackRequest(feedback_id=f"f2-{RUN}", user_id=ALICE,
                                                         generation_id=bob_gen, kind=gpb.FEEDBACK_KIND_LIKE)),
        lambda: secured["a_admin"].history.DeleteUser(history_pb2.DeleteUserRequest(user_id=BOB), timeout=30),
    ]
    for n, call in enumerate(not_found):
        code, details = status_of(call)
        assert code == grpc.StatusCode.NOT_FOUND, (n, code, details)
        assert GLOBEX not in details
    # search without a user: the caller's tenant and the public catalog, never another tenant's items
    hits = a.history.SearchItems(history_pb2.SearchItemsRequest(text="a small yellow heart", k=50), timeout=30)
    ids = {h.item.item_id for h in hits.results}
    assert f"globex-item-{RUN}" not in ids and f"acme-item-{RUN}" in ids
    # the owner still can
    assert b.gen.LogFeedback(gpb.LogFeedbackRequest(feedback_id=f"f3-{RUN}", user_id=BOB, generation_id=bob_gen,
                                                    kind=gpb.FEEDBACK_KIND_LIKE)).duplicate is False
    assert a.gen.LogFeedback(gpb.LogFeedbackRequest(feedback_id=f"f4-{RUN}", user_id=ALICE,
                                                    generation_id=alice_gen, kind=gpb.FEEDBACK_KIND_LIKE))
    assert len(b.history.GetHistory(history_pb2.GetHistoryRequest(user_id=BOB), timeout=10).entries) == 1


def test_delete_user_needs_admin_of_the_same_tenant(secured):
    victim = f"del{RUN}"
    secured["a"].create_user(victim)
    code, details = status_of(lambda: secured["a"].history.DeleteUser(
        history_pb2.DeleteUserRequest(user_id=victim), timeout=30))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in details
    secured["a_admin"].history.DeleteUser(history_pb2.DeleteUserRequest(user_id=victim), timeout=30)
    with secured["stack"].sessions() as s:
        assert s.get(User, victim) is None


def test_jobs_are_isolated_and_segments_need_admin(secured):
    a, a_admin, b = secured["a"], secured["a_admin"], secured["b"]
    job_id = f"jb{RUN}"
    b.gen.SubmitBatch(gpb.SubmitBatchRequest(job_id=job_id, user_ids=[BOB], prompt="a star",
                                             num_inference_steps=2), timeout=30)
    for call in (lambda: a.gen.GetJob(gpb.GetJobRequest(job_id=job_id), timeout=10).job,
                 lambda: a_admin.gen.CancelJob(gpb.CancelJobRequest(job_id=job_id), timeout=10).job,
                 lambda: a.gen.SubmitBatch(gpb.SubmitBatchRequest(job_id=f"ja{RUN}", user_ids=[BOB]), timeout=10)):
        assert status_of(call)[0] == grpc.StatusCode.NOT_FOUND
    # replaying another tenant's job id neither reveals nor touches it
    code, _ = status_of(lambda: a.gen.SubmitBatch(gpb.SubmitBatchRequest(job_id=job_id, user_ids=[ALICE]),
                                                  timeout=10))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert b.gen.GetJob(gpb.GetJobRequest(job_id=job_id), timeout=10).job.total == 1
    code, details = status_of(lambda: a.gen.SubmitBatch(gpb.SubmitBatchRequest(job_id=f"js{RUN}", segment="*"),
                                                        timeout=10))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in details
    code, _ = status_of(lambda: a_admin.gen.SubmitBatch(gpb.SubmitBatchRequest(job_id=f"jg{RUN}", segment=GLOBEX),
                                                        timeout=10))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # "*" for a tenant admin: every user of its own tenant, nobody else's
    job = a_admin.gen.CancelJob(gpb.CancelJobRequest(job_id=a_admin.gen.SubmitBatch(gpb.SubmitBatchRequest(
        job_id=f"jall{RUN}", segment="*", num_inference_steps=2), timeout=30).job.job_id), timeout=10).job
    assert {r.user_id for r in job.results} == {ALICE, ALICE2}
    with secured["stack"].sessions() as s:
        assert s.scalar(select(Job.tenant).where(Job.job_id == f"jall{RUN}")) == ACME


def test_image_quota_is_resource_exhausted_with_retry_info_on_redis(secured):
    q = secured["q"]
    q.create_user(QUSER, items=[f"pub-{RUN}"])
    first = q.generate(f"q1-{RUN}", QUSER, n=3)
    with pytest.raises(grpc.RpcError) as err:
        q.generate(f"q2-{RUN}", QUSER, n=2)  # 3 + 2 > 4 images per hour
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "images" in err.value.details()
    status = rpc_status.from_call(err.value)
    from google.rpc import error_details_pb2

    info, quota = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
    assert [d for d in status.details if d.Unpack(info)] and [d for d in status.details if d.Unpack(quota)]
    assert 0 < info.retry_delay.ToTimedelta().total_seconds() <= 3600
    assert quota.violations[0].subject.startswith("tenant:") and "images" in quota.violations[0].description
    # replays are free; other tenants have their own quota
    assert q.generate(f"q1-{RUN}", QUSER, n=3).images[0].generation_id == first.images[0].generation_id
    code, _ = status_of(lambda: q.gen.SubmitBatch(gpb.SubmitBatchRequest(
        job_id=f"jq{RUN}", user_ids=[QUSER], images_per_user=2), timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def _http(port, body, key=None, scheme="http", context=None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/v1/feedback", data=json.dumps(body).encode(),
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status, resp.headers, json.loads(resp.read())  # headers: case-insensitive
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def test_http_feedback_needs_the_key_and_stays_in_the_tenant(secured):
    gen_id = secured["b"].generate(f"bh-{RUN}", BOB).images[0].generation_id
    port, keys = secured["http"].port, secured["keys"]
    body = {"feedback_id": f"h1-{RUN}", "user_id": BOB, "generation_id": gen_id, "kind": "FEEDBACK_KIND_LIKE"}
    code, headers, payload = _http(port, body)
    assert code == 401 and payload["code"] == 16 and headers["WWW-Authenticate"].startswith("Bearer")
    assert _http(port, body, key="pgm_wrong")[0] == 401
    assert _http(port, body, key=keys["a"])[0] == 404
    assert _http(port, body, key=keys["b"])[:3:2] == (201, {"duplicate": False})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
        assert resp.status == 200


def test_refuses_to_serve_without_auth_off_loopback(tmp_path, tiny_preset):
    from pigment.services.stack import Stack

    settings = make_settings(tmp_path, tiny_preset, host="0.0.0.0")
    stack = Stack(settings)
    with pytest.raises(FailedPrecondition, match="without authentication"):
        stack.server(port=0)
    with pytest.raises(FailedPrecondition, match="without authentication"):
        stack.http_server(0)
    keyfile = tmp_path / "keys.yaml"
    auth.add_key(keyfile, "t")
    server, port = Stack(make_settings(tmp_path, tiny_preset, host="0.0.0.0", auth_keys_file=keyfile)).server(port=0)
    server.stop(0)
    assert port > 0


def test_call_rate_limit_answers_retry_info_grpc_and_http(tmp_path, tiny_preset):
    keyfile = tmp_path / "keys.yaml"
    k1, k2 = auth.add_key(keyfile, f"r1{RUN}"), auth.add_key(keyfile, f"r2{RUN}")
    settings = make_settings(tmp_path, tiny_preset, auth_keys_file=keyfile, rate_limit_calls="3/minute")
    with running_stack(settings, worker=False) as (stack, channel, _):
        one, two = Client(channel, k1), Client(channel, k2)
        for n in range(3):
            one.create_user(f"r{n}")
        with pytest.raises(grpc.RpcError) as err:
            one.create_user("r3")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        from google.rpc import error_details_pb2

        info = error_details_pb2.RetryInfo()
        assert any(d.Unpack(info) for d in rpc_status.from_call(err.value).details)  # RetryInfo, among others
        assert 0 < info.retry_delay.ToTimedelta().total_seconds() <= 60
        two.create_user("s0")  # another tenant is not affected
        http = stack.http_server(0).start()
        try:
            code, headers, _ = _http(http.port, {"feedback_id": "x", "user_id": "r0", "generation_id": "g",
                                                 "kind": "FEEDBACK_KIND_LIKE"}, key=k1)
        finally:
            http.stop()
        assert code == 429 and 1 <= int(headers["Retry-After"]) <= 60


def test_rate_limiter_fails_closed_and_refuses_what_never_fits():
    principal = auth.Principal("t")
    down = auth.RateLimiter("redis://127.0.0.1:1/0", calls="5/second")
    with pytest.raises(Unavailable, match="rate-limit storage unreachable"):
        down.charge(principal, "calls")
    limiter = auth.RateLimiter("memory://", images="4/hour")
    with pytest.raises(Overloaded, match="can never fit") as err:
        limiter.charge(principal, "images", 5)
    assert not isinstance(err.value, RateLimited)  # no retry would help: no RetryInfo
    limiter.charge(principal, "images", 4)
    with pytest.raises(RateLimited):
        limiter.charge(principal, "images", 1)
    limiter.charge(auth.Principal("other"), "images", 4)
    tiered = auth.RateLimiter("memory://", images="1/hour", tenants={"big": {"images": "10/hour"}, "free": {"images": ""}})
    tiered.charge(auth.Principal("big"), "images", 10)
    for _ in range(50):
        tiered.charge(auth.Principal("free"), "images", 5)
    with pytest.raises(Overloaded):
        tiered.charge(auth.Principal("small"), "images", 2)
    with pytest.raises(ValueError, match="unknown groups"):
        auth.RateLimiter(tenants={"t": {"imagez": "1/hour"}})


def _pki(tmp_path):
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def cert(name, issuer_name, issuer_key, key, ca=False, sans=()):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(name, key, crt):
        (tmp_path / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (tmp_path / f"{name}.pem").write_bytes(crt.public_bytes(serialization.Encoding.PEM))
        return tmp_path / f"{name}.pem", tmp_path / f"{name}.key"

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pigment test CA")])
    ca = cert("pigment test CA", ca_name, ca_key, ca_key, ca=True)
    out = {"ca": write("ca", ca_key, ca)[0]}
    for name, sans in (("server", (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))),
                       ("client", ())):
        key = ec.generate_private_key(ec.SECP256R1())
        out[name] = write(name, key, cert(name, ca_name, ca_key, key, sans=sans))
    return out


def test_tls_and_mtls_round_trip(tmp_path, tiny_preset):
    pki = _pki(tmp_path)
    keyfile = tmp_path / "keys.yaml"
    key = auth.add_key(keyfile, f"tls{RUN}")
    ca = pki["ca"].read_bytes()
    request = history_pb2.LogInteractionsRequest(user_id="t-user", create_user=True)
    for mtls in (False, True):
        settings = make_settings(tmp_path / str(mtls), tiny_preset, auth_keys_file=keyfile,
                                 tls_cert_file=pki["server"][0], tls_key_file=pki["server"][1],
                                 tls_client_ca_file=pki["ca"] if mtls else None)
        stack = migrated_stack(settings)
        server, port = stack.server(port=0)
        server.start()
        try:
            client_pair = {"private_key": pki["client"][1].read_bytes(),
                           "certificate_chain": pki["client"][0].read_bytes()}
            good = grpc.secure_channel(f"localhost:{port}", grpc.composite_channel_credentials(
                grpc.ssl_channel_credentials(ca, **(client_pair if mtls else {})),
                grpc.access_token_call_credentials(key)))
            assert history_pb2_grpc.HistoryServiceStub(good).LogInteractions(request, timeout=10).logged == 0
            no_key = grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(
                ca, **(client_pair if mtls else {})))
            code, _ = status_of(history_pb2_grpc.HistoryServiceStub(no_key).GetHistory,
                                history_pb2.GetHistoryRequest(user_id="t-user"), timeout=10)
            assert code == grpc.StatusCode.UNAUTHENTICATED
            plain = grpc.insecure_channel(f"127.0.0.1:{port}")  # plaintext never reaches a handler
            code, _ = status_of(history_pb2_grpc.HistoryServiceStub(plain).GetHistory,
                                history_pb2.GetHistoryRequest(user_id="t-user"), timeout=5)
            assert code == grpc.StatusCode.UNAVAILABLE
            if mtls:  # a key without a client certificate is not enough
                no_cert = grpc.secure_channel(f"localhost:{port}", grpc.composite_channel_credentials(
                    grpc.ssl_channel_credentials(ca), grpc.access_token_call_credentials(key)))
                code, _ = status_of(history_pb2_grpc.HistoryServiceStub(no_cert).GetHistory,
                                    history_pb2.GetHistoryRequest(user_id="t-user"), timeout=5)
                assert code == grpc.StatusCode.UNAVAILABLE
            for ch in (good, no_key, plain):
                ch.close()
            http = stack.http_server(0).start()
            try:
                ctx = ssl.create_default_context(cafile=str(pki["ca"]))
                if mtls:
                    ctx.load_cert_chain(str(pki["client"][0]), str(pki["client"][1]))
                code, _, payload = _http(http.port, {"feedback_id": "t1", "user_id": "t-user", "generation_id": "g",
                                                     "kind": "FEEDBACK_KIND_LIKE"}, key=key, scheme="https", context=ctx)
                assert code == 404 and "generation" in payload["message"]  # authenticated, served over TLS
            finally:
                http.stop()
        finally:
            server.stop(0)


def migrated_stack(settings):
    from pigment.services.stack import Stack
    from pigment.services.store.migrate import upgrade

    upgrade(settings.database_url)
    return Stack(settings)


def test_embedded_default_is_one_local_admin(tmp_path, tiny_preset):
    """No keys on loopback: every call is the local admin, as the demo and the other tests rely on."""
    settings = make_settings(tmp_path, tiny_preset)
    with running_stack(settings, worker=False) as (stack, channel, _):
        history = history_pb2_grpc.HistoryServiceStub(channel)
        history.LogInteractions(history_pb2.LogInteractionsRequest(user_id="e1", create_user=True, tenant="t"))
        assert history.DeleteUser(history_pb2.DeleteUserRequest(user_id="e1"), timeout=30).interactions_deleted == 0
        with stack.sessions() as s:
            assert s.get(User, "e1") is None
