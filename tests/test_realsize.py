"""An SD 1.5-architecture preset (random weights, `pigment models build --arch sd15`) served at its native
512x512 through gRPC and a real worker, then one scheduled retrain on it with the generic gate.

Slow (34 min on a 2-core VM at load average 15-22, bench/RESULTS.md; the serving worker peaks at ~8 GB with
5 images at 512, the retrain worker at ~6 GB): runs only with
PIGMENT_TEST_SD15=DIR (an sd15 preset; built there first if DIR has no manifest). The retrain is made
affordable on a CPU the way a real one would be: a rank-2 LoRA, one Diffusion-DPO step at 256x256 (the
served 512x512 images resized), the gate reading its implicit reward at that size and rendering its CLIP
guard at the manifest's ``gate_size``/``gate_steps``. It runs in a fresh worker (the scheduled task, sent
as beat sends it) after the serving worker has stopped, so the two never hold an 860M UNet each at once.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
from conftest import make_settings, running_stack
from PIL import Image

SD15 = os.environ.get("PIGMENT_TEST_SD15")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SD15, reason="set PIGMENT_TEST_SD15=DIR to serve an sd15-architecture preset")]


@pytest.fixture(scope="module")
def sd15() -> Path:
    preset = Path(SD15)
    if not (preset / "manifest.json").is_file():
        from pigment.models.build import build_preset

        build_preset("sd15", preset)
    return preset


def test_sd15_serves_512_and_retrains_with_the_generic_gate(sd15, tmp_path):
    from pigment.services.gateway.feedback import FeedbackCore
    from pigment.services.render.celery_app import RETRAIN_TASK
    from pigment.v1 import generation_pb2 as pb
    from pigment.v1 import generation_pb2_grpc, history_pb2, history_pb2_grpc

    (tmp_path / "one-step.yaml").write_text(
        "steps: 1\nbatch_size: 1\nwarmup_steps: 0\nlora_r: 2\nlora_alpha: 2\nresolution: 256\n")
    settings = make_settings(tmp_path, sd15, retrain_kind="unet_lora", retrain_min_pairs=4, retrain_eval_samples=1,
                             retrain_config=tmp_path / "one-step.yaml").model_copy(update={"render_timeout_s": 1800})
    from pigment.models.loader import verify_preset

    t0 = time.perf_counter()  # hashed once here (5 GB); the workers then trust the cache by path, size, mtime, inode
    print("verify:", verify_preset(sd15, settings.verified_files), f"{time.perf_counter() - t0:.0f} s")
    with running_stack(settings) as (stack, channel, _worker):
        assert stack.verify_models()["files"] > 10
        history_pb2_grpc.HistoryServiceStub(channel).LogInteractions(
            history_pb2.LogInteractionsRequest(user_id="u", create_user=True))
        t0 = time.perf_counter()
        resp = generation_pb2_grpc.GenerationServiceStub(channel).GeneratePersonalized(pb.GenerateRequest(
            request_id="sd15-1", user_id="u", prompt="a red star", num_images=5, num_inference_steps=1,
            method=pb.METHOD_NON_PERSONALIZED), timeout=1800)
        seconds = time.perf_counter() - t0
        sizes = {Image.open(io.BytesIO(img.png)).size for img in resp.images}
        assert sizes == {(512, 512)}, sizes  # the preset's size: no request field set it
        print(f"5 images at 512x512, 1 step: {seconds:.0f} s; timings {dict(resp.timings_ms)}")
        ids = [img.generation_id for img in resp.images]
        FeedbackCore(stack.sessions).log(feedback_id="sd15-pick", user_id="u", generation_id=ids[0], kind="pick",
                                         other_generation_ids=ids[1:])
    with running_stack(settings) as (stack, _channel, _worker):  # a fresh worker: no renderer loaded
        t0 = time.perf_counter()
        stack.celery.send_task(RETRAIN_TASK, args=["unet_lora"], queue=settings.retrain_queue)  # as beat does
        deadline = time.monotonic() + 3600
        reports = []
        while not reports and time.monotonic() < deadline:
            time.sleep(2)
            reports = list((settings.data_dir / "retrain").glob("*/report.json"))
        assert reports, (settings.data_dir / "worker.log").read_text()[-3000:]
        report = json.loads(reports[0].read_text())
        print("retrain:", report["status"], report["reason"], report["seconds"], "s in the job,",
              f"{time.perf_counter() - t0:.0f} s wall; metrics", json.dumps(report["metrics"])[:600])
        assert report["status"] in ("promoted", "rejected"), report["reason"]
        assert report["metrics"]["gate"] == "preference" and report["n_pairs"] == 4
        for side in ("candidate", "baseline"):
            assert {"joint", "content_fidelity"} <= set(report["metrics"][side])
