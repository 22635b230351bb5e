from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ImageDelivery(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_DELIVERY_UNSPECIFIED: _ClassVar[ImageDelivery]
    IMAGE_DELIVERY_INLINE: _ClassVar[ImageDelivery]
    IMAGE_DELIVERY_URL: _ClassVar[ImageDelivery]
    IMAGE_DELIVERY_NONE: _ClassVar[ImageDelivery]
IMAGE_DELIVERY_UNSPECIFIED: ImageDelivery
IMAGE_DELIVERY_INLINE: ImageDelivery
IMAGE_DELIVERY_URL: ImageDelivery
IMAGE_DELIVERY_NONE: ImageDelivery

class Image(_message.Message):
    __slots__ = ("png", "url", "size_bytes", "content_type", "url_expire_time_ms")
    PNG_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    URL_EXPIRE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    url: str
    size_bytes: int
    content_type: str
    url_expire_time_ms: int
    def __init__(self, png: _Optional[bytes] = ..., url: _Optional[str] = ..., size_bytes: _Optional[int] = ..., content_type: _Optional[str] = ..., url_expire_time_ms: _Optional[int] = ...) -> None: ...

class ImageChunk(_message.Message):
    __slots__ = ("data", "offset", "total_bytes", "content_type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_bytes: int
    content_type: str
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., content_type: _Optional[str] = ...) -> None: ...
