"""HistoryService: converts protobuf <-> core records; the core does the work."""

from __future__ import annotations

from pigment.services.common.auth import current_principal
from pigment.services.common.media import DELIVERIES, chunks_to_pb, image_to_pb
from pigment.services.history.core import HistoryCore, InteractionRecord, ItemRecord
from pigment.v1 import history_pb2 as pb
from pigment.v1 import history_pb2_grpc


def item_to_pb(item: ItemRecord, image_url: str = "") -> pb.Item:
    return pb.Item(item_id=item.item_id, caption=item.caption, image_uri=item.image_uri or "",
                   tenant=item.tenant or "", attributes={k: str(v) for k, v in item.attributes.items()},
                   image_url=image_url)


class HistoryServicer(history_pb2_grpc.HistoryServiceServicer):
    def __init__(self, core: HistoryCore, images=None):
        self.core = core
        self.images = images  # GenerationsCore (services/gateway/generations.py): item images by id, signed URLs

    def item_url(self, item: ItemRecord, base_url: str | None = None) -> str:
        if self.images is None or not item.image_uri or not self.images.can_sign(base_url):
            return ""
        return self.images.url("items", item.item_id, base_url)[0]

    def LogInteractions(self, request, context):
        records = [InteractionRecord(i.item_id, i.kind, i.value, i.timestamp_ms if i.HasField("timestamp_ms") else None)
                   for i in request.interactions]
        result = self.core.log_interactions(request.user_id, records, request.create_user, request.tenant or None,
                                            principal=current_principal(), batch_id=request.batch_id)
        return pb.LogInteractionsResponse(logged=result.logged, duplicate=result.duplicate)

    def GetHistory(self, request, context):
        page = self.core.history_page(request.user_id, request.page_size if request.HasField("page_size") else 20,
                                      request.page_token, principal=current_principal())
        return pb.GetHistoryResponse(next_page_token=page.next_page_token, total_size=page.total, entries=[
            pb.HistoryEntry(item=item_to_pb(e.item, self.item_url(e.item)), interaction=pb.Interaction(
                item_id=e.item.item_id, kind=e.interaction.kind, value=e.interaction.value,
                timestamp_ms=e.interaction.timestamp_ms)) for e in page.entries])

    def UpsertItems(self, request, context):
        items = [ItemRecord(i.item_id, i.caption, i.image_png or None, i.image_uri or None, i.tenant or None,
                            dict(i.attributes)) for i in request.items]
        n = self.core.upsert_items(items, principal=current_principal())
        embedder = self.core.embedder
        return pb.UpsertItemsResponse(upserted=n, embedding_model=embedder.model_id if embedder else "")

    def SearchItems(self, request, context):
        which = request.WhichOneof("query")
        hits = self.core.search(
            text=request.text if which == "text" else None,
            image_png=request.image_png if which == "image_png" else None,
            vector=list(request.vector.values) if which == "vector" else None,
            k=request.k if request.HasField("k") else 10, user_id=request.user_id or None, include_seen=request.include_seen,
            principal=current_principal())
        return pb.SearchItemsResponse(results=[pb.ScoredItem(item=item_to_pb(i), score=s) for i, s in hits])

    def DeleteUser(self, request, context):
        n_inter, n_items = self.core.delete_user(request.user_id, principal=current_principal())
        return pb.DeleteUserResponse(interactions_deleted=n_inter, items_deleted=n_items)

    def GetItemImage(self, request, context):
        ref = self.images.item_ref(request.item_id, current_principal(), DELIVERIES.get(request.delivery, "?"))
        return pb.GetItemImageResponse(item_id=request.item_id, image=image_to_pb(ref))

    def StreamItemImage(self, request, context):
        data = self.images.item_image(request.item_id, current_principal())
        for chunk in chunks_to_pb(data, request.chunk_bytes):
            yield pb.StreamItemImageResponse(chunk=chunk)
