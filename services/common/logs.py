"""Structured logs: one JSON object per line with the request id and trace id, or plain text.

``PIGMENT_LOG_FORMAT=json`` (the production images set it) or ``text`` (the
default, for people at a terminal). The request id travels in a context
variable: the gateway sets it per call, the render task per batch, so every
line a request causes carries it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from contextlib import contextmanager

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("pigment_request_id", default="")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


@contextmanager
def request_context(request_id: str):
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        from pigment.services.common.tracing import current_trace_id

        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        request_id, trace_id = REQUEST_ID.get(), current_trace_id()
        if request_id:
            out["request_id"] = request_id
        if trace_id:
            out["trace_id"] = trace_id
        for key, value in record.__dict__.items():  # extra={...} fields
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str | int = "WARNING", fmt: str = "text") -> None:
    """Root handler on stderr in the chosen format; like ``logging.basicConfig``, a no-op when someone else
    (a test runner, an embedding application) already configured the root logger."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log_format={fmt!r} is unknown: allowed text, json")
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_pigment", False)]:
        root.removeHandler(old)
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler._pigment = True
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
