"""GenerationService: GeneratePersonalized (unary + progress stream), LogFeedback, batch jobs."""

from __future__ import annotations

import time

from pigment.services.common.auth import current_principal
from pigment.services.common.errors import InvalidInput
from pigment.services.common.ids import show
from pigment.services.gateway.core import GatewayCore, GenerateParams, GenerateResult, ProgressEvent
from pigment.services.gateway.edit import EditParams
from pigment.services.gateway.jobs import BatchParams, JobView
from pigment.v1 import generation_pb2 as pb
from pigment.v1 import generation_pb2_grpc

METHOD_NAMES = {
    pb.METHOD_UNSPECIFIED: "", pb.METHOD_PMG: "pmg", pb.METHOD_PMG_KEYWORDS: "pmg_keywords",
    pb.METHOD_PMG_SOFT: "pmg_soft", pb.METHOD_NON_PERSONALIZED: "non_personalized", pb.METHOD_LLMGA: "llmga",
}
RETRIEVAL_NAMES = {
    pb.RETRIEVAL_MODE_UNSPECIFIED: "", pb.RETRIEVAL_MODE_AUTO: "auto", pb.RETRIEVAL_MODE_GENERATE_ONLY: "generate_only",
    pb.RETRIEVAL_MODE_RETRIEVE_ONLY: "retrieve_only", pb.RETRIEVAL_MODE_BOTH: "both",
}
SOURCES = {"generated": pb.RESULT_SOURCE_GENERATED, "retrieved": pb.RESULT_SOURCE_RETRIEVED}
FEEDBACK_KINDS = {
    pb.FEEDBACK_KIND_LIKE: "like", pb.FEEDBACK_KIND_DISLIKE: "dislike", pb.FEEDBACK_KIND_RATING: "rating",
    pb.FEEDBACK_KIND_PICK: "pick", pb.FEEDBACK_KIND_CLICK: "click",
}


def params_from_pb(r: pb.GenerateRequest) -> GenerateParams:
    return GenerateParams(
        request_id=r.request_id, user_id=r.user_id, prompt=r.prompt, num_images=r.num_images, seed=r.seed,
        num_inference_steps=r.num_inference_steps, guidance_scale=r.guidance_scale, height=r.height,
        width=r.width, method=METHOD_NAMES.get(r.method, "?"), keyword_weight=r.keyword_weight,
        soft_weight=r.soft_weight, retrieval=RETRIEVAL_NAMES.get(r.retrieval, "?"), include_seen=r.include_seen,
        verbatim_prompt=r.verbatim_prompt,
    )


def result_to_pb(res: GenerateResult) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=res.request_id, keywords=res.keywords, model_version=res.model_version, flags=res.flags,
        timings_ms=res.timings_ms, method=res.method,
        images=[pb.GeneratedImage(png=i.png, generation_id=i.generation_id, seed=i.seed, storage_uri=i.storage_uri,
                                  source=SOURCES[i.source], item_id=i.item_id, score=i.score) for i in res.images],
        decision=pb.Decision(policy=res.decision.get("policy", ""), retrieved=res.decision.get("retrieve", False),
                             score=res.decision.get("score", 0.0), reason=res.decision.get("reason", "")),
        conditioning=pb.ConditioningReport(**res.conditioning) if res.conditioning else None,
    )


def deadline_of(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, core: GatewayCore, feedback=None, jobs=None, edit=None):
        self.core = core
        self.feedback = feedback
        self.jobs = jobs
        self.edit = edit

    def GeneratePersonalized(self, request, context):
        return result_to_pb(self.core.generate(params_from_pb(request), deadline_of(context),
                                              principal=current_principal()))

    def GeneratePersonalizedStream(self, request, context):
        for event in self.core.progress_stream(params_from_pb(request), deadline_of(context),
                                                principal=current_principal()):
            if isinstance(event, ProgressEvent):
                yield pb.GenerateEvent(progress=pb.Progress(step=event.step, total_steps=event.total_steps,
                                                            status=event.status))
            else:
                yield pb.GenerateEvent(result=result_to_pb(event))

    def LogFeedback(self, request, context):
        duplicate = self.feedback.log(
            feedback_id=request.feedback_id, user_id=request.user_id, generation_id=request.generation_id,
            kind=FEEDBACK_KINDS.get(request.kind, ""), value=request.value,
            other_generation_ids=list(request.other_generation_ids), principal=current_principal())
        return pb.LogFeedbackResponse(duplicate=duplicate)

    def EditImage(self, request, context):
        out = self.edit.edit(EditParams(
            request_id=request.request_id, user_id=request.user_id, instruction=request.instruction,
            generation_id=request.generation_id, image=request.image, mask=request.mask, seed=request.seed,
            num_inference_steps=request.num_inference_steps), deadline_of(context), principal=current_principal())
        plan = out.plan
        return pb.EditImageResponse(result=result_to_pb(out.result), source_generation_id=out.source_generation_id,
                                    edit=pb.EditPlan(attribute=plan.attribute, value=plan.value, region=plan.region,
                                                     strength=plan.strength))

    def SubmitBatch(self, request, context):
        return pb.SubmitBatchResponse(job=job_to_pb(self.jobs.submit(BatchParams(
            job_id=request.job_id, user_ids=list(request.user_ids), segment=request.segment, prompt=request.prompt,
            images_per_user=request.images_per_user, num_inference_steps=request.num_inference_steps,
            method=METHOD_NAMES.get(request.method, "?"), chunk_size=request.chunk_size), JOB_PAGE_SIZE,
            principal=current_principal())))

    def GetJob(self, request, context):
        offset, limit = job_page(request.page_size, request.page_token)
        return job_to_pb(self.jobs.get(request.job_id, offset, limit, principal=current_principal()))

    def CancelJob(self, request, context):
        return job_to_pb(self.jobs.cancel(request.job_id, JOB_PAGE_SIZE, principal=current_principal()))


JOB_PAGE_SIZE, JOB_MAX_PAGE_SIZE = 1000, 10000  # a page stays far below gRPC's 4 MB message limit


def job_page(page_size: int, page_token: str) -> tuple[int, int]:
    """(offset, limit) from GetJob's paging fields."""
    if not 0 <= page_size <= JOB_MAX_PAGE_SIZE:
        raise InvalidInput(f"page_size={page_size} is out of range: 0 (server default {JOB_PAGE_SIZE}) "
                           f"to {JOB_MAX_PAGE_SIZE}")
    # isascii: str.isdigit() also accepts other scripts' digits; the length cap keeps OFFSET within SQL's range
    if page_token and not (page_token.isascii() and page_token.isdigit() and len(page_token) <= 9):
        raise InvalidInput(f"page_token={show(page_token)} is not one this server issued: pass a previous "
                           "GetJob's next_page_token, or \"\" for the first page")
    return int(page_token or 0), page_size or JOB_PAGE_SIZE


def job_to_pb(job: JobView) -> pb.Job:
    return pb.Job(job_id=job.job_id, status=job.status, total=job.total, done=job.done, failed=job.failed,
                  results=[pb.JobUserResult(user_id=r.user_id, status=r.status, generation_ids=r.generation_ids,
                                            error=r.error) for r in job.results],
                  next_page_token="" if job.next_offset is None else str(job.next_offset))
