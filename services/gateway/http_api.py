"""The HTTP face's ``/v1`` routes: each parses its RPC's request message, calls the gRPC servicer's method with
the caller's principal (so validation, authorization and errors are the gRPC ones), and answers its response
message in protobuf JSON. Image bytes are served here too, for signed URLs and bearer callers."""

from __future__ import annotations

import json
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.rpc import status_pb2
from pigment.services.common.auth import Principal, reset_principal, set_principal
from pigment.services.common.errors import InvalidInput
from pigment.services.common.ids import show
from pigment.services.gateway.http_io import authenticate, read_json, status_body, to_json
from pigment.services.gateway.openapi_pb import add_schemas, ref
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import history_pb2 as hpb
from pigment.v1 import media_pb2
from starlette.concurrency import run_in_threadpool

router = APIRouter(prefix="/v1")
Caller = Annotated[Principal, Depends(authenticate)]
SCHEMAS: list = [status_pb2.Status.DESCRIPTOR]
IMAGE_CACHE = "private, max-age=300"


def doc(request_cls=None, response_cls=None, ok: int = 200) -> dict:
    """OpenAPI for a route whose body and answer are protobuf messages (the schemas come from the .proto)."""
    extra: dict = {
        "responses": {
            "default": {
                "description": "an error: google.rpc.Status",
                "content": {"application/json": {"schema": ref(status_pb2.Status.DESCRIPTOR)}},
            }
        }
    }
    if request_cls is not None:
        SCHEMAS.append(request_cls.DESCRIPTOR)
        extra["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref(request_cls.DESCRIPTOR)}},
        }
    if response_cls is not None:
        SCHEMAS.append(response_cls.DESCRIPTOR)
        extra["responses"][str(ok)] = {
            "description": response_cls.DESCRIPTOR.name,
            "content": {"application/json": {"schema": ref(response_cls.DESCRIPTOR)}},
        }
    return extra


def openapi(app) -> dict:
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for descriptor in SCHEMAS:
            add_schemas(descriptor, schemas)
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}, {}]
        app.openapi_schema = schema
    return app.openapi_schema


class _Context:
    """The part of a gRPC context the servicers read: the time left before the deadline."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def time_remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def _ctx(request: Request):
    return request.app.state.ctx


def _deadline(request: Request) -> float:
    # a second inside the request's timeout, so the core's DeadlineExceeded (with its advice) answers first
    return time.monotonic() + max(0.5, _ctx(request).settings.http_request_timeout_s - 1.0)


def _as(principal: Principal, fn, *args):
    token = set_principal(principal)
    try:
        return fn(*args)
    finally:
        reset_principal(token)


async def call(request: Request, method, message, principal: Principal):
    """Run a servicer method in a worker thread as ``principal``; returns its response message."""
    return await run_in_threadpool(_as, principal, method, message, _Context(_deadline(request)))


def enum_value(enum, name: str, field: str) -> int:
    try:
        return enum.Value(name)
    except ValueError:
        raise InvalidInput(
            f"{field}={show(name, 40)} is unknown: allowed {', '.join(enum.keys())}"
        ) from None


def delivery(name: str) -> int:
    return enum_value(media_pb2.ImageDelivery, name, "delivery")


# -- generation --------------------------------------------------------------------------------------------
@router.post(
    "/generate",
    tags=["generation"],
    openapi_extra=doc(gpb.GenerateRequest, gpb.GenerateResponse),
    summary="GeneratePersonalized: blocks until the images are ready",
)
async def generate(request: Request, principal: Caller):
    message = await read_json(request, gpb.GenerateRequest())
    return to_json(
        await call(request, _ctx(request).generation.GeneratePersonalized, message, principal)
    )


def _sse(event: str, payload: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"


SSE_DOC = doc(gpb.GenerateRequest, gpb.GeneratePersonalizedStreamResponse)
SSE_DOC["responses"]["200"] = {
    "description": "text/event-stream: `progress` events (Progress), then one `result` (GenerateResponse); "
    "an `error` event (google.rpc.Status) if it fails after the stream started",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}


@router.post(
    "/generate/stream",
    tags=["generation"],
    openapi_extra=SSE_DOC,
    summary="GeneratePersonalizedStream as Server-Sent Events",
)
async def generate_stream(request: Request, principal: Caller):
    message = await read_json(request, gpb.GenerateRequest())
    events = _ctx(request).generation.GeneratePersonalizedStream(
        gpb.GeneratePersonalizedStreamRequest(request=message), _Context(_deadline(request))
    )
    # the first event is pulled before answering, so a refused request gets its HTTP status, not a 200 stream
    first = await run_in_threadpool(_as, principal, next, events, None)

    async def stream():
        event = first
        try:
            while event is not None:
                kind = event.WhichOneof("event")
                yield _sse(kind, to_json(getattr(event, kind)))
                event = await run_in_threadpool(_as, principal, next, events, None)
        except Exception as exc:  # noqa: BLE001 - after the 200: the failure travels as an event
            yield _sse("error", status_body(exc))

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


@router.post(
    "/edit",
    tags=["generation"],
    openapi_extra=doc(gpb.EditImageRequest, gpb.EditImageResponse),
    summary="EditImage: an instruction edit of a generation (or of image bytes); blocks until it is ready",
)
async def edit(request: Request, principal: Caller):
    message = await read_json(request, gpb.EditImageRequest())
    return to_json(await call(request, _ctx(request).generation.EditImage, message, principal))


@router.get(
    "/generations/{generation_id}",
    tags=["generation"],
    openapi_extra=doc(None, gpb.GetGenerationResponse),
    summary="GetGeneration (the image as a signed URL unless delivery says otherwise)",
)
async def get_generation(
    request: Request,
    principal: Caller,
    generation_id: str,
    delivery_name: str = Query("IMAGE_DELIVERY_URL", alias="delivery"),
):
    message = gpb.GetGenerationRequest(
        generation_id=generation_id, delivery=delivery(delivery_name)
    )
    return to_json(await call(request, _ctx(request).generation.GetGeneration, message, principal))


async def _image(request: Request, kind: str, ident: str, expires: str, sig: str) -> Response:
    core = _ctx(request).generations
    if expires or sig:  # a signed URL: the signature is the grant
        data = await run_in_threadpool(core.signed_image, kind, ident, expires, sig)
    else:
        principal = await run_in_threadpool(authenticate, request)
        fetch = core.image if kind == "generations" else core.item_image
        data = await run_in_threadpool(fetch, ident, principal)
    return Response(data, media_type="image/png", headers={"Cache-Control": IMAGE_CACHE})


IMAGE_DOC = {"responses": {"200": {"description": "the PNG", "content": {"image/png": {}}}}}


@router.get(
    "/generations/{generation_id}/image",
    tags=["generation"],
    openapi_extra=IMAGE_DOC,
    response_class=Response,
    summary="A generation's PNG: a signed URL, or with the bearer key",
)
async def generation_image(request: Request, generation_id: str, expires: str = "", sig: str = ""):
    return await _image(request, "generations", generation_id, expires, sig)


@router.get(
    "/items/{item_id}/image",
    tags=["history"],
    openapi_extra=IMAGE_DOC,
    response_class=Response,
    summary="A catalog item's PNG: a signed URL, or with the bearer key",
)
async def item_image(request: Request, item_id: str, expires: str = "", sig: str = ""):
    return await _image(request, "items", item_id, expires, sig)


@router.post(
    "/feedback",
    tags=["generation"],
    openapi_extra=doc(gpb.LogFeedbackRequest, gpb.LogFeedbackResponse, 201),
    status_code=201,
    summary="LogFeedback: 201 when stored, 200 when a replay of a stored one",
)
async def feedback(request: Request, principal: Caller):
    message = await read_json(request, gpb.LogFeedbackRequest())
    out = await call(request, _ctx(request).generation.LogFeedback, message, principal)
    return JSONResponse(to_json(out), 200 if out.duplicate else 201)


# -- users and history -----------------------------------------------------------------------------------------
@router.get(
    "/users",
    tags=["history"],
    summary="User ids the caller may see, newest first (the gallery's picker)",
    openapi_extra={
        "responses": {
            "200": {
                "description": '{"userIds": [...]}',
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "userIds": {"type": "array", "items": {"type": "string"}}
                            },
                        }
                    }
                },
            }
        }
    },
)
async def users(request: Request, principal: Caller, limit: int = Query(200, ge=1, le=1000)):
    return {
        "userIds": await run_in_threadpool(_ctx(request).generations.list_users, principal, limit)
    }


@router.get(
    "/users/{user_id}/generations",
    tags=["generation"],
    openapi_extra=doc(None, gpb.ListGenerationsResponse),
    summary="ListGenerations (images as signed URLs)",
)
async def list_generations(
    request: Request,
    principal: Caller,
    user_id: str,
    page_size: int = Query(0, alias="pageSize"),
    page_token: str = Query("", alias="pageToken"),
    delivery_name: str = Query("IMAGE_DELIVERY_URL", alias="delivery"),
):
    message = gpb.ListGenerationsRequest(
        user_id=user_id,
        page_size=page_size,
        page_token=page_token,
        delivery=delivery(delivery_name),
    )
    return to_json(
        await call(request, _ctx(request).generation.ListGenerations, message, principal)
    )


@router.get(
    "/users/{user_id}/history",
    tags=["history"],
    openapi_extra=doc(None, hpb.GetHistoryResponse),
    summary="GetHistory (item images as signed URLs in imageUrl)",
)
async def history(
    request: Request,
    principal: Caller,
    user_id: str,
    page_size: int | None = Query(None, alias="pageSize"),
    page_token: str = Query("", alias="pageToken"),
):
    message = hpb.GetHistoryRequest(user_id=user_id, page_token=page_token)
    if page_size is not None:
        message.page_size = page_size
    return to_json(await call(request, _ctx(request).history.GetHistory, message, principal))


# -- batch jobs ----------------------------------------------------------------------------------------------------
@router.post(
    "/jobs",
    tags=["jobs"],
    openapi_extra=doc(gpb.SubmitBatchRequest, gpb.SubmitBatchResponse),
    summary="SubmitBatch",
)
async def submit_job(request: Request, principal: Caller):
    message = await read_json(request, gpb.SubmitBatchRequest())
    return to_json(await call(request, _ctx(request).generation.SubmitBatch, message, principal))


@router.get(
    "/jobs/{job_id}", tags=["jobs"], openapi_extra=doc(None, gpb.GetJobResponse), summary="GetJob"
)
async def get_job(
    request: Request,
    principal: Caller,
    job_id: str,
    page_size: int = Query(0, alias="pageSize"),
    page_token: str = Query("", alias="pageToken"),
):
    message = gpb.GetJobRequest(job_id=job_id, page_size=page_size, page_token=page_token)
    return to_json(await call(request, _ctx(request).generation.GetJob, message, principal))


@router.post(
    "/jobs/{job_id}/cancel",
    tags=["jobs"],
    openapi_extra=doc(None, gpb.CancelJobResponse),
    summary="CancelJob",
)
async def cancel_job(request: Request, principal: Caller, job_id: str):
    message = gpb.CancelJobRequest(job_id=job_id)
    return to_json(await call(request, _ctx(request).generation.CancelJob, message, principal))
