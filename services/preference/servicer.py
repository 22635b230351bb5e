"""PreferenceService: history captions -> keywords and soft tokens."""

from __future__ import annotations

from pigment.services.common.auth import current_principal
from pigment.services.common.errors import InvalidInput
from pigment.services.common.ids import show
from pigment.services.common.limits import MAX_QUERY_CHARS, check_text
from pigment.v1 import preference_pb2 as pb
from pigment.v1 import preference_pb2_grpc

MAX_CAPTIONS = 1000
METHODS = ("pmg", "pmg_keywords", "pmg_soft", "non_personalized", "llmga")  # the gateway's methods


class PreferenceServicer(preference_pb2_grpc.PreferenceServiceServicer):
    def __init__(self, core, history):
        self.core = core
        self.history = history

    def EncodePreferences(self, request, context):
        captions = list(request.history_captions)
        if len(captions) > MAX_CAPTIONS:
            raise InvalidInput(f"{len(captions)} history_captions: allowed at most {MAX_CAPTIONS}")
        for n, caption in enumerate(captions):
            check_text(f"history_captions[{n}]", caption, self.history.limits.max_caption_chars)
        check_text("target", request.target, MAX_QUERY_CHARS)
        method = request.method or "pmg"
        if method not in METHODS:
            raise InvalidInput(f"method={show(method)} is unknown: allowed {', '.join(METHODS)}")
        if captions:
            pref = self.core.encode(captions, target=request.target, method=method)
        elif not request.user_id:
            raise InvalidInput("set history_captions or user_id")
        else:  # the stored history: each interaction weighed by its kind and value (preference core)
            history = self.history.get_history(request.user_id, principal=current_principal())
            pref = self.core.personalize(history, target=request.target, method=method)
        soft = None
        if pref.soft_tokens is not None:
            soft = pb.SoftTokens(shape=list(pref.soft_tokens.shape), float16=pref.soft_tokens.astype("<f2").tobytes())
        return pb.EncodePreferencesResponse(keywords=pref.keywords, soft_tokens=soft, cache_key=pref.cache_key,
                                            model_version=pref.model_version, flags=pref.flags,
                                            written_prompt=pref.prompt or "")
