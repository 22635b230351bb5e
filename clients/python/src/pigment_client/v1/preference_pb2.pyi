from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodePreferencesRequest(_message.Message):
    __slots__ = ("user_id", "history_captions", "method", "target")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_CAPTIONS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    history_captions: _containers.RepeatedScalarFieldContainer[str]
    method: str
    target: str
    def __init__(self, user_id: _Optional[str] = ..., history_captions: _Optional[_Iterable[str]] = ..., method: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class SoftTokens(_message.Message):
    __slots__ = ("shape", "float16")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FLOAT16_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    float16: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., float16: _Optional[bytes] = ...) -> None: ...

class EncodePreferencesResponse(_message.Message):
    __slots__ = ("keywords", "soft_tokens", "cache_key", "model_version", "flags", "cache_hit", "written_prompt")
    KEYWORDS_FIELD_NUMBER: _ClassVar[int]
    SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_PROMPT_FIELD_NUMBER: _ClassVar[int]
    keywords: _containers.RepeatedScalarFieldContainer[str]
    soft_tokens: SoftTokens
    cache_key: str
    model_version: str
    flags: _containers.RepeatedScalarFieldContainer[str]
    cache_hit: bool
    written_prompt: str
    def __init__(self, keywords: _Optional[_Iterable[str]] = ..., soft_tokens: _Optional[_Union[SoftTokens, _Mapping]] = ..., cache_key: _Optional[str] = ..., model_version: _Optional[str] = ..., flags: _Optional[_Iterable[str]] = ..., cache_hit: _Optional[bool] = ..., written_prompt: _Optional[str] = ...) -> None: ...
