"""The HTTP face's plumbing shared by the app (http.py) and its routes (http_api.py): what it serves
(``HttpContext``), the caller from the bearer key, protobuf-JSON bodies in and out, and google.rpc.Status
error responses with the HTTP status of their code."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from pigment.services.common.auth import LOCAL_ADMIN, Principal
from pigment.services.common.errors import (
    InvalidInput,
    PigmentError,
    RateLimited,
    Unauthenticated,
    to_rpc_status,
)
from pigment.services.common.ids import show

log = logging.getLogger("pigment.http")
# google.rpc.Code -> HTTP, as Google APIs map them (google/rpc/code.proto)
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "FAILED_PRECONDITION": 400,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "INTERNAL": 500,
}


class UnsupportedMediaType(InvalidInput):
    http_status = 415


class BodyTooLarge(InvalidInput):
    http_status = 413


@dataclass
class HttpContext:
    """What the face serves: the gRPC servicers it transcodes to, and the gateway's keys and limits."""

    generation: object  # GenerationServicer
    history: object  # HistoryServicer
    generations: object  # GenerationsCore (image bytes, the user list)
    sessions: object
    settings: object
    keys: object = None  # KeyStore or None: every caller is LOCAL_ADMIN (loopback only)
    limiter: object = None


# -- errors -------------------------------------------------------------------------------------------------
def status_body(exc: Exception) -> dict:
    return json_format.MessageToDict(to_rpc_status(exc))


def error_response(exc: Exception) -> JSONResponse:
    if not isinstance(exc, PigmentError):
        log.error("unhandled error on the HTTP face", exc_info=exc)
    status = getattr(exc, "http_status", None) or HTTP_STATUS.get(
        getattr(exc, "status", "INTERNAL"), 500
    )
    headers = {}
    if isinstance(exc, RateLimited) or getattr(exc, "retry_after_s", None) is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    if getattr(exc, "status", "") == "UNAUTHENTICATED":
        headers["WWW-Authenticate"] = 'Bearer realm="pigment"'
    return JSONResponse(status_body(exc), status, headers=headers)


# -- requests -----------------------------------------------------------------------------------------------
def authenticate(request: Request) -> Principal:
    """The caller, from ``Authorization: Bearer`` like the gRPC interceptor; charges its call limit."""
    ctx: HttpContext = request.app.state.ctx
    try:
        principal = (
            LOCAL_ADMIN
            if ctx.keys is None
            else ctx.keys.authenticate(request.headers.get("authorization"))
        )
    except (
        Unauthenticated
    ) as exc:  # an audit trail of refused calls, as on gRPC (never the key itself)
        peer = request.client.host if request.client else "?"
        log.warning("refused %s %s from %s: %s", request.method, request.url.path, peer, exc)
        raise
    if ctx.limiter is not None:
        ctx.limiter.charge(principal, "calls")
    return principal


async def read_json(request: Request, message):
    """Parse the body into ``message`` (protobuf JSON); 415 unless JSON, 413 past the size cap."""
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {show(ctype, 40)}")
    cap = request.app.state.ctx.settings.http_max_body_bytes
    length = request.headers.get("content-length") or "0"
    if not (length.isascii() and length.isdigit()):
        raise InvalidInput("Content-Length is malformed")
    if int(length) > cap:
        raise BodyTooLarge(f"body over {cap} bytes")
    body = b""
    async for part in request.stream():
        body += part
        if len(body) > cap:
            raise BodyTooLarge(f"body over {cap} bytes")
    try:
        return json_format.Parse(body or b"{}", message)
    except (json_format.ParseError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidInput(
            f"body is not a valid {message.DESCRIPTOR.name} in protobuf JSON: {str(exc)[:300]}"
        ) from None


def to_json(message) -> dict:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
