"""The pigment-client package and the examples in examples/, each run against a real embedded server with an
API key. The Python client runs in a child process where importing ``torch`` or the server's ``pigment``
package raises, so a pass proves the client needs neither. Node is skipped without ``node`` (or without
``npm install`` in examples/node: `make test-deps`); grpcurl is skipped where it is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import make_settings, running_stack
from pigment.services.common import auth
from pigment.services.store.tables import Feedback
from sqlalchemy import select

ROOT = Path(__file__).resolve().parents[1]
RUN = uuid.uuid4().hex[:6]
TENANT = f"ex{RUN}"
BLOCKER = '''
import sys

class Blocked:
    """The client must import without torch and without the server's code."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "pigment"):
            raise ImportError(f"{name} is blocked in the client's process")
        return None

sys.meta_path.insert(0, Blocked())
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_preset):
    tmp = tmp_path_factory.mktemp("client")
    keyfile = tmp / "keys.yaml"
    key = auth.add_key(keyfile, TENANT)
    settings = make_settings(tmp, tiny_preset, auth_keys_file=keyfile)
    with running_stack(settings) as (stack, channel, _worker):
        port = int(channel._channel.target().decode().rsplit(":", 1)[1])
        blocker = tmp / "blocker"
        blocker.mkdir()
        (blocker / "sitecustomize.py").write_text(BLOCKER)
        env = {
            **os.environ,
            "PIGMENT_API_KEY": key,
            "PIGMENT_TENANT": TENANT,
            "PYTHONPATH": f"{blocker}{os.pathsep}{ROOT / 'clients' / 'python' / 'src'}",
        }
        yield {"stack": stack, "target": f"127.0.0.1:{port}", "key": key, "env": env, "tmp": tmp}


def run(cmd, server, cwd, timeout=300) -> dict:
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=server["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def feedback_of(server, feedback_id: str) -> Feedback | None:
    with server["stack"].sessions() as s:
        return s.scalar(select(Feedback).where(Feedback.feedback_id == feedback_id))


def check(server, out: dict, user: str, kind: str) -> None:
    assert len(out["generation_ids"]) == 2 and out["png_bytes"] > 100 and out["duplicate"] is False
    row = feedback_of(server, f"{user}-{kind}")
    assert row is not None and (row.user_id, row.generation_id, row.kind) == (
        user,
        out["generation_ids"][0],
        kind,
    )


def test_client_stubs_are_current():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "clients" / "python" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_the_client_package_declares_no_torch():
    text = (ROOT / "clients" / "python" / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "torch" not in deps and "pigment" not in deps.replace("pigment-client", "")


def test_python_example_without_torch_or_server_code(server, tmp_path):
    user = f"py{RUN}"
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "python" / "quickstart.py"),
        "--target",
        server["target"],
        "--user",
        user,
        "--tenant",
        TENANT,
        "--out",
        str(tmp_path),
    ]
    check(server, run(cmd, server, tmp_path), user, "pick")
    again = run(cmd, server, tmp_path)  # the same ids again: replays, nothing doubled
    assert again["duplicate"] is True and len(list(tmp_path.glob("*.png"))) == 1


def test_shell_example_with_the_client_cli(server, tmp_path):
    user = f"sh{RUN}"
    env_extra = {
        "TARGET": server["target"],
        "USER_ID": user,
        "PYTHON": sys.executable,
        "TENANT": TENANT,
        "ITEM_ID": f"sh-star-{RUN}",
    }
    server = {**server, "env": {**server["env"], **env_extra}}
    out = run(["bash", str(ROOT / "examples" / "shell" / "quickstart.sh")], server, tmp_path)
    assert len(out["generation_ids"]) == 2 and out["png_bytes"] > 100
    assert feedback_of(server, f"{user}-pick").kind == "pick"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_example(server, tmp_path):
    node_dir = ROOT / "examples" / "node"
    if not (node_dir / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip("examples/node has no node_modules: run `make test-deps` (npm install there)")
    user = f"node{RUN}"
    out = run(["node", str(node_dir / "quickstart.js"), server["target"], user], server, tmp_path)
    check(server, {**out, "png_bytes": out["png_bytes"]}, user, "pick")


@pytest.mark.skipif(
    shutil.which("grpcurl") is None,
    reason="grpcurl is not installed here (no Debian package, "
    "no Go toolchain); examples/shell/quickstart.sh does the same with the Python client's CLI",
)
def test_grpcurl_example(server, tmp_path):
    user = f"curl{RUN}"
    server = {**server, "env": {**server["env"], "TARGET": server["target"], "USER_ID": user}}
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "grpcurl" / "quickstart.sh")],
        cwd=tmp_path,
        env=server["env"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert feedback_of(server, f"{user}-like").kind == "like"


def test_client_retries_unavailable_until_the_server_is_up(server, tmp_path):
    """A server that is not up yet answers UNAVAILABLE: the client backs off and gets through once it is."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (
        "import json, os, time\nfrom pigment_client import PigmentClient, RetryPolicy\n"
        f"c = PigmentClient('127.0.0.1:{port}', os.environ['PIGMENT_API_KEY'], retry=RetryPolicy(attempts=40, max_wait_s=0.5, total_s=60))\n"
        "t = time.monotonic()\n"
        f"print(json.dumps({{'logged': c.log_interactions('retry{RUN}', []), 's': time.monotonic() - t}}))\n"
    )
    started = {}

    def start_late():
        time.sleep(2.0)
        started["server"] = server["stack"].server(port=port)[0]
        started["server"].start()

    thread = threading.Thread(target=start_late)
    thread.start()
    try:
        out = run([sys.executable, "-c", script], server, tmp_path, timeout=120)
    finally:
        thread.join()
        if "server" in started:
            started["server"].stop(0)
    assert (
        out["logged"] == 0 and out["s"] >= 1.5
    )  # it waited for the server rather than failing at once


def test_client_waits_as_retry_info_says_on_a_rate_limit(server, tmp_path):
    """A second gateway on the same database with a call limit of 2/second: a plain stub's third call in a row
    is RESOURCE_EXHAUSTED with RetryInfo; the client waits as told and all its calls get through."""
    import grpc
    from pigment.services.stack import Stack
    from pigment.v1 import history_pb2, history_pb2_grpc

    limited = Stack(server["stack"].settings.model_copy(update={"rate_limit_calls": "2/second"}))
    grpc_server, port = limited.server(port=0)
    grpc_server.start()
    try:
        stub = history_pb2_grpc.HistoryServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        metadata = (("authorization", f"Bearer {server['key']}"),)
        with pytest.raises(grpc.RpcError) as err:
            for _ in range(5):
                stub.LogInteractions(
                    history_pb2.LogInteractionsRequest(user_id=f"rl{RUN}", create_user=True),
                    metadata=metadata,
                    timeout=10,
                )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        time.sleep(1.5)  # the window passes
        script = (
            "import json, os, time\nfrom pigment_client import PigmentClient\n"
            f"c = PigmentClient('127.0.0.1:{port}', os.environ['PIGMENT_API_KEY'])\n"
            "t = time.monotonic()\n"
            f"n = [c.log_interactions('rl{RUN}', []) for _ in range(6)]\n"
            "print(json.dumps({'n': n, 's': time.monotonic() - t}))\n"
        )
        out = run([sys.executable, "-c", script], server, tmp_path, timeout=120)
    finally:
        grpc_server.stop(0)
        limited.close()
    assert len(out["n"]) == 6 and out["s"] >= 0.5, (
        out
    )  # six calls at 2/second: it waited for the window
