"""Generations and catalog images by id, for callers anywhere: the lookup behind GetGeneration,
ListGenerations, GetItemImage and the HTTP face's image paths. No grpc, no torch.

Authorization is the tenant rule of the rest of pigment: a generation belongs to its user's tenant, an item to
its tenant (none: the public catalog), and what a principal may not see is NOT_FOUND, as if it did not exist.
Images travel inline up to ``inline_max_bytes`` per response and as signed URLs (services/gateway/urls.py)
above it; without an HTTP face to serve URLs they stay inline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC

from pigment.services.common.errors import FailedPrecondition, InvalidInput, NotFound
from pigment.services.common.ids import check_id, check_key, show
from pigment.services.common.media import ImageRef
from pigment.services.store.db import transaction
from pigment.services.store.tables import Generation, Item, RenderRequest, User
from sqlalchemy import select

DELIVERIES = ("auto", "inline", "url", "none")
PAGE_DEFAULT, PAGE_MAX = 20, 100


@dataclass
class GenerationView:
    generation_id: str
    request_id: str
    user_id: str
    source: str  # generated | retrieved
    item_id: str
    prompt: str
    keywords: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    create_time_ms: int = 0
    seed: int = 0
    model_version: str = ""
    method: str = ""
    image: ImageRef | None = None
    written_prompt: str = ""  # LLMGA's or an edit's prompt; "" when the request's prompt was used as given
    edit: dict | None = None  # an edit's plan (attribute, value, region, strength), else None
    source_generation_id: str = ""
    references: list[str] = field(default_factory=list)  # "item:<id>" | "image:<sha256>"


def _ms(dt) -> int:
    return int(dt.replace(tzinfo=dt.tzinfo or UTC).timestamp() * 1000) if dt else 0


def _view(g: Generation, req: RenderRequest | None) -> GenerationView:
    cond, params = (req.conditioning or {}, req.params or {}) if req is not None else ({}, {})
    return GenerationView(
        generation_id=g.generation_id,
        request_id=g.request_id,
        user_id=g.user_id,
        source="retrieved" if g.retrieved_item_id else "generated",
        item_id=g.retrieved_item_id or "",
        prompt=params.get("prompt", ""),
        keywords=list(cond.get("keywords", [])),
        flags=list(cond.get("flags", [])),
        create_time_ms=_ms(g.created_at),
        seed=g.seed,
        model_version=g.model_version,
        method=g.method,
        written_prompt=cond.get("written_prompt") or "",
        edit=({k: edit[k] for k in ("attribute", "value", "region", "strength") if k in edit}
              if (edit := cond.get("edit")) else None),
        source_generation_id=(cond.get("edit") or {}).get("source_generation_id", ""),
        references=list(params.get("references") or []),  # canonical: no storage URIs leave the server
    )


class GenerationsCore:
    def __init__(self, sessions, storage, signer=None, inline_max_bytes: int = 1 << 20):
        self.sessions = sessions
        self.storage = storage
        self.signer = signer  # UrlSigner or None (no HTTP face: no URLs)
        self.inline_max_bytes = inline_max_bytes

    # -- lookups -------------------------------------------------------------
    def _generation(self, s, generation_id: str, principal) -> Generation:
        check_key("generation_id", generation_id)
        g = s.get(Generation, generation_id)
        owner = s.get(User, g.user_id) if g is not None else None
        if g is None or (
            principal is not None and (owner is None or not principal.sees(owner.tenant))
        ):
            raise NotFound(f"generation {show(generation_id)} not found", reason="GENERATION_NOT_FOUND")
        return g

    def _item(self, s, item_id: str, principal) -> Item:
        check_id("item_id", item_id)
        item = s.scalar(select(Item).where(Item.item_id == item_id, Item.deleted.is_(False)))
        if item is None or (
            principal is not None and item.tenant is not None and not principal.sees(item.tenant)
        ):
            raise NotFound(f"item {show(item_id)} not found", reason="ITEM_NOT_FOUND")
        if not item.image_uri:
            raise NotFound(f"item {show(item_id)} has no image (upsert it with image_png)", reason="IMAGE_NOT_FOUND")
        return item

    def get(
        self, generation_id: str, principal, delivery: str = "auto", base_url: str | None = None
    ) -> GenerationView:
        with transaction(self.sessions) as s:
            g = self._generation(s, generation_id, principal)
            view, uri = _view(g, s.get(RenderRequest, g.request_id)), g.storage_uri
        view.image = self.image_ref("generations", generation_id, uri, delivery, base_url)
        return view

    def list(
        self,
        user_id: str,
        principal,
        page_size: int = 0,
        page_token: str = "",
        delivery: str = "none",
        base_url: str | None = None,
    ) -> tuple[list[GenerationView], str]:
        """A user's generations, newest first; (page, next_page_token or "")."""
        check_id("user_id", user_id)
        if not 0 <= page_size <= PAGE_MAX:
            allowed = f"allowed 1..{PAGE_MAX} (unset: {PAGE_DEFAULT})"
            raise InvalidInput(f"page_size={page_size} is out of range: {allowed}", reason="OUT_OF_RANGE",
                               field="page_size", allowed=allowed)
        if page_token and not (
            page_token.isascii() and page_token.isdigit() and len(page_token) <= 9
        ):
            raise InvalidInput(
                f"page_token={show(page_token)} is not one this server issued: pass a previous "
                'ListGenerations\' next_page_token, or "" for the first page',
                reason="INVALID_PAGE_TOKEN", field="page_token",
            )
        offset, limit = int(page_token or 0), page_size or PAGE_DEFAULT
        with transaction(self.sessions) as s:
            user = s.get(User, user_id)
            if user is None or (principal is not None and not principal.sees(user.tenant)):
                raise NotFound(f"user {show(user_id)} not found", reason="USER_NOT_FOUND")
            rows = s.execute(
                select(Generation, RenderRequest)
                .join(RenderRequest, RenderRequest.request_id == Generation.request_id)
                .where(Generation.user_id == user_id)
                .order_by(
                    Generation.created_at.desc(), Generation.request_id, Generation.image_index
                )
                .offset(offset)
                .limit(limit + 1)
            ).all()
        views = []
        for g, req in rows[:limit]:
            view = _view(g, req)
            view.image = self.image_ref(
                "generations", g.generation_id, g.storage_uri, delivery, base_url
            )
            views.append(view)
        return views, str(offset + limit) if len(rows) > limit else ""

    def list_users(self, principal, limit: int = 200) -> list[str]:
        """User ids the principal may see, most recent first (the gallery's user picker)."""
        with transaction(self.sessions) as s:
            q = select(User.user_id).order_by(User.created_at.desc(), User.user_id).limit(limit)
            if principal is not None and principal.tenant is not None:
                q = q.where(User.tenant == principal.tenant)
            return list(s.scalars(q))

    # -- images --------------------------------------------------------------
    def image(self, generation_id: str, principal) -> bytes:
        with transaction(self.sessions) as s:
            uri = self._generation(s, generation_id, principal).storage_uri
        return self._read(uri, f"generation {generation_id!r}")

    def item_image(self, item_id: str, principal) -> bytes:
        with transaction(self.sessions) as s:
            uri = self._item(s, item_id, principal).image_uri
        return self._read(uri, f"item {item_id!r}")

    def item_ref(
        self, item_id: str, principal, delivery: str = "auto", base_url: str | None = None
    ) -> ImageRef:
        with transaction(self.sessions) as s:
            uri = self._item(s, item_id, principal).image_uri
        return self.image_ref("items", item_id, uri, delivery, base_url)

    def signed_image(self, kind: str, ident: str, expires: str, sig: str) -> bytes:
        """The image a signed URL names (no principal: the signature is the grant)."""
        if self.signer is None:
            raise FailedPrecondition("this server does not sign image URLs")
        self.signer.check(kind, ident, expires, sig)
        return self.image(ident, None) if kind == "generations" else self.item_image(ident, None)

    def _read(self, uri: str | None, what: str) -> bytes:
        if not uri:
            raise NotFound(f"{what} has no stored image", reason="IMAGE_NOT_FOUND")
        return self.storage.get(uri)

    def can_sign(self, base_url: str | None) -> bool:
        return self.signer is not None and bool(self.signer.base_url if base_url is None else True)

    def url(self, kind: str, ident: str, base_url: str | None = None) -> tuple[str, int]:
        if not self.can_sign(base_url):
            raise FailedPrecondition(
                "image URLs need the HTTP face (`pigment serve --http-port N`, or "
                "PIGMENT_PUBLIC_HTTP_URL): ask for inline delivery or stream the image"
            )
        return self.signer.sign(kind, ident, base_url)

    def image_ref(
        self,
        kind: str,
        ident: str,
        uri: str | None,
        delivery: str,
        base_url: str | None = None,
        budget: int | None = None,
    ) -> ImageRef | None:
        """The image as ``delivery`` asks: auto = inline up to ``budget`` (default inline_max_bytes), else a URL
        (inline when no URL can be made)."""
        if delivery not in DELIVERIES:
            raise InvalidInput(f"delivery={show(delivery)} is unknown: allowed {', '.join(DELIVERIES)}",
                               reason="UNKNOWN_ENUM_VALUE", field="delivery", allowed=", ".join(DELIVERIES))
        if delivery == "none" or not uri:
            return None
        if delivery == "url":
            return ImageRef(self.storage.size(uri), b"", *self.url(kind, ident, base_url))
        data = self.storage.get(uri)
        limit = self.inline_max_bytes if budget is None else budget
        if delivery == "auto" and len(data) > limit and self.can_sign(base_url):
            return ImageRef(len(data), b"", *self.url(kind, ident, base_url))
        return ImageRef(len(data), data)

    def deliver(self, images, delivery: str = "auto", base_url: str | None = None) -> None:
        """Swap ``png`` for a signed ``url`` on a response's ImageResults: "auto" keeps images inline while
        the response's total stays within inline_max_bytes; "url" swaps all (when URLs can be made)."""
        if not self.can_sign(base_url):
            return
        budget = self.inline_max_bytes if delivery == "auto" else -1
        for image in images:
            budget -= len(image.png)
            if image.png and budget < 0:
                image.url, _ = self.url("generations", image.generation_id, base_url)
                image.png = b""
