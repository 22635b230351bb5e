"""HTTP for web clients and operators: ``POST /v1/feedback``, ``GET /healthz``, ``GET /metrics`` (stdlib only).

The same FeedbackCore as the gRPC ``LogFeedback``; domain errors map to HTTP
statuses the way the gRPC interceptor maps them to status codes. Bodies are
JSON in and out; an error answers ``{"error": STATUS, "message": ...}``.
With keys configured, ``POST`` needs ``Authorization: Bearer <key>`` (401
otherwise) and acts as that key's tenant; ``GET /healthz`` stays open. A spent
rate limit answers 429 with ``Retry-After``.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sqlalchemy import text

from pigment.services.common.auth import LOCAL_ADMIN
from pigment.services.common.errors import InvalidInput, PigmentError
from pigment.services.common.ids import show
from pigment.services.store.db import transaction

log = logging.getLogger("pigment.http")
MAX_BODY = 64 * 1024
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 409, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
FIELDS = {"feedback_id": str, "user_id": str, "generation_id": str, "kind": str, "value": (int, float),
          "other_generation_ids": list}
REQUIRED = ("feedback_id", "user_id", "generation_id", "kind")


def parse_feedback(body: bytes) -> dict:
    """The keyword arguments of ``FeedbackCore.log`` from a JSON body; InvalidInput names what is wrong."""
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidInput("body must be a JSON object")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise InvalidInput(f"unknown fields {unknown}: allowed {sorted(FIELDS)}")
    missing = [f for f in REQUIRED if not data.get(f)]
    if missing:
        raise InvalidInput(f"missing fields {missing}")
    for name, kind in FIELDS.items():
        if name in data and (not isinstance(data[name], kind) or isinstance(data[name], bool)):
            raise InvalidInput(f"{name} has the wrong type ({type(data[name]).__name__})")
    others = data.get("other_generation_ids", [])
    if not all(isinstance(o, str) for o in others):
        raise InvalidInput("other_generation_ids must be a list of strings")
    try:
        value = float(data.get("value", 0.0))
    except OverflowError:  # an integer too large for a float
        raise InvalidInput("value is out of range: allowed a finite number") from None
    return {**data, "value": value, "other_generation_ids": others}


class FeedbackHandler(BaseHTTPRequestHandler):
    server_version = "pigment"
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        if self.path.rstrip("/") != "/v1/feedback":
            return self._reply(404, {"error": "NOT_FOUND", "message": f"no such path {self.path}"})
        # Only JSON: a cross-site HTML form can post text/plain or form bodies without a CORS preflight.
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            self.close_connection = True
            return self._reply(415, {"error": "INVALID_ARGUMENT",
                                     "message": f"Content-Type must be application/json, got {show(ctype, 40)}"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            return self._reply(400, {"error": "INVALID_ARGUMENT", "message": "Content-Length is malformed"})
        if length > MAX_BODY:
            self.close_connection = True
            return self._reply(413, {"error": "INVALID_ARGUMENT", "message": f"body over {MAX_BODY} bytes"})
        body = self.rfile.read(length)
        try:
            principal = self._principal()
            duplicate = self.server.feedback.log(**parse_feedback(body), principal=principal)
        except PigmentError as exc:
            return self._reply(HTTP_STATUS.get(exc.status, 500), {"error": exc.status, "message": str(exc)[:1000]},
                               self._error_headers(exc))
        except Exception as exc:
            log.exception("POST /v1/feedback failed")
            return self._reply(500, {"error": "INTERNAL", "message": f"internal error: {type(exc).__name__} (logged)"})
        self._reply(200 if duplicate else 201, {"duplicate": duplicate})

    def _principal(self):
        keys, limiter = self.server.keys, self.server.limiter
        principal = LOCAL_ADMIN if keys is None else keys.authenticate(self.headers.get("Authorization"))
        if limiter is not None:
            limiter.charge(principal, "calls")
        return principal

    @staticmethod
    def _error_headers(exc: PigmentError) -> dict:
        if exc.status == "UNAUTHENTICATED":
            return {"WWW-Authenticate": 'Bearer realm="pigment"'}
        if getattr(exc, "retry_after_s", None) is not None:
            return {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        return {}

    def do_GET(self):
        if self.path.split("?", 1)[0].rstrip("/") == "/metrics":  # Prometheus scrape
            from pigment.services.common.metrics import exposition

            return self._reply_raw(200, *exposition())
        if self.path.rstrip("/") != "/healthz":
            return self._reply(404, {"error": "NOT_FOUND", "message": f"no such path {self.path}"})
        try:
            with transaction(self.server.feedback.sessions) as s:
                s.execute(text("SELECT 1"))
        except PigmentError as exc:
            return self._reply(503, {"status": "unavailable", "message": str(exc)})
        self._reply(200, {"status": "ok"})

    def _reply(self, status: int, payload: dict, headers: dict | None = None) -> None:
        self._reply_raw(status, json.dumps(payload).encode(), "application/json", headers)

    def _reply_raw(self, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        log.info("%s %s", self.address_string(), fmt % args)


def tls_context(cert, key, client_ca=None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class FeedbackHTTPServer:
    """Lifecycle: ``start()`` serves in a daemon thread (port 0 binds a free port), ``stop()`` closes."""

    def __init__(self, feedback, host: str = "127.0.0.1", port: int = 0, keys=None, limiter=None, tls=None):
        """``keys``: a KeyStore (None: every caller is the local admin; the stack allows that on loopback only).
        ``tls``: (cert, key, client CA or None) PEM paths."""
        self.httpd = ThreadingHTTPServer((host, port), FeedbackHandler)
        self.httpd.daemon_threads = True
        self.httpd.feedback = feedback
        self.httpd.keys = keys
        self.httpd.limiter = limiter
        if tls is not None:
            self.httpd.socket = tls_context(*tls).wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> FeedbackHTTPServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http-feedback", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread:
            self._thread.join(5)

