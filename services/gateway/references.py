"""Reference images of a subject: checked and resolved to storage URIs before a request is admitted.

A request names each reference as one of the user's items (``item_id``: visible to
the user's tenant, i.e. its own or the public catalog's) or sends the image bytes
(checked by header and size before any decode, then stored content-addressed and tied to
the uploading user and its tenant: services/store/tables.py ReferenceImage, removed by DeleteUser).
The render worker reads the images from storage and turns them into conditioning
tokens with the preset's reference projector (models/reference.py); the gateway
only decides whether the request may carry them. Torch-free.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pigment.services.common.errors import FailedPrecondition, InvalidInput
from pigment.services.common.ids import check_id
from pigment.services.common.limits import InputLimits, check_image

MAX_REFERENCES = 4


@dataclass
class ReferenceInput:
    item_id: str = ""
    image: bytes = b""


class References:
    """``unavailable``: why the preset cannot use references (None when it can)."""

    def __init__(self, history, storage, limits: InputLimits | None = None, unavailable: str | None = None,
                 max_references: int = MAX_REFERENCES):
        self.history, self.storage = history, storage
        self.limits = limits or InputLimits()
        self.unavailable = unavailable
        self.max_references = max_references

    def canonical(self, refs: list, blobs: dict | None = None) -> list[str]:
        """Each reference as ``item:<id>`` or ``image:<sha256>``; the request hash covers these. The checked
        bytes go into ``blobs`` ({sha256: png}): ``uris`` stores them once the request is admitted, so a
        refused request leaves no file behind, and each stored file has an owner (DeleteUser)."""
        if not refs:
            return []
        if isinstance(refs[0], str):  # already canonical (a replay through resolve)
            return list(refs)
        if self.unavailable:
            raise FailedPrecondition(f"references cannot be used with this deployment: {self.unavailable}",
                                     reason="NO_REFERENCE_SUPPORT", field="references")
        if len(refs) > self.max_references:
            raise InvalidInput(f"references has {len(refs)} images: allowed 1..{self.max_references}",
                               reason="TOO_MANY", field="references", allowed=f"1..{self.max_references}")
        out = []
        for n, ref in enumerate(refs):
            if bool(ref.item_id) == bool(ref.image):
                raise InvalidInput(f"references[{n}] needs exactly one of item_id or image", reason="ONE_OF_REQUIRED",
                                   field=f"references[{n}]")
            if ref.item_id:
                out.append("item:" + check_id(f"references[{n}].item_id", ref.item_id))
                continue
            png = check_image(f"references[{n}].image", ref.image, self.limits)
            digest = hashlib.sha256(png).hexdigest()
            if blobs is not None:
                blobs[digest] = png
            out.append("image:" + digest)
        return out

    @staticmethod
    def key(digest: str) -> str:
        return f"references/{digest[:48]}.png"

    def uris(self, refs: list[str], user_id: str, blobs: dict | None = None) -> list[str]:
        """Storage URIs of the images. Bytes sent with this request (``blobs``) are tied to the user, then
        stored (content-addressed: a retry rewrites the same bytes); an image named only by its digest must be
        the user's tenant's, and an item the user's tenant cannot see is NotFound, both as if absent."""
        out = []
        for ref in refs:
            kind, _, value = ref.partition(":")
            if kind == "item":
                out.append(self.history.reference_image_uri(value, user_id))
            elif blobs and value in blobs:
                uri = self.storage.root.rstrip("/") + "/" + self.key(value)
                self.history.claim_reference(value, user_id, uri)
                out.append(self.storage.put(self.key(value), blobs[value]))
            else:
                out.append(self.history.reference_uri(value, user_id))
        return out
