"""GenerationService: GeneratePersonalized (unary + progress stream), LogFeedback, batch jobs."""

from __future__ import annotations

import time

from pigment.services.common.auth import current_principal
from pigment.services.common.errors import InvalidInput
from pigment.services.common.ids import show
from pigment.services.common.media import DELIVERIES, chunks_to_pb, image_to_pb
from pigment.services.gateway.core import GatewayCore, GenerateParams, GenerateResult, ProgressEvent
from pigment.services.gateway.edit import EditParams
from pigment.services.gateway.generations import GenerationView
from pigment.services.gateway.jobs import BatchParams, JobView
from pigment.services.gateway.references import ReferenceInput
from pigment.v1 import generation_pb2 as pb
from pigment.v1 import generation_pb2_grpc, media_pb2

METHOD_NAMES = {
    pb.METHOD_UNSPECIFIED: "", pb.METHOD_PMG: "pmg", pb.METHOD_PMG_KEYWORDS: "pmg_keywords",
    pb.METHOD_PMG_SOFT: "pmg_soft", pb.METHOD_NON_PERSONALIZED: "non_personalized", pb.METHOD_LLMGA: "llmga",
    pb.METHOD_EDIT: "edit",
}
RETRIEVAL_NAMES = {
    pb.RETRIEVAL_MODE_UNSPECIFIED: "", pb.RETRIEVAL_MODE_AUTO: "auto", pb.RETRIEVAL_MODE_GENERATE_ONLY: "generate_only",
    pb.RETRIEVAL_MODE_RETRIEVE_ONLY: "retrieve_only", pb.RETRIEVAL_MODE_BOTH: "both",
}
METHOD_ENUMS = {name: enum for enum, name in METHOD_NAMES.items() if name}
SOURCES = {"generated": pb.RESULT_SOURCE_GENERATED, "retrieved": pb.RESULT_SOURCE_RETRIEVED}
POLICIES = {"none": pb.DECISION_POLICY_NONE, "forced": pb.DECISION_POLICY_FORCED,
            "threshold": pb.DECISION_POLICY_THRESHOLD, "learned": pb.DECISION_POLICY_LEARNED}
PROGRESS = {"queued": pb.PROGRESS_STATUS_QUEUED, "running": pb.PROGRESS_STATUS_RUNNING,
            "done": pb.PROGRESS_STATUS_DONE, "failed": pb.PROGRESS_STATUS_FAILED}
JOB_STATUSES = {"queued": pb.JOB_STATUS_QUEUED, "running": pb.JOB_STATUS_RUNNING, "done": pb.JOB_STATUS_DONE,
                "cancelled": pb.JOB_STATUS_CANCELLED, "failed": pb.JOB_STATUS_FAILED}
USER_STATUSES = {"pending": pb.USER_RESULT_STATUS_PENDING, "running": pb.USER_RESULT_STATUS_RUNNING,
                 "done": pb.USER_RESULT_STATUS_DONE, "failed": pb.USER_RESULT_STATUS_FAILED,
                 "cancelled": pb.USER_RESULT_STATUS_CANCELLED}
FEEDBACK_KINDS = {
    pb.FEEDBACK_KIND_LIKE: "like", pb.FEEDBACK_KIND_DISLIKE: "dislike", pb.FEEDBACK_KIND_RATING: "rating",
    pb.FEEDBACK_KIND_PICK: "pick", pb.FEEDBACK_KIND_CLICK: "click",
}


def given(msg, name: str):
    """An ``optional`` field's value, or None when unset (the server's default applies)."""
    return getattr(msg, name) if msg.HasField(name) else None


def params_from_pb(r: pb.GenerateRequest) -> GenerateParams:
    return GenerateParams(
        request_id=r.request_id, user_id=r.user_id, prompt=r.prompt, num_images=given(r, "num_images"),
        seed=given(r, "seed"), num_inference_steps=given(r, "num_inference_steps"),
        guidance_scale=given(r, "guidance_scale"), height=given(r, "height"), width=given(r, "width"),
        method=METHOD_NAMES.get(r.method, str(r.method)), keyword_weight=given(r, "keyword_weight"),
        soft_weight=given(r, "soft_weight"), retrieval=RETRIEVAL_NAMES.get(r.retrieval, str(r.retrieval)),
        include_seen=r.include_seen, references=[ReferenceInput(x.item_id, x.image) for x in r.references],
        candidate=r.candidate, verbatim_prompt=r.verbatim_prompt,
    )


def result_to_pb(res: GenerateResult) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=res.request_id, keywords=res.keywords, model_version=res.model_version, flags=res.flags,
        timings_ms={k.removesuffix("_ms"): v for k, v in res.timings_ms.items()},
        method=METHOD_ENUMS.get(res.method, pb.METHOD_UNSPECIFIED),
        images=[pb.GeneratedImage(png=i.png, generation_id=i.generation_id, seed=i.seed, storage_uri=i.storage_uri,
                                  source=SOURCES[i.source], item_id=i.item_id, score=i.score, url=i.url)
                for i in res.images],
        decision=pb.Decision(policy=POLICIES.get(res.decision.get("policy", ""), pb.DECISION_POLICY_UNSPECIFIED),
                             retrieved=res.decision.get("retrieve", False),
                             score=res.decision.get("score", 0.0), reason=res.decision.get("reason", "")),
        conditioning=pb.ConditioningReport(**res.conditioning) if res.conditioning else None,
        feedback_used=res.feedback_used, explored_attribute=res.explored_attribute,
    )


def generation_to_pb(v: GenerationView) -> pb.Generation:
    return pb.Generation(
        generation_id=v.generation_id, request_id=v.request_id, user_id=v.user_id, source=SOURCES[v.source],
        item_id=v.item_id, prompt=v.prompt, keywords=v.keywords, flags=v.flags, create_time_ms=v.create_time_ms,
        seed=v.seed, model_version=v.model_version, method=METHOD_ENUMS.get(v.method, pb.METHOD_UNSPECIFIED),
        image=image_to_pb(v.image), written_prompt=v.written_prompt,
        edit=pb.EditPlan(**v.edit) if v.edit is not None else None,
        source_generation_id=v.source_generation_id, references=v.references)


def deadline_of(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, core: GatewayCore, feedback=None, jobs=None, generations=None, edit=None):
        self.core = core
        self.feedback = feedback
        self.jobs = jobs
        self.generations = generations  # GenerationsCore: lookups, and URLs for images past the inline budget
        self.edit = edit  # EditCore (services/gateway/edit.py): EditImage

    def _deliver(self, result: GenerateResult) -> pb.GenerateResponse:
        if self.generations is not None:
            self.generations.deliver(result.images)
        return result_to_pb(result)

    def GeneratePersonalized(self, request, context):
        return self._deliver(self.core.generate(params_from_pb(request), deadline_of(context),
                                                principal=current_principal()))

    def GeneratePersonalizedStream(self, request, context):
        for event in self.core.progress_stream(params_from_pb(request.request), deadline_of(context),
                                                principal=current_principal()):
            if isinstance(event, ProgressEvent):
                yield pb.GeneratePersonalizedStreamResponse(progress=pb.Progress(
                    step=event.step, total_steps=event.total_steps, status=PROGRESS[event.status]))
            else:
                yield pb.GeneratePersonalizedStreamResponse(result=self._deliver(event))

    def LogFeedback(self, request, context):
        duplicate = self.feedback.log(
            feedback_id=request.feedback_id, user_id=request.user_id, generation_id=request.generation_id,
            kind=FEEDBACK_KINDS.get(request.kind, ""), value=request.value,
            other_generation_ids=list(request.other_generation_ids), principal=current_principal())
        return pb.LogFeedbackResponse(duplicate=duplicate)

    def EditImage(self, request, context):
        out = self.edit.edit(EditParams(
            request_id=request.request_id, user_id=request.user_id, instruction=request.instruction,
            generation_id=request.generation_id, image=request.image, mask=request.mask, seed=given(request, "seed"),
            num_inference_steps=given(request, "num_inference_steps")), deadline_of(context),
            principal=current_principal())
        plan = out.plan
        return pb.EditImageResponse(result=self._deliver(out.result), source_generation_id=out.source_generation_id,
                                    edit=pb.EditPlan(attribute=plan.attribute, value=plan.value, region=plan.region,
                                                     strength=plan.strength))

    def SubmitBatch(self, request, context):
        return pb.SubmitBatchResponse(job=job_to_pb(self.jobs.submit(BatchParams(
            job_id=request.job_id, user_ids=list(request.user_ids), segment=request.segment, prompt=request.prompt,
            images_per_user=given(request, "images_per_user"),
            num_inference_steps=given(request, "num_inference_steps"),
            method=METHOD_NAMES.get(request.method, str(request.method)), chunk_size=given(request, "chunk_size")),
            JOB_PAGE_SIZE,
            principal=current_principal())))

    def GetJob(self, request, context):
        offset, limit = job_page(request.page_size, request.page_token)
        return pb.GetJobResponse(job=job_to_pb(self.jobs.get(request.job_id, offset, limit,
                                                              principal=current_principal())))

    def CancelJob(self, request, context):
        return pb.CancelJobResponse(job=job_to_pb(self.jobs.cancel(request.job_id, JOB_PAGE_SIZE,
                                                                    principal=current_principal())))

    def GetGeneration(self, request, context):
        view = self.generations.get(request.generation_id, current_principal(),
                                    DELIVERIES.get(request.delivery, "?"))
        return pb.GetGenerationResponse(generation=generation_to_pb(view))

    def StreamGenerationImage(self, request, context):
        data = self.generations.image(request.generation_id, current_principal())
        for chunk in chunks_to_pb(data, given(request, "chunk_bytes") or 0):
            yield pb.StreamGenerationImageResponse(chunk=chunk)

    def ListGenerations(self, request, context):
        delivery = "none" if request.delivery == media_pb2.IMAGE_DELIVERY_UNSPECIFIED else \
            DELIVERIES.get(request.delivery, "?")
        views, token = self.generations.list(request.user_id, current_principal(), given(request, "page_size") or 0,
                                             request.page_token, delivery)
        return pb.ListGenerationsResponse(generations=[generation_to_pb(v) for v in views], next_page_token=token)


JOB_PAGE_SIZE, JOB_MAX_PAGE_SIZE = 1000, 10000  # a page stays far below gRPC's 4 MB message limit


def job_page(page_size: int, page_token: str) -> tuple[int, int]:
    """(offset, limit) from GetJob's paging fields."""
    if not 0 <= page_size <= JOB_MAX_PAGE_SIZE:
        allowed = f"allowed 0 (server default {JOB_PAGE_SIZE}) to {JOB_MAX_PAGE_SIZE}"
        raise InvalidInput(f"page_size={page_size} is out of range: {allowed}", reason="OUT_OF_RANGE",
                           field="page_size", allowed=allowed)
    # isascii: str.isdigit() also accepts other scripts' digits; the length cap keeps OFFSET within SQL's range
    if page_token and not (page_token.isascii() and page_token.isdigit() and len(page_token) <= 9):
        raise InvalidInput(f"page_token={show(page_token)} is not one this server issued: pass a previous "
                           "GetJob's next_page_token, or \"\" for the first page", reason="INVALID_PAGE_TOKEN",
                           field="page_token", allowed="a previous next_page_token or empty")
    return int(page_token or 0), page_size or JOB_PAGE_SIZE


def job_to_pb(job: JobView) -> pb.Job:
    return pb.Job(job_id=job.job_id, status=JOB_STATUSES[job.status], total=job.total, done=job.done,
                  failed=job.failed,
                  results=[pb.JobUserResult(user_id=r.user_id, status=USER_STATUSES[r.status],
                                            generation_ids=r.generation_ids,
                                            error=r.error) for r in job.results],
                  next_page_token="" if job.next_offset is None else str(job.next_offset))
