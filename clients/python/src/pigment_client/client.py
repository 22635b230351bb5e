"""``PigmentClient``: one channel, the three services' stubs, and typed helpers for the common calls.

Retries (tenacity): UNAVAILABLE always (the server restarting, a broker hiccup), and RESOURCE_EXHAUSTED when it
carries a ``google.rpc.RetryInfo`` (a tenant's rate limit: the server says when to come back). The wait is
the server's RetryInfo delay when it sends one, else exponential backoff with jitter. Retrying is safe
because the helpers fix their idempotency key (request_id, feedback_id) before the first attempt, so a retry
is a replay that the server answers with the same result, never a second render or a second feedback row.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import grpc
from grpc_status import rpc_status
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
)
from tenacity.wait import wait_random_exponential

from pigment_client.v1 import generation_pb2 as gpb
from pigment_client.v1 import (
    generation_pb2_grpc,
    history_pb2,
    history_pb2_grpc,
    media_pb2,
    preference_pb2_grpc,
)

FEEDBACK_KINDS = {
    "like": gpb.FEEDBACK_KIND_LIKE,
    "dislike": gpb.FEEDBACK_KIND_DISLIKE,
    "rating": gpb.FEEDBACK_KIND_RATING,
    "pick": gpb.FEEDBACK_KIND_PICK,
    "click": gpb.FEEDBACK_KIND_CLICK,
}
DELIVERIES = {
    "auto": media_pb2.IMAGE_DELIVERY_UNSPECIFIED,
    "inline": media_pb2.IMAGE_DELIVERY_INLINE,
    "url": media_pb2.IMAGE_DELIVERY_URL,
    "none": media_pb2.IMAGE_DELIVERY_NONE,
}


def retry_delay_of(error: grpc.RpcError) -> float | None:
    """The seconds a google.rpc.RetryInfo detail of ``error`` asks to wait, or None."""
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


def _retryable(exc: BaseException) -> bool:
    if not isinstance(exc, grpc.RpcError) or not isinstance(exc, grpc.Call):
        return False
    code = exc.code()
    return code == grpc.StatusCode.UNAVAILABLE or (
        code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_delay_of(exc) is not None
    )


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # calls in all, the first included
    max_wait_s: float = 30.0  # one wait at most (a longer RetryInfo is cut to this)
    total_s: float = 120.0  # give up after this long in all
    backoff_s: float = 0.2  # the first backoff without RetryInfo; doubles, with jitter

    def retrying(self) -> Retrying:
        backoff = wait_random_exponential(multiplier=self.backoff_s, max=self.max_wait_s)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            told = retry_delay_of(exc) if isinstance(exc, grpc.RpcError) else None
            return min(self.max_wait_s, told) if told is not None else backoff(state)

        return Retrying(
            retry=retry_if_exception(_retryable),
            wait=wait,
            reraise=True,
            stop=stop_after_attempt(self.attempts) | stop_after_delay(self.total_s),
        )


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class PigmentClient:
    """``target`` "host:port"; ``api_key`` sent as ``authorization: Bearer``; ``root_certificates`` (PEM bytes)
    or ``tls=True`` for TLS. The raw stubs are ``.generation``, ``.history`` and ``.preference``."""

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        options: Iterable[tuple[str, object]] = (),
    ):
        options = [("grpc.max_receive_message_length", 64 << 20), *options]
        if tls or root_certificates:
            creds = grpc.ssl_channel_credentials(root_certificates)
            if api_key:
                creds = grpc.composite_channel_credentials(
                    creds, grpc.access_token_call_credentials(api_key)
                )
            self.channel = grpc.secure_channel(target, creds, options=options)
            self._metadata: tuple = ()
        else:  # plaintext: the key travels as metadata (loopback, or TLS terminated in front)
            self.channel = grpc.insecure_channel(target, options=options)
            self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.generation = generation_pb2_grpc.GenerationServiceStub(self.channel)
        self.history = history_pb2_grpc.HistoryServiceStub(self.channel)
        self.preference = preference_pb2_grpc.PreferenceServiceStub(self.channel)

    def __enter__(self) -> PigmentClient:  # noqa: PYI034 - not subclassed
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def call(self, method, request, timeout_s: float | None = None):
        """Any unary RPC with the key, a deadline and the retry policy, e.g.
        ``client.call(client.generation.GetJob, GetJobRequest(job_id=...))``."""
        for attempt in self.retry.retrying():
            with attempt:
                return method(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        raise AssertionError("unreachable: tenacity reraises the last error")

    # -- generation -------------------------------------------------------------------------------------
    def generate(
        self,
        user_id: str,
        prompt: str = "",
        *,
        request_id: str | None = None,
        num_images: int | None = None,
        num_inference_steps: int | None = None,
        seed: int | None = None,
        method: int = gpb.METHOD_UNSPECIFIED,
        retrieval: int = gpb.RETRIEVAL_MODE_UNSPECIFIED,
        timeout_s: float | None = None,
    ) -> gpb.GenerateResponse:
        """GeneratePersonalized; ``request_id`` (default a new one) makes retries replays. None leaves a
        field unset, so the server's default applies."""
        request = _generate_request(user_id, prompt, request_id, num_images=num_images,
                                    num_inference_steps=num_inference_steps, seed=seed)
        request.method, request.retrieval = method, retrieval
        return self.call(self.generation.GeneratePersonalized, request, timeout_s)

    def generate_stream(
        self,
        user_id: str,
        prompt: str = "",
        *,
        request_id: str | None = None,
        num_images: int | None = None,
        num_inference_steps: int | None = None,
    ) -> Iterator[gpb.GeneratePersonalizedStreamResponse]:
        """GeneratePersonalizedStream: progress events, then one with ``result`` (not retried midway)."""
        request = _generate_request(user_id, prompt, request_id, num_images=num_images,
                                    num_inference_steps=num_inference_steps)
        return self.generation.GeneratePersonalizedStream(
            gpb.GeneratePersonalizedStreamRequest(request=request),
            timeout=self.timeout_s,
            metadata=self._metadata,
        )

    def get_generation(self, generation_id: str, delivery: str = "auto") -> gpb.Generation:
        """``delivery``: auto | inline | url | none (see media.proto ImageDelivery)."""
        request = gpb.GetGenerationRequest(
            generation_id=generation_id, delivery=DELIVERIES[delivery]
        )
        return self.call(self.generation.GetGeneration, request).generation

    def download_image(self, generation_id: str, chunk_bytes: int | None = None) -> bytes:
        """A generation's PNG through StreamGenerationImage (any size, under every message limit)."""
        for attempt in self.retry.retrying():
            with attempt:
                stream = self.generation.StreamGenerationImage(
                    gpb.StreamGenerationImageRequest(
                        generation_id=generation_id, **_given(chunk_bytes=chunk_bytes)
                    ),
                    timeout=self.timeout_s,
                    metadata=self._metadata,
                )
                return b"".join(event.chunk.data for event in stream)
        raise AssertionError("unreachable")

    def list_generations(
        self, user_id: str, page_size: int | None = None, delivery: str = "none"
    ) -> Iterator[gpb.Generation]:
        """Every generation of a user, newest first, page by page."""
        token = ""
        while True:
            page = self.call(
                self.generation.ListGenerations,
                gpb.ListGenerationsRequest(
                    user_id=user_id,
                    page_token=token,
                    delivery=DELIVERIES[delivery],
                    **_given(page_size=page_size),
                ),
            )
            yield from page.generations
            token = page.next_page_token
            if not token:
                return

    def log_feedback(
        self,
        user_id: str,
        generation_id: str,
        kind: str,
        *,
        value: float = 0.0,
        other_generation_ids: Iterable[str] = (),
        feedback_id: str | None = None,
    ) -> bool:
        """LogFeedback; ``kind`` like | dislike | rating | pick | click. True if it was a replay."""
        request = gpb.LogFeedbackRequest(
            feedback_id=feedback_id or _new_id("fb"),
            user_id=user_id,
            generation_id=generation_id,
            kind=FEEDBACK_KINDS[kind],
            value=value,
            other_generation_ids=list(other_generation_ids),
        )
        return self.call(self.generation.LogFeedback, request).duplicate

    # -- history ----------------------------------------------------------------------------------------
    def log_interactions(
        self,
        user_id: str,
        interactions: Iterable[tuple[str, str]],
        *,
        create_user: bool = True,
        tenant: str = "",
    ) -> int:
        """(item_id, kind) pairs, e.g. [("item-1", "like")]; returns how many were logged."""
        request = history_pb2.LogInteractionsRequest(
            user_id=user_id,
            create_user=create_user,
            tenant=tenant,
            interactions=[history_pb2.Interaction(item_id=i, kind=k) for i, k in interactions],
        )
        return self.call(self.history.LogInteractions, request).logged

    def upsert_items(self, items: Iterable[history_pb2.Item]) -> int:
        return self.call(
            self.history.UpsertItems, history_pb2.UpsertItemsRequest(items=list(items))
        ).upserted

    def get_history(self, user_id: str, page_size: int | None = None) -> Iterator[history_pb2.HistoryEntry]:
        """Every history entry of a user, newest page first, page by page."""
        token = ""
        while True:
            page = self.call(
                self.history.GetHistory,
                history_pb2.GetHistoryRequest(user_id=user_id, page_token=token, **_given(page_size=page_size)),
            )
            yield from page.entries
            token = page.next_page_token
            if not token:
                return

    def item_image(self, item_id: str) -> bytes:
        """A catalog item's PNG (streamed)."""
        stream = self.history.StreamItemImage(
            history_pb2.StreamItemImageRequest(item_id=item_id),
            timeout=self.timeout_s,
            metadata=self._metadata,
        )
        return b"".join(event.chunk.data for event in stream)


def _given(**fields):
    """Only the fields the caller set: an ``optional`` proto field left unset takes the server's default."""
    return {k: v for k, v in fields.items() if v is not None}


def _generate_request(user_id: str, prompt: str, request_id: str | None, **optional) -> gpb.GenerateRequest:
    return gpb.GenerateRequest(
        request_id=request_id or _new_id("req"), user_id=user_id, prompt=prompt, **_given(**optional)
    )
