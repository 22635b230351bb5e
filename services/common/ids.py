"""The one id pattern: every caller string that names something (a user, item, tenant, request, feedback,
generation or job) passes here before it reaches SQL, a storage key or an error message.

``\\A...\\Z`` (not ``^...$``, whose ``$`` accepts a trailing newline); the first character is a letter or
digit, so no id starts with ``.``, ``-`` or ``/``; no ``/``, ``\\``, NUL, whitespace or ``..`` anywhere.
"""

from __future__ import annotations

import json
import re

from pigment.services.common.errors import InvalidInput

MAX_ID_LEN = 128
MAX_KEY_LEN = 64  # idempotency keys and the ids derived from them (request, feedback, generation, job)
ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}\Z")
KEY_RE = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
SHOWN_CHARS = 80


def show(value: object, limit: int = SHOWN_CHARS) -> str:
    """A caller's value as JSON would write it ("abc", 9, 2.5; never a Python repr), cut to ``limit``
    characters: an error never echoes a megabyte back."""
    if isinstance(value, float):
        text = f"{value:g}"
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(str(value))} chars)"


def is_id(value: object) -> bool:
    return isinstance(value, str) and bool(ID_RE.match(value)) and ".." not in value


def check_id(field: str, value: object) -> str:
    """A user, item or tenant id: 1..128 of [A-Za-z0-9_.:@-], starting with a letter or digit, no ``..``."""
    if not is_id(value):
        allowed = (f"allowed 1-{MAX_ID_LEN} characters of [A-Za-z0-9_.:@-], starting with a letter or digit, "
                   "without '..'")
        raise InvalidInput(f"{field}={show(value)} is malformed: {allowed}", reason="MALFORMED_ID", field=field,
                           allowed=allowed)
    return value  # type: ignore[return-value]


def check_key(field: str, value: object, max_len: int = MAX_KEY_LEN) -> str:
    """An idempotency key (request_id, feedback_id, job_id) or a generation id: 1..max_len of [A-Za-z0-9_-]."""
    if not (isinstance(value, str) and KEY_RE.match(value) and len(value) <= max_len):
        allowed = f"allowed 1-{max_len} characters of [A-Za-z0-9_-]"
        raise InvalidInput(f"{field}={show(value)} is malformed: {allowed}", reason="MALFORMED_ID", field=field,
                           allowed=allowed)
    return value


def check_tenant(field: str, value: str | None) -> str | None:
    """An optional tenant: empty means none (the public catalog); otherwise an id."""
    return check_id(field, value) if value else None
