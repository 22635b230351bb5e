"""Caps on what a caller may send: string lengths per field, finite numbers, images checked before decode.

``InputLimits`` holds the operator-tunable caps (from Settings); the checks raise InvalidInput naming the
field and the allowed range, and never echo more than a few dozen characters of the caller's value.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass

from pigment.services.common.errors import InvalidInput
from pigment.services.common.ids import check_id, show

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8"
# JPEG start-of-frame markers (they carry the dimensions); C4, C8 and CC are other segments.
JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}

MAX_KIND_CHARS = 32        # interactions.kind is String(32)
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_KEY_CHARS = 64
MAX_ATTRIBUTE_VALUE_CHARS = 256
MAX_QUERY_CHARS = 500      # search text, preference target (the gateway's prompt cap)
MAX_INTERACTIONS = 10_000  # per LogInteractions call
MAX_ITEMS = 10_000         # per UpsertItems call
MAX_ABS_VALUE = 1e9        # interaction values: finite and within +-1e9
MAX_TIMESTAMP_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last instant a datetime holds


@dataclass(frozen=True)
class InputLimits:
    max_caption_chars: int = 2000
    max_image_bytes: int = 10 << 20
    max_image_pixels: int = 4096 * 4096

    @classmethod
    def from_settings(cls, settings) -> InputLimits:
        return cls(settings.max_caption_chars, settings.max_image_bytes, settings.max_image_pixels)


def check_text(field: str, value: str, max_chars: int) -> str:
    """At most ``max_chars`` characters and no NUL (PostgreSQL refuses NUL in text and JSON)."""
    if len(value) > max_chars:
        raise InvalidInput(f"{field} is {len(value)} characters: allowed at most {max_chars}", reason="TOO_LONG",
                           field=field, allowed=f"allowed at most {max_chars} characters")
    if "\x00" in value:
        raise InvalidInput(f"{field} contains a NUL character", reason="MALFORMED_TEXT", field=field,
                           allowed="text without NUL characters")
    return value


def check_finite(field: str, value: float, bound: float = MAX_ABS_VALUE) -> float:
    if not math.isfinite(value) or abs(value) > bound:
        allowed = f"allowed a finite number within +-{bound:g}"
        raise InvalidInput(f"{field}={show(value)} is out of range: {allowed}", reason="OUT_OF_RANGE", field=field,
                           allowed=allowed)
    return value


def check_attributes(field: str, attributes: dict) -> dict[str, str]:
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidInput(f"{field} has {len(attributes)} entries: allowed at most {MAX_ATTRIBUTES}", field=field)
    out = {}
    for key, value in attributes.items():
        check_text(f"{field} key {show(key, 40)}", str(key), MAX_ATTRIBUTE_KEY_CHARS)
        if not str(key):
            raise InvalidInput(f"{field} has an empty key", field=field)
        out[str(key)] = check_text(f"{field}[{show(key, 40)}]", str(value), MAX_ATTRIBUTE_VALUE_CHARS)
    return out


def check_kind(field: str, value: str) -> str:
    """A short label (interaction kind): 1..32 characters, an id's alphabet."""
    if len(value) > MAX_KIND_CHARS:
        raise InvalidInput(f"{field} is {len(value)} characters: allowed at most {MAX_KIND_CHARS}", reason="TOO_LONG",
                           field=field, allowed=f"allowed at most {MAX_KIND_CHARS} characters")
    return check_id(field, value)


# --------------------------------------------------------------------------- images


def image_size(data: bytes) -> tuple[str, int, int] | None:
    """(format, width, height) read from a PNG or JPEG header without decoding; None if neither."""
    if data.startswith(PNG_MAGIC):
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        width, height = struct.unpack(">II", data[16:24])
        return "PNG", width, height
    if data.startswith(JPEG_MAGIC):
        return _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[str, int, int] | None:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in JPEG_SOF:
            if i + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return "JPEG", width, height
        i += 2 + length
    return None


def check_image(field: str, data: bytes, limits: InputLimits) -> bytes:
    """Size in bytes, format (PNG or JPEG magic) and pixel count from the header, all before any decode;
    then a decode bounded by that cap, so corrupt bytes are the caller's error. Returns PNG bytes."""
    if len(data) > limits.max_image_bytes:
        raise InvalidInput(f"{field} is {len(data)} bytes: allowed at most {limits.max_image_bytes}", field=field)
    head = image_size(data)
    if head is None:
        raise InvalidInput(f"{field} is not a PNG or JPEG image (checked by its header)", field=field)
    fmt, width, height = head
    if width < 1 or height < 1 or width * height > limits.max_image_pixels:
        raise InvalidInput(f"{field} is {width}x{height} pixels: allowed 1..{limits.max_image_pixels} pixels", field=field)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as image:
            if image.size != (width, height):
                raise InvalidInput(f"{field}: its header says {width}x{height} but it decodes as {image.size}", field=field)
            image.load()
            if fmt == "PNG":
                return data
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="PNG")
            return buf.getvalue()
    except InvalidInput:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt data
        raise InvalidInput(f"{field} is not a readable {fmt} image: {type(exc).__name__}: {str(exc)[:120]}", field=field) from None
