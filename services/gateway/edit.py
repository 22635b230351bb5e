"""EditImage: an instruction edit of a generation (or of an uploaded image) is itself a generation.

The instruction becomes an ``EditPlan`` (models/edit.py: attribute, new value,
region); the source image and its mask go to storage; a RenderRequest row with
``conditioning["edit"]`` goes through the same render queue, idempotency,
replay and wait as GeneratePersonalized, and the worker repaints the mask by
masked image-to-image. The result is new Generation rows (method ``edit``), so
feedback and history apply to them like to any other image.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass

import numpy as np
from pigment.models.edit import (
    EditConfig,
    EditNotUnderstood,
    EditPlan,
    edit_prompt,
    parse_instruction,
    region_mask,
)
from pigment.services.common.errors import FailedPrecondition, InvalidInput, NotFound, check_range
from pigment.services.common.ids import check_id, check_key, show
from pigment.services.common.limits import check_image, check_text
from pigment.services.gateway.core import (
    Decision,
    GatewayCore,
    GenerateResult,
    derive_seed,
    or_default,
)
from pigment.services.store.db import transaction
from pigment.services.store.tables import Generation, RenderRequest, User
from PIL import Image

EDIT_METHOD = "edit"
MAX_INSTRUCTION_CHARS = 300


@dataclass
class EditParams:
    request_id: str
    user_id: str
    instruction: str
    generation_id: str = ""  # the source: one of generation_id or image
    image: bytes = b""
    mask: bytes = b""  # optional: white = may change; else the plan's region, found in the image
    seed: int | None = None  # None: derived from request_id
    num_inference_steps: int | None = None  # None: the preset's default


@dataclass
class EditResult:
    result: GenerateResult
    plan: EditPlan
    source_generation_id: str
    prompt: str


class EditCore:
    def __init__(
        self,
        gateway: GatewayCore,
        vocab,
        config: EditConfig,
        image_limits,
        schema=None,
        describe=None,
    ):
        self.gateway = gateway
        self.vocab = vocab  # the preset's KeywordVocabulary
        self.config = config
        self.image_limits = image_limits
        self.schema = schema  # the preset's prompt schema (preference.json "prompt_schema")
        self.describe = describe  # uint8 image -> its description (the preset's CLIP), or None

    def edit(self, p: EditParams, deadline: float | None = None, principal=None) -> EditResult:
        g = self.gateway
        check_key("request_id", p.request_id)
        check_id("user_id", p.user_id)
        check_text("instruction", p.instruction, MAX_INSTRUCTION_CHARS)
        if bool(p.generation_id) == bool(p.image):
            raise InvalidInput(
                "give exactly one source: generation_id (an image of yours) or image (PNG/JPEG bytes)"
            )
        if principal is not None:
            g.history.check_user(p.user_id, principal)
        try:
            plan = parse_instruction(p.instruction, self.vocab, self.config)
        except EditNotUnderstood as exc:
            raise FailedPrecondition(f"cannot edit: {exc}", reason="EDIT_NOT_UNDERSTOOD", field="instruction") from None
        steps = or_default(p.num_inference_steps, int(g.defaults["num_inference_steps"]))
        check_range("num_inference_steps", steps, 1, g.settings.max_steps)
        size = (int(g.defaults["height"]), int(g.defaults["width"]))
        source, description = self._source(p, size, principal)
        mask = self._mask(p.mask, source, plan, size)
        prompt = self._prompt(description, plan)
        phash = hashlib.sha256(
            json.dumps(
                [asdict(p) | {"image": _digest(p.image), "mask": _digest(p.mask)}, steps],
                sort_keys=True,
            ).encode()
        ).hexdigest()
        done, flags, timings = g.run_request(
            p.request_id, p.user_id, phash, 1,
            lambda: (self._row(p, phash, plan, prompt, source, mask, steps, size), {}),
            deadline, None, principal)
        result = g._result(done, flags)
        result.timings_ms = {**done.conditioning.get("timings_ms", {}), **timings}
        edit = done.conditioning["edit"]
        return EditResult(
            result,
            EditPlan(
                **{
                    k: edit[k]
                    for k in ("attribute", "value", "region", "strength", "repaint_whole")
                }
            ),
            edit.get("source_generation_id", ""),
            done.conditioning["segments"][0],
        )

    # -- the source ---------------------------------------------------------------
    def _source(self, p: EditParams, size: tuple[int, int], principal) -> tuple[np.ndarray, str]:
        """(uint8 HxWx3 at the preset's size, what the source was asked to show, "" if unknown)."""
        if p.image:
            image = _decode(check_image("image", p.image, self.image_limits), size, "RGB")
            return image, self.describe(image) if self.describe is not None else ""
        check_id("generation_id", p.generation_id)
        with transaction(self.gateway.sessions) as s:
            gen = s.get(Generation, p.generation_id)
            owner = s.get(User, gen.user_id) if gen is not None else None
            req = s.get(RenderRequest, gen.request_id) if gen is not None else None
            visible = (
                gen is not None
                and gen.user_id == p.user_id
                and (principal is None or (owner is not None and principal.sees(owner.tenant)))
            )
            if not visible or not gen.storage_uri:
                raise NotFound(f"generation {show(p.generation_id)} not found for user {show(p.user_id)}",
                               reason="GENERATION_NOT_FOUND")
            uri, cond = gen.storage_uri, dict(req.conditioning or {}) if req is not None else {}
        description = cond.get("written_prompt") or ", ".join(cond.get("segments", []))
        return _decode(self.gateway.storage.get(uri), size, "RGB"), description

    def _mask(
        self, data: bytes, source: np.ndarray, plan: EditPlan, size: tuple[int, int]
    ) -> np.ndarray:
        if data:
            mask = _decode(check_image("mask", data, self.image_limits), size, "L") > 127
            if not mask.any():
                raise InvalidInput("mask is all black: white marks what may change")
            return mask
        mask = region_mask(source, plan.region, self.config)
        if not mask.any():
            raise FailedPrecondition(
                f"found no {plan.region} to edit in the source image: send a mask"
            )
        return mask

    def _prompt(self, description: str, plan: EditPlan) -> str:
        return edit_prompt(description, plan, self.vocab, self.schema)

    def _row(
        self,
        p: EditParams,
        phash: str,
        plan: EditPlan,
        prompt: str,
        source: np.ndarray,
        mask: np.ndarray,
        steps: int,
        size: tuple[int, int],
    ) -> RenderRequest:
        g = self.gateway
        storage = g.storage
        source_uri = storage.put(f"edits/{p.request_id}/source.png", _png(source))
        mask_uri = storage.put(f"edits/{p.request_id}/mask.png", _png(mask.astype(np.uint8) * 255))
        params = {
            "request_id": p.request_id,
            "user_id": p.user_id,
            "prompt": p.instruction,
            "num_images": 1,
            "seed": or_default(p.seed, derive_seed(p.request_id)),
            "num_inference_steps": steps,
            "guidance_scale": float(g.defaults["guidance_scale"]),
            "height": size[0],
            "width": size[1],
            "method": EDIT_METHOD,
        }
        decision = Decision(
            policy="none", retrieve=False, generate=True, reason="an edit always renders"
        )
        conditioning = {
            "segments": [prompt],
            "segment_weights": [1.0],
            "keywords": [],
            "flags": [],
            "soft_tokens": None,
            "soft_weight": 0.0,
            "history_item_ids": [],
            "decision": asdict(decision),
            "written_prompt": prompt,
            "edit": {
                **plan.as_dict(),
                "instruction": p.instruction,
                "source_uri": source_uri,
                "mask_uri": mask_uri,
                "source_generation_id": p.generation_id,
            },
            "timings_ms": {},
            "queued_at": time.time(),
        }
        return RenderRequest(
            request_id=p.request_id,
            user_id=p.user_id,
            params_hash=phash,
            params=params,
            conditioning=conditioning,
            model_version=g.model_version(),
            adapters=g.adapters() if g.adapters else None,
            status="queued",
            total_steps=steps,
        )


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if data else ""


def _decode(png: bytes, size: tuple[int, int], mode: str) -> np.ndarray:
    """Decoded and, when it differs, resized to the preset's (height, width): the UNet renders that size."""
    img = Image.open(io.BytesIO(png)).convert(mode)
    if img.size != (size[1], size[0]):
        img = img.resize(
            (size[1], size[0]),
            Image.Resampling.NEAREST if mode == "L" else Image.Resampling.LANCZOS,
        )
    return np.asarray(img)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
