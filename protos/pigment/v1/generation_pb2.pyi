from pigment.v1 import media_pb2 as _media_pb2
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
    METHOD_LLMGA: _ClassVar[Method]
    METHOD_EDIT: _ClassVar[Method]

class RetrievalMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETRIEVAL_MODE_UNSPECIFIED: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_AUTO: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_GENERATE_ONLY: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_RETRIEVE_ONLY: _ClassVar[RetrievalMode]
    RETRIEVAL_MODE_BOTH: _ClassVar[RetrievalMode]

class ResultSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESULT_SOURCE_UNSPECIFIED: _ClassVar[ResultSource]
    RESULT_SOURCE_GENERATED: _ClassVar[ResultSource]
    RESULT_SOURCE_RETRIEVED: _ClassVar[ResultSource]

class DecisionPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_POLICY_UNSPECIFIED: _ClassVar[DecisionPolicy]
    DECISION_POLICY_NONE: _ClassVar[DecisionPolicy]
    DECISION_POLICY_FORCED: _ClassVar[DecisionPolicy]
    DECISION_POLICY_THRESHOLD: _ClassVar[DecisionPolicy]
    DECISION_POLICY_LEARNED: _ClassVar[DecisionPolicy]

class ProgressStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROGRESS_STATUS_UNSPECIFIED: _ClassVar[ProgressStatus]
    PROGRESS_STATUS_QUEUED: _ClassVar[ProgressStatus]
    PROGRESS_STATUS_RUNNING: _ClassVar[ProgressStatus]
    PROGRESS_STATUS_DONE: _ClassVar[ProgressStatus]
    PROGRESS_STATUS_FAILED: _ClassVar[ProgressStatus]

class FeedbackKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEEDBACK_KIND_UNSPECIFIED: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_LIKE: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_DISLIKE: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_RATING: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_PICK: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_CLICK: _ClassVar[FeedbackKind]

class UserResultStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USER_RESULT_STATUS_UNSPECIFIED: _ClassVar[UserResultStatus]
    USER_RESULT_STATUS_PENDING: _ClassVar[UserResultStatus]
    USER_RESULT_STATUS_RUNNING: _ClassVar[UserResultStatus]
    USER_RESULT_STATUS_DONE: _ClassVar[UserResultStatus]
    USER_RESULT_STATUS_FAILED: _ClassVar[UserResultStatus]
    USER_RESULT_STATUS_CANCELLED: _ClassVar[UserResultStatus]

class JobStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATUS_UNSPECIFIED: _ClassVar[JobStatus]
    JOB_STATUS_QUEUED: _ClassVar[JobStatus]
    JOB_STATUS_RUNNING: _ClassVar[JobStatus]
    JOB_STATUS_DONE: _ClassVar[JobStatus]
    JOB_STATUS_CANCELLED: _ClassVar[JobStatus]
    JOB_STATUS_FAILED: _ClassVar[JobStatus]
METHOD_UNSPECIFIED: Method
METHOD_PMG: Method
METHOD_PMG_KEYWORDS: Method
METHOD_PMG_SOFT: Method
METHOD_NON_PERSONALIZED: Method
METHOD_LLMGA: Method
METHOD_EDIT: Method
RETRIEVAL_MODE_UNSPECIFIED: RetrievalMode
RETRIEVAL_MODE_AUTO: RetrievalMode
RETRIEVAL_MODE_GENERATE_ONLY: RetrievalMode
RETRIEVAL_MODE_RETRIEVE_ONLY: RetrievalMode
RETRIEVAL_MODE_BOTH: RetrievalMode
RESULT_SOURCE_UNSPECIFIED: ResultSource
RESULT_SOURCE_GENERATED: ResultSource
RESULT_SOURCE_RETRIEVED: ResultSource
DECISION_POLICY_UNSPECIFIED: DecisionPolicy
DECISION_POLICY_NONE: DecisionPolicy
DECISION_POLICY_FORCED: DecisionPolicy
DECISION_POLICY_THRESHOLD: DecisionPolicy
DECISION_POLICY_LEARNED: DecisionPolicy
PROGRESS_STATUS_UNSPECIFIED: ProgressStatus
PROGRESS_STATUS_QUEUED: ProgressStatus
PROGRESS_STATUS_RUNNING: ProgressStatus
PROGRESS_STATUS_DONE: ProgressStatus
PROGRESS_STATUS_FAILED: ProgressStatus
FEEDBACK_KIND_UNSPECIFIED: FeedbackKind
FEEDBACK_KIND_LIKE: FeedbackKind
FEEDBACK_KIND_DISLIKE: FeedbackKind
FEEDBACK_KIND_RATING: FeedbackKind
FEEDBACK_KIND_PICK: FeedbackKind
FEEDBACK_KIND_CLICK: FeedbackKind
USER_RESULT_STATUS_UNSPECIFIED: UserResultStatus
USER_RESULT_STATUS_PENDING: UserResultStatus
USER_RESULT_STATUS_RUNNING: UserResultStatus
USER_RESULT_STATUS_DONE: UserResultStatus
USER_RESULT_STATUS_FAILED: UserResultStatus
USER_RESULT_STATUS_CANCELLED: UserResultStatus
JOB_STATUS_UNSPECIFIED: JobStatus
JOB_STATUS_QUEUED: JobStatus
JOB_STATUS_RUNNING: JobStatus
JOB_STATUS_DONE: JobStatus
JOB_STATUS_CANCELLED: JobStatus
JOB_STATUS_FAILED: JobStatus

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "user_id", "prompt", "num_images", "seed", "num_inference_steps", "guidance_scale", "height", "width", "method", "keyword_weight", "soft_weight", "retrieval", "include_seen", "references", "candidate", "verbatim_prompt")
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
    KEYWORD_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SOFT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    VERBATIM_PROMPT_FIELD_NUMBER: _ClassVar[int]
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
    keyword_weight: float
    soft_weight: float
    retrieval: RetrievalMode
    include_seen: bool
    references: _containers.RepeatedCompositeFieldContainer[ReferenceImage]
    candidate: int
    verbatim_prompt: bool
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[str] = ..., prompt: _Optional[str] = ..., num_images: _Optional[int] = ..., seed: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., method: _Optional[_Union[Method, str]] = ..., keyword_weight: _Optional[float] = ..., soft_weight: _Optional[float] = ..., retrieval: _Optional[_Union[RetrievalMode, str]] = ..., include_seen: _Optional[bool] = ..., references: _Optional[_Iterable[_Union[ReferenceImage, _Mapping]]] = ..., candidate: _Optional[int] = ..., verbatim_prompt: _Optional[bool] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("png", "generation_id", "seed", "storage_uri", "source", "item_id", "score", "url")
    PNG_FIELD_NUMBER: _ClassVar[int]
    GENERATION_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STORAGE_URI_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    generation_id: str
    seed: int
    storage_uri: str
    source: ResultSource
    item_id: str
    score: float
    url: str
    def __init__(self, png: _Optional[bytes] = ..., generation_id: _Optional[str] = ..., seed: _Optional[int] = ..., storage_uri: _Optional[str] = ..., source: _Optional[_Union[ResultSource, str]] = ..., item_id: _Optional[str] = ..., score: _Optional[float] = ..., url: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("policy", "retrieved", "score", "reason")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    RETRIEVED_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    policy: DecisionPolicy
    retrieved: bool
    score: float
    reason: str
    def __init__(self, policy: _Optional[_Union[DecisionPolicy, str]] = ..., retrieved: _Optional[bool] = ..., score: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class ConditioningReport(_message.Message):
    __slots__ = ("segments", "segment_weights", "soft_tokens", "soft_weight", "reference_images", "written_prompt")
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SOFT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_PROMPT_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedScalarFieldContainer[str]
    segment_weights: _containers.RepeatedScalarFieldContainer[float]
    soft_tokens: int
    soft_weight: float
    reference_images: int
    written_prompt: str
    def __init__(self, segments: _Optional[_Iterable[str]] = ..., segment_weights: _Optional[_Iterable[float]] = ..., soft_tokens: _Optional[int] = ..., soft_weight: _Optional[float] = ..., reference_images: _Optional[int] = ..., written_prompt: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "images", "keywords", "model_version", "flags", "timings_ms", "method", "decision", "conditioning", "feedback_used", "explored_attribute")
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
    DECISION_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_USED_FIELD_NUMBER: _ClassVar[int]
    EXPLORED_ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[GeneratedImage]
    keywords: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    flags: _containers.RepeatedScalarFieldContainer[str]
    timings_ms: _containers.ScalarMap[str, float]
    method: Method
    decision: Decision
    conditioning: ConditioningReport
    feedback_used: _containers.RepeatedScalarFieldContainer[str]
    explored_attribute: str
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[GeneratedImage, _Mapping]]] = ..., keywords: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ..., flags: _Optional[_Iterable[str]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., method: _Optional[_Union[Method, str]] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ..., conditioning: _Optional[_Union[ConditioningReport, _Mapping]] = ..., feedback_used: _Optional[_Iterable[str]] = ..., explored_attribute: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total_steps", "status")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    status: ProgressStatus
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., status: _Optional[_Union[ProgressStatus, str]] = ...) -> None: ...

class GeneratePersonalizedStreamRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: GenerateRequest
    def __init__(self, request: _Optional[_Union[GenerateRequest, _Mapping]] = ...) -> None: ...

class GeneratePersonalizedStreamResponse(_message.Message):
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

class SubmitBatchRequest(_message.Message):
    __slots__ = ("job_id", "user_ids", "segment", "prompt", "images_per_user", "num_inference_steps", "method", "chunk_size")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PER_USER_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    segment: str
    prompt: str
    images_per_user: int
    num_inference_steps: int
    method: Method
    chunk_size: int
    def __init__(self, job_id: _Optional[str] = ..., user_ids: _Optional[_Iterable[str]] = ..., segment: _Optional[str] = ..., prompt: _Optional[str] = ..., images_per_user: _Optional[int] = ..., num_inference_steps: _Optional[int] = ..., method: _Optional[_Union[Method, str]] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class SubmitBatchResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id", "page_size", "page_token")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    page_size: int
    page_token: str
    def __init__(self, job_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class JobUserResult(_message.Message):
    __slots__ = ("user_id", "status", "generation_ids", "error")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_IDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    status: UserResultStatus
    generation_ids: _containers.RepeatedScalarFieldContainer[str]
    error: str
    def __init__(self, user_id: _Optional[str] = ..., status: _Optional[_Union[UserResultStatus, str]] = ..., generation_ids: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "status", "total", "done", "failed", "results", "next_page_token")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    status: JobStatus
    total: int
    done: int
    failed: int
    results: _containers.RepeatedCompositeFieldContainer[JobUserResult]
    next_page_token: str
    def __init__(self, job_id: _Optional[str] = ..., status: _Optional[_Union[JobStatus, str]] = ..., total: _Optional[int] = ..., done: _Optional[int] = ..., failed: _Optional[int] = ..., results: _Optional[_Iterable[_Union[JobUserResult, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Generation(_message.Message):
    __slots__ = ("generation_id", "request_id", "user_id", "source", "item_id", "prompt", "keywords", "flags", "create_time_ms", "seed", "model_version", "method", "image", "written_prompt", "edit", "source_generation_id", "references")
    GENERATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    KEYWORDS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_PROMPT_FIELD_NUMBER: _ClassVar[int]
    EDIT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_GENERATION_ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    generation_id: str
    request_id: str
    user_id: str
    source: ResultSource
    item_id: str
    prompt: str
    keywords: _containers.RepeatedScalarFieldContainer[str]
    flags: _containers.RepeatedScalarFieldContainer[str]
    create_time_ms: int
    seed: int
    model_version: str
    method: Method
    image: _media_pb2.Image
    written_prompt: str
    edit: EditPlan
    source_generation_id: str
    references: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, generation_id: _Optional[str] = ..., request_id: _Optional[str] = ..., user_id: _Optional[str] = ..., source: _Optional[_Union[ResultSource, str]] = ..., item_id: _Optional[str] = ..., prompt: _Optional[str] = ..., keywords: _Optional[_Iterable[str]] = ..., flags: _Optional[_Iterable[str]] = ..., create_time_ms: _Optional[int] = ..., seed: _Optional[int] = ..., model_version: _Optional[str] = ..., method: _Optional[_Union[Method, str]] = ..., image: _Optional[_Union[_media_pb2.Image, _Mapping]] = ..., written_prompt: _Optional[str] = ..., edit: _Optional[_Union[EditPlan, _Mapping]] = ..., source_generation_id: _Optional[str] = ..., references: _Optional[_Iterable[str]] = ...) -> None: ...

class GetGenerationRequest(_message.Message):
    __slots__ = ("generation_id", "delivery")
    GENERATION_ID_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    generation_id: str
    delivery: _media_pb2.ImageDelivery
    def __init__(self, generation_id: _Optional[str] = ..., delivery: _Optional[_Union[_media_pb2.ImageDelivery, str]] = ...) -> None: ...

class GetGenerationResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: Generation
    def __init__(self, generation: _Optional[_Union[Generation, _Mapping]] = ...) -> None: ...

class StreamGenerationImageRequest(_message.Message):
    __slots__ = ("generation_id", "chunk_bytes")
    GENERATION_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    generation_id: str
    chunk_bytes: int
    def __init__(self, generation_id: _Optional[str] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class StreamGenerationImageResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: _media_pb2.ImageChunk
    def __init__(self, chunk: _Optional[_Union[_media_pb2.ImageChunk, _Mapping]] = ...) -> None: ...

class ListGenerationsRequest(_message.Message):
    __slots__ = ("user_id", "page_size", "page_token", "delivery")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    page_size: int
    page_token: str
    delivery: _media_pb2.ImageDelivery
    def __init__(self, user_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., delivery: _Optional[_Union[_media_pb2.ImageDelivery, str]] = ...) -> None: ...

class ListGenerationsResponse(_message.Message):
    __slots__ = ("generations", "next_page_token")
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    generations: _containers.RepeatedCompositeFieldContainer[Generation]
    next_page_token: str
    def __init__(self, generations: _Optional[_Iterable[_Union[Generation, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ReferenceImage(_message.Message):
    __slots__ = ("item_id", "image")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    image: bytes
    def __init__(self, item_id: _Optional[str] = ..., image: _Optional[bytes] = ...) -> None: ...

class EditImageRequest(_message.Message):
    __slots__ = ("request_id", "user_id", "generation_id", "image", "instruction", "mask", "seed", "num_inference_steps")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    user_id: str
    generation_id: str
    image: bytes
    instruction: str
    mask: bytes
    seed: int
    num_inference_steps: int
    def __init__(self, request_id: _Optional[str] = ..., user_id: _Optional[str] = ..., generation_id: _Optional[str] = ..., image: _Optional[bytes] = ..., instruction: _Optional[str] = ..., mask: _Optional[bytes] = ..., seed: _Optional[int] = ..., num_inference_steps: _Optional[int] = ...) -> None: ...

class EditPlan(_message.Message):
    __slots__ = ("attribute", "value", "region", "strength")
    ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    attribute: str
    value: str
    region: str
    strength: float
    def __init__(self, attribute: _Optional[str] = ..., value: _Optional[str] = ..., region: _Optional[str] = ..., strength: _Optional[float] = ...) -> None: ...

class EditImageResponse(_message.Message):
    __slots__ = ("result", "edit", "source_generation_id")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    EDIT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_GENERATION_ID_FIELD_NUMBER: _ClassVar[int]
    result: GenerateResponse
    edit: EditPlan
    source_generation_id: str
    def __init__(self, result: _Optional[_Union[GenerateResponse, _Mapping]] = ..., edit: _Optional[_Union[EditPlan, _Mapping]] = ..., source_generation_id: _Optional[str] = ...) -> None: ...
