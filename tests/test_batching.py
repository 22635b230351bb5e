"""Worker batching: compatible requests share one denoising loop, and seeds stay reproducible."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from conftest import make_settings, running_stack
from pigment.services.store.tables import RenderRequest
from pigment.v1 import generation_pb2 as gpb
from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc


def test_batched_images_equal_unbatched(tiny_preset):
    from pigment.models.pipeline import Renderer, RenderInputs

    renderer = Renderer(tiny_preset)
    a = RenderInputs(segments=["a red star"], num_images=2, seed=11, num_inference_steps=3)
    b = RenderInputs(segments=["a blue circle"], soft_tokens=None, num_images=1, seed=99, num_inference_steps=3)
    alone = [renderer.render(x).images for x in (a, b)]
    together = [o.images for o in renderer.render_batch([a, b])]
    for imgs_alone, imgs_batch in zip(alone, together):
        assert len(imgs_alone) == len(imgs_batch)
        for x, y in zip(imgs_alone, imgs_batch):
            assert np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max() <= 1


def test_concurrent_requests_render_as_one_batch(tmp_path, tiny_preset):
    settings = make_settings(tmp_path, tiny_preset, render_batch_window_ms=500, render_max_batch=4)
    with running_stack(settings) as (stack, channel, _):
        history_pb2_grpc.HistoryServiceStub(channel).LogInteractions(
            history_pb2.LogInteractionsRequest(user_id="u", create_user=True))
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        def call(n):
            return stub.GeneratePersonalized(gpb.GenerateRequest(
                request_id=f"batch-{n}", user_id="u", prompt="a star", num_images=1, num_inference_steps=2,
                seed=100 + n), timeout=120)

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(call, range(4)))
        assert all(len(r.images) == 1 for r in results)
        with stack.sessions() as s:
            sizes = [s.get(RenderRequest, f"batch-{n}").conditioning["render_batch_size"] for n in range(4)]
        assert max(sizes) > 1, sizes
        assert [r.images[0].seed for r in results] == [100, 101, 102, 103]
