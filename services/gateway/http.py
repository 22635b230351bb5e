"""The HTTP/JSON face: FastAPI on uvicorn, in the gateway's process, beside gRPC.

It transcodes: a JSON body is parsed into the RPC's request message with protobuf's JSON mapping (camelCase or
snake_case names, enum names such as ``FEEDBACK_KIND_LIKE``), the same servicer method the gRPC server calls
runs with the same principal, and its response message goes back as protobuf JSON. So both faces share one
validation, one authorization and one error body: a ``google.rpc.Status`` (``{"code", "message",
"details"}``), with the HTTP status of its code, ``Retry-After`` on 429 and ``WWW-Authenticate`` on 401.

Bodies are JSON only (415 otherwise: a cross-site form can post text/plain without a CORS preflight) and at
most ``http_max_body_bytes`` (413). CORS is off unless ``http_cors_origins`` names origins. Each request has
``http_request_timeout_s`` (504 after it; a blocking generate gets it as its deadline); past
``4 x max_concurrent_rpcs`` requests in flight, 503 with a Status body (http_limit.py); idle keep-alive
connections close after ``http_keep_alive_s``. ``GET /healthz``, ``/metrics``, ``/openapi.json``, the gallery
(``/``) and signed image URLs need no key; everything else under ``/v1`` does when keys are configured.
Routes live in services/gateway/http_api.py, shared plumbing in http_io.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pigment.services.common.errors import InvalidInput, NotFound, PigmentError
from pigment.services.common.ids import show
from pigment.services.gateway.http_io import HttpContext, error_response
from pigment.services.gateway.http_limit import ConcurrencyLimit
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("pigment.http")
GALLERY_DIR = Path(__file__).with_name("gallery")
__all__ = ["HTTPServer", "HttpContext", "create_app"]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PigmentError)
    async def pigment_error(request: Request, exc: PigmentError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(NotFound(f"no such path {show(request.url.path, 100)}"))
        if exc.status_code == 405:
            err = InvalidInput(f"{request.method} is not allowed on {show(request.url.path, 100)}")
            err.http_status = 405
            return error_response(err)
        return error_response(PigmentError(str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return error_response(InvalidInput(where[:500]))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return error_response(exc)


def http_concurrency(settings) -> int:
    """HTTP requests in flight at once; past it, 503 with a Status body and Retry-After."""
    return settings.max_concurrent_rpcs * 4


# -- the app --------------------------------------------------------------------------------------------------
def create_app(ctx: HttpContext) -> FastAPI:
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.staticfiles import StaticFiles
    from pigment.services.gateway import http_api

    app = FastAPI(
        title="pigment",
        version="v1",
        docs_url="/docs",
        redoc_url=None,
        description="pigment's HTTP/JSON face: the gRPC API's messages in protobuf's JSON mapping. "
        "Send `Authorization: Bearer <api key>` when the server has keys. Errors are "
        "google.rpc.Status JSON.",
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    timeout = ctx.settings.http_request_timeout_s

    @app.middleware("http")
    async def deadline(request: Request, call_next):
        try:
            return await asyncio.wait_for(call_next(request), timeout)
        except TimeoutError:
            from pigment.services.common.errors import DeadlineExceeded

            return error_response(
                DeadlineExceeded(
                    f"{request.url.path} not answered within {timeout:g}s (http_request_timeout_s)"
                )
            )

    if ctx.settings.http_cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(ctx.settings.http_cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After"],
        )
    # outermost: a request past the limit is refused before any other work, with the Status body
    app.add_middleware(ConcurrencyLimit, limit=http_concurrency(ctx.settings))
    app.include_router(http_api.router)
    app.mount("/gallery", StaticFiles(directory=GALLERY_DIR), name="gallery")

    @app.get("/", include_in_schema=False)
    def gallery():
        return Response((GALLERY_DIR / "index.html").read_bytes(), media_type="text/html")

    @app.get("/healthz", tags=["operations"])
    def healthz():
        from pigment.services.store.db import transaction
        from sqlalchemy import text

        try:
            with transaction(ctx.sessions) as s:
                s.execute(text("SELECT 1"))
        except PigmentError as exc:
            return JSONResponse({"status": "unavailable", "message": str(exc)}, 503)
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics():
        from pigment.services.common.metrics import exposition

        data, content_type = exposition()
        return Response(data, media_type=content_type)

    app.openapi = lambda: http_api.openapi(app)
    return app


# -- the server -----------------------------------------------------------------------------------------------
class HTTPServer:
    """uvicorn in a daemon thread. ``start()`` binds (port 0: a free one), ``stop()`` closes.
    ``tls``: (cert, key, client CA or None) PEM paths; with a CA, client certificates are required."""

    def __init__(self, ctx: HttpContext, host: str = "127.0.0.1", port: int = 0, tls=None):
        import uvicorn

        self.ctx, self.host = ctx, host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.scheme = "https" if tls else "http"
        cert, key, ca = tls or (None, None, None)
        config = uvicorn.Config(
            create_app(ctx),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=int(max(1, ctx.settings.http_keep_alive_s)),
            # requests past http_concurrency get ConcurrencyLimit's Status body (http_limit.py); uvicorn's own
            # plain-text 503 stays only as a backstop against a flood of idle connections
            limit_concurrency=http_concurrency(ctx.settings) * 2,
            timeout_graceful_shutdown=5,
            ssl_certfile=str(cert) if cert else None,
            ssl_keyfile=str(key) if key else None,
            ssl_ca_certs=str(ca) if ca else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if ca else ssl.CERT_NONE,
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self, ready_s: float = 10.0) -> HTTPServer:
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="http-face", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + ready_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP face did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread:
            self._thread.join(10)
        self.sock.close()
