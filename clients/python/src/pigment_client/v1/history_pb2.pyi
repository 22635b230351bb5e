from pigment_client.v1 import media_pb2 as _media_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Item(_message.Message):
    __slots__ = ("item_id", "caption", "image_png", "image_uri", "tenant", "attributes", "image_url")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PNG_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URI_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URL_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    caption: str
    image_png: bytes
    image_uri: str
    tenant: str
    attributes: _containers.ScalarMap[str, str]
    image_url: str
    def __init__(self, item_id: _Optional[str] = ..., caption: _Optional[str] = ..., image_png: _Optional[bytes] = ..., image_uri: _Optional[str] = ..., tenant: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ..., image_url: _Optional[str] = ...) -> None: ...

class Interaction(_message.Message):
    __slots__ = ("item_id", "kind", "value", "timestamp_ms")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    kind: str
    value: float
    timestamp_ms: int
    def __init__(self, item_id: _Optional[str] = ..., kind: _Optional[str] = ..., value: _Optional[float] = ..., timestamp_ms: _Optional[int] = ...) -> None: ...

class LogInteractionsRequest(_message.Message):
    __slots__ = ("user_id", "interactions", "create_user", "tenant", "batch_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    CREATE_USER_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    interactions: _containers.RepeatedCompositeFieldContainer[Interaction]
    create_user: bool
    tenant: str
    batch_id: str
    def __init__(self, user_id: _Optional[str] = ..., interactions: _Optional[_Iterable[_Union[Interaction, _Mapping]]] = ..., create_user: _Optional[bool] = ..., tenant: _Optional[str] = ..., batch_id: _Optional[str] = ...) -> None: ...

class LogInteractionsResponse(_message.Message):
    __slots__ = ("logged", "duplicate")
    LOGGED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    logged: int
    duplicate: bool
    def __init__(self, logged: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class GetHistoryRequest(_message.Message):
    __slots__ = ("user_id", "page_size", "page_token")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    page_size: int
    page_token: str
    def __init__(self, user_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class HistoryEntry(_message.Message):
    __slots__ = ("item", "interaction")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    INTERACTION_FIELD_NUMBER: _ClassVar[int]
    item: Item
    interaction: Interaction
    def __init__(self, item: _Optional[_Union[Item, _Mapping]] = ..., interaction: _Optional[_Union[Interaction, _Mapping]] = ...) -> None: ...

class GetHistoryResponse(_message.Message):
    __slots__ = ("entries", "next_page_token", "total_size")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[HistoryEntry]
    next_page_token: str
    total_size: int
    def __init__(self, entries: _Optional[_Iterable[_Union[HistoryEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class UpsertItemsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ...) -> None: ...

class UpsertItemsResponse(_message.Message):
    __slots__ = ("upserted", "embedding_model")
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    embedding_model: str
    def __init__(self, upserted: _Optional[int] = ..., embedding_model: _Optional[str] = ...) -> None: ...

class SearchItemsRequest(_message.Message):
    __slots__ = ("text", "image_png", "vector", "k", "user_id", "include_seen")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PNG_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    text: str
    image_png: bytes
    vector: EmbeddingVector
    k: int
    user_id: str
    include_seen: bool
    def __init__(self, text: _Optional[str] = ..., image_png: _Optional[bytes] = ..., vector: _Optional[_Union[EmbeddingVector, _Mapping]] = ..., k: _Optional[int] = ..., user_id: _Optional[str] = ..., include_seen: _Optional[bool] = ...) -> None: ...

class EmbeddingVector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item", "score")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    item: Item
    score: float
    def __init__(self, item: _Optional[_Union[Item, _Mapping]] = ..., score: _Optional[float] = ...) -> None: ...

class SearchItemsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ...) -> None: ...

class DeleteUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class DeleteUserResponse(_message.Message):
    __slots__ = ("interactions_deleted", "items_deleted")
    INTERACTIONS_DELETED_FIELD_NUMBER: _ClassVar[int]
    ITEMS_DELETED_FIELD_NUMBER: _ClassVar[int]
    interactions_deleted: int
    items_deleted: int
    def __init__(self, interactions_deleted: _Optional[int] = ..., items_deleted: _Optional[int] = ...) -> None: ...

class GetItemImageRequest(_message.Message):
    __slots__ = ("item_id", "delivery")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    delivery: _media_pb2.ImageDelivery
    def __init__(self, item_id: _Optional[str] = ..., delivery: _Optional[_Union[_media_pb2.ImageDelivery, str]] = ...) -> None: ...

class GetItemImageResponse(_message.Message):
    __slots__ = ("item_id", "image")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    image: _media_pb2.Image
    def __init__(self, item_id: _Optional[str] = ..., image: _Optional[_Union[_media_pb2.Image, _Mapping]] = ...) -> None: ...

class StreamItemImageRequest(_message.Message):
    __slots__ = ("item_id", "chunk_bytes")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    chunk_bytes: int
    def __init__(self, item_id: _Optional[str] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class StreamItemImageResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: _media_pb2.ImageChunk
    def __init__(self, chunk: _Optional[_Union[_media_pb2.ImageChunk, _Mapping]] = ...) -> None: ...
