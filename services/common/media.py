"""Images as they travel to callers: ``ImageRef`` (inline bytes or a signed URL), chunking for streams, and
their protobuf forms (pigment/v1/media.proto), shared by the gateway's and the history service's servicers."""

from __future__ import annotations

from dataclasses import dataclass

from pigment.services.common.errors import InvalidInput
from pigment.v1 import media_pb2

CONTENT_TYPE = "image/png"
CHUNK_DEFAULT, CHUNK_MIN, CHUNK_MAX = 256 << 10, 1024, 4 << 20
DELIVERIES = {
    media_pb2.IMAGE_DELIVERY_UNSPECIFIED: "auto",
    media_pb2.IMAGE_DELIVERY_INLINE: "inline",
    media_pb2.IMAGE_DELIVERY_URL: "url",
    media_pb2.IMAGE_DELIVERY_NONE: "none",
}


@dataclass
class ImageRef:
    size_bytes: int
    png: bytes = b""
    url: str = ""
    url_expire_ms: int = 0


def check_chunk(chunk_bytes: int) -> int:
    if chunk_bytes == 0:
        return CHUNK_DEFAULT
    if not CHUNK_MIN <= chunk_bytes <= CHUNK_MAX:
        allowed = f"allowed {CHUNK_MIN}..{CHUNK_MAX} (unset: {CHUNK_DEFAULT})"
        raise InvalidInput(f"chunk_bytes={chunk_bytes} is out of range: {allowed}", reason="OUT_OF_RANGE",
                           field="chunk_bytes", allowed=allowed)
    return chunk_bytes


def chunks(data: bytes, chunk_bytes: int):
    """(offset, piece) pairs covering ``data`` in order; one empty piece for an empty image."""
    size = check_chunk(chunk_bytes)
    for offset in range(0, max(len(data), 1), size):
        yield offset, data[offset : offset + size]


def image_to_pb(ref: ImageRef | None) -> media_pb2.Image | None:
    if ref is None:
        return None
    return media_pb2.Image(
        png=ref.png,
        url=ref.url,
        size_bytes=ref.size_bytes,
        content_type=CONTENT_TYPE,
        url_expire_time_ms=ref.url_expire_ms,
    )


def chunks_to_pb(data: bytes, chunk_bytes: int):
    for offset, piece in chunks(data, chunk_bytes):
        yield media_pb2.ImageChunk(
            data=piece, offset=offset, total_bytes=len(data), content_type=CONTENT_TYPE
        )
