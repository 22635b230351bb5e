"""GDPR delete, end to end: after DeleteUser nothing of the user is left in SQL, storage, the item index
(also after a rebuild from SQL), the preference cache or the next training round; other users keep theirs."""

from __future__ import annotations

import io
import time

import grpc
import numpy as np
import pytest
from conftest import make_settings, running_stack
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc
from PIL import Image
from sqlalchemy import func, select


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def count(s, table, **where) -> int:
    query = select(func.count()).select_from(table)
    for name, value in where.items():
        query = query.where(getattr(table, name) == value)
    return s.scalar(query)


def test_delete_user_removes_everything_of_the_user(tmp_path, tiny_preset):
    from pigment.services.store.tables import (
        Feedback,
        Generation,
        Interaction,
        Item,
        Job,
        JobUser,
        RenderRequest,
    )
    from pigment.training.pairs import load_feedback

    settings = make_settings(tmp_path, tiny_preset)
    with running_stack(settings) as (stack, channel, _):
        hist = history_pb2_grpc.HistoryServiceStub(channel)
        gen = generation_pb2_grpc.GenerationServiceStub(channel)
        hist.UpsertItems(history_pb2.UpsertItemsRequest(items=[
            history_pb2.Item(item_id="priv-1", caption="a red star", image_png=png((220, 0, 0)), tenant="t-gdpr"),
            history_pb2.Item(item_id="pub-1", caption="a blue heart", image_png=png((0, 0, 220)))]))
        for user, tenant, items in (("gdpr-u", "t-gdpr", ["priv-1", "pub-1"]), ("keep-u", "", ["pub-1"])):
            hist.LogInteractions(history_pb2.LogInteractionsRequest(
                user_id=user, create_user=True, tenant=tenant,
                interactions=[history_pb2.Interaction(item_id=i, kind="like") for i in items]))
        images = {}
        for user in ("gdpr-u", "keep-u"):
            resp = gen.GeneratePersonalized(gpb.GenerateRequest(
                request_id=f"{user}-r1", user_id=user, prompt="a star", num_images=2, num_inference_steps=1),
                timeout=120)
            images[user] = [(i.generation_id, i.storage_uri) for i in resp.images]
        (a, _), (b, _) = images["gdpr-u"]
        gen.LogFeedback(gpb.LogFeedbackRequest(feedback_id="gdpr-fb", user_id="gdpr-u", generation_id=a,
                                               kind=gpb.FEEDBACK_KIND_PICK, other_generation_ids=[b]))
        gen.LogFeedback(gpb.LogFeedbackRequest(feedback_id="keep-fb", user_id="keep-u",
                                               generation_id=images["keep-u"][0][0], kind=gpb.FEEDBACK_KIND_LIKE))
        gen.SubmitBatch(gpb.SubmitBatchRequest(job_id="gdpr-job", user_ids=["gdpr-u", "keep-u"], prompt="a star",
                                               num_inference_steps=1), timeout=30)
        deadline = time.monotonic() + 120
        while (job := gen.GetJob(gpb.GetJobRequest(job_id="gdpr-job")).job).status in (gpb.JOB_STATUS_QUEUED, gpb.JOB_STATUS_RUNNING):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert job.status == gpb.JOB_STATUS_DONE
        with stack.sessions() as s:
            uris = list(s.scalars(select(Generation.storage_uri).where(Generation.user_id == "gdpr-u")))
            kept_uris = list(s.scalars(select(Generation.storage_uri).where(Generation.user_id == "keep-u")))
            priv = s.scalar(select(Item).where(Item.item_id == "priv-1"))
            priv_pk, priv_vec, priv_uri = priv.pk, np.frombuffer(priv.embedding, dtype=np.float32), priv.image_uri
        assert len(uris) == 3 and all(stack.storage.exists(u) for u in uris + [priv_uri])
        index = stack.history.index
        assert priv_pk in index.search(priv_vec, 5, tenant="t-gdpr")[0][0]
        assert any(len(getattr(e, "_cache", {})) for e in stack.preference._encoders.values())

        resp = hist.DeleteUser(history_pb2.DeleteUserRequest(user_id="gdpr-u"))
        assert (resp.interactions_deleted, resp.items_deleted) == (2, 1)

        with stack.sessions() as s:
            for table in (Interaction, RenderRequest, Generation, Feedback, JobUser):
                assert count(s, table, user_id="gdpr-u") == 0, table.__tablename__
            assert count(s, Generation, request_id="gdpr-u-r1") == 0
            assert "gdpr-u" not in s.get(Job, "gdpr-job").params["user_ids"]
            assert count(s, JobUser, job_id="gdpr-job") == 1  # keep-u's result stays
            feedback, _ = load_feedback(s)  # what the next training round reads
            assert [f.feedback_id for f in feedback] == ["keep-fb"]
            assert s.scalar(select(Item.embedding).where(Item.item_id == "priv-1")) is None
        assert not any(stack.storage.exists(u) for u in uris + [priv_uri])
        assert not list((settings.storage_dir / "generations").glob("*gdpr-u*")), "the request folders remain"
        assert all(stack.storage.exists(u) for u in kept_uris)
        assert priv_pk not in index.search(priv_vec, 5, tenant="t-gdpr")[0][0]
        index.rebuild()  # from SQL: nothing comes back
        assert priv_pk not in index.search(priv_vec, 5, tenant="t-gdpr")[0][0]
        assert all(len(getattr(e, "_cache", {})) == 0 for e in stack.preference._encoders.values())
        with pytest.raises(grpc.RpcError) as err:
            hist.GetHistory(history_pb2.GetHistoryRequest(user_id="gdpr-u"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # the other user is untouched
        assert len(hist.GetHistory(history_pb2.GetHistoryRequest(user_id="keep-u")).entries) == 1


def test_a_render_finishing_after_the_delete_keeps_no_image(tmp_path):
    """The worker stores a render whose request row was deleted meanwhile: its PNGs are removed again."""
    from types import SimpleNamespace

    from pigment.services.common.storage import ImageStorage
    from pigment.services.render.core import RenderCore
    from pigment.services.store.db import make_sessionmaker
    from pigment.services.store.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    storage = ImageStorage(tmp_path / "images")
    core = RenderCore(make_sessionmaker(url), storage, renderer_factory=None)
    out = SimpleNamespace(images=[Image.new("RGB", (8, 8))] * 2, seeds=[1, 2])
    assert core._store("gone-r1", {"num_inference_steps": 1, "method": "pmg"}, out, 1.0, 1) == "deleted"
    assert not [p for p in (tmp_path / "images").rglob("*") if p.is_file()]
