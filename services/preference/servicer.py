"""PreferenceService: history captions -> keywords and soft tokens."""

from __future__ import annotations

from pigment.services.common.auth import current_principal
from pigment.services.common.errors import InvalidInput
from pigment.v1 import preference_pb2 as pb
from pigment.v1 import preference_pb2_grpc


class PreferenceServicer(preference_pb2_grpc.PreferenceServiceServicer):
    def __init__(self, core, history):
        self.core = core
        self.history = history

    def EncodePreferences(self, request, context):
        captions = list(request.history_captions)
        if not captions:
            if not request.user_id:
                raise InvalidInput("set history_captions or user_id")
            captions = [e.item.caption for e in self.history.get_history(request.user_id, principal=current_principal())]
        pref = self.core.encode(captions, target=request.target, method=request.method or "pmg")
        soft = None
        if pref.soft_tokens is not None:
            soft = pb.SoftTokens(shape=list(pref.soft_tokens.shape), float16=pref.soft_tokens.astype("<f2").tobytes())
        return pb.EncodePreferencesResponse(keywords=pref.keywords, soft_tokens=soft, cache_key=pref.cache_key,
                                            model_version=pref.model_version, flags=pref.flags)
