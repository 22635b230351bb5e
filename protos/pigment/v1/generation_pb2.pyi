from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    METHOD_PMG: _ClassVar[Method]
    METHOD_PMG_KEYWORDS: _ClassVar[Method]
    METHOD_PMG_SOFT: _ClassVar[Method]
    METHOD_NON_PERSONALIZED: _ClassVar[Method]

class FeedbackKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEEDBACK_KIND_UNSPECIFIED: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_LIKE: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_DISLIKE: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_RATING: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_PICK: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_CLICK: _ClassVar[FeedbackKind]
METHOD_UNSPECIFIED: Method
METHOD_PMG: Method
METHOD_PMG_KEYWORDS: Method
METHOD_PMG_SOFT: Method
METHOD_NON_PERSONALIZED: Method
FEEDBACK_KIND_UNSPECIFIED: FeedbackKind
FEEDBACK_KIND_LIKE: FeedbackKind
FEEDBACK_KIND_DISLIKE: FeedbackKind
FEEDBACK_KIND_RATING: FeedbackKind
FEEDBACK_KIND_PICK: FeedbackKind
FEEDBACK_KIND_CLICK: FeedbackKind

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "user_id", "prompt", "num_images", "seed", "num_inference_steps", "guidance_scale", "height", "width", "method")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: str
    prompt: str
    num_images: int
    seed: int
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    method: Method
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[str] = ..., prompt: _Optional[str] = ..., num_images: _Optional[int] = ..., seed: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., method: _Optional[_Union[Method, str]] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("png", "generation_id", "seed", "storage_uri")
    PNG_FIELD_NUMBER: _ClassVar[int]
    GENERATION_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STORAGE_URI_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    generation_id: str
    seed: int
    storage_uri: str
    def __init__(self, png: _Optional[bytes] = ..., generation_id: _Optional[str] = ..., seed: _Optional[int] = ..., storage_uri: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "images", "keywords", "model_version", "flags", "timings_ms", "method")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    KEYWORDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[GeneratedImage]
    keywords: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    flags: _containers.RepeatedScalarFieldContainer[str]
    timings_ms: _containers.ScalarMap[str, float]
    method: str
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[GeneratedImage, _Mapping]]] = ..., keywords: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ..., flags: _Optional[_Iterable[str]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., method: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total_steps", "status")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    status: str
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., status: _Optional[str] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: GenerateResponse
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class LogFeedbackRequest(_message.Message):
    __slots__ = ("feedback_id", "user_id", "generation_id", "kind", "value", "other_generation_ids")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    OTHER_GENERATION_IDS_FIELD_NUMBER: _ClassVar[int]
    feedback_id: str
    user_id: str
    generation_id: str
    kind: FeedbackKind
    value: float
    other_generation_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, feedback_id: _Optional[str] = ..., user_id: _Optional[str] = ..., generation_id: _Optional[str] = ..., kind: _Optional[_Union[FeedbackKind, str]] = ..., value: _Optional[float] = ..., other_generation_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class LogFeedbackResponse(_message.Message):
    __slots__ = ("duplicate",)
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    def __init__(self, duplicate: _Optional[bool] = ...) -> None: ...
