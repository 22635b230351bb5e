"""`pigment batch`: a batch poster job from the command line, with a progress bar and a manifest.

Submits through the same JobsCore as SubmitBatch (same database and broker as the
settings name), starts an embedded worker unless ``--no-worker`` (one runs
elsewhere), follows the job to the end, copies each image to ``OUT/<user>/<n>.png``
and writes ``OUT/manifest.json``. Re-running with the same ``--job-id`` resumes
the job without redoing finished users.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from pigment.services.common.errors import DeadlineExceeded
from sqlalchemy import select


def register(sub) -> None:
    p = sub.add_parser("batch", help="render a prompt for many users (a batch poster job) into a folder")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--users", help="comma-separated user ids")
    who.add_argument("--segment", help='all users of this tenant ("*" = every user)')
    p.add_argument("--prompt", default="", help='what to render, e.g. "a star"')
    p.add_argument("--images", type=int, default=1, help="images per user")
    p.add_argument("--steps", type=int, default=0, help="denoising steps (0 = preset default)")
    p.add_argument("--method", default="", help="pmg | pmg_keywords | pmg_soft | non_personalized")
    p.add_argument("--chunk-size", type=int, default=0, help="users per worker task (0 = default)")
    p.add_argument("--job-id", default=None, help="idempotency key; re-run with it to resume (default: new)")
    p.add_argument("--out", default="batch-output", help="folder for images and manifest.json")
    p.add_argument("--no-worker", action="store_true", help="do not start a worker (one runs elsewhere)")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up following the job after this many s")
    p.set_defaults(func=cmd_batch)


def cmd_batch(args, settings) -> int:
    from pigment.services.gateway.jobs import BatchParams
    from pigment.services.stack import Stack, Worker
    from pigment.services.store.migrate import upgrade

    upgrade(settings.database_url)
    stack = Stack(settings)
    params = BatchParams(job_id=args.job_id or f"batch-{uuid.uuid4().hex[:12]}",
                         user_ids=[u.strip() for u in (args.users or "").split(",") if u.strip()],
                         segment=args.segment or "", prompt=args.prompt, images_per_user=args.images,
                         num_inference_steps=args.steps or None, method=args.method,
                         chunk_size=args.chunk_size or None)
    worker = None if args.no_worker else Worker(settings).start()
    try:
        job = stack.jobs.submit(params)
        print(f"job {job.job_id}: {job.total} users, status {job.status}", flush=True)
        job = follow(stack.jobs, job.job_id, args.timeout)
    finally:
        if worker:
            worker.stop()
    manifest = write_outputs(stack, job, Path(args.out))
    print(f"job {job.job_id} {job.status}: {job.done} done, {job.failed} failed; manifest {manifest}")
    return 0 if job.status == "done" and not job.failed else 1


def follow(jobs, job_id: str, timeout: float, poll_s: float = 0.5):
    """Poll the job with a tqdm bar until it is no longer queued or running."""
    from tqdm import tqdm

    deadline = time.monotonic() + timeout
    job = jobs.get(job_id)
    with tqdm(total=job.total, unit="user", desc=job_id) as bar:
        while True:
            finished = job.done + job.failed + sum(r.status == "cancelled" for r in job.results)
            bar.update(finished - bar.n)
            bar.set_postfix(status=job.status, failed=job.failed)
            if job.status not in ("queued", "running"):
                return job
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"job {job_id} not finished after {timeout}s; it continues: "
                                       f"re-run with --job-id {job_id} to follow it")
            time.sleep(poll_s)
            job = jobs.get(job_id)


def write_outputs(stack, job, out: Path) -> Path:
    """Copy each user's images to OUT/<user>/<n>.png; manifest.json lists them with their generation rows."""
    from pigment.services.store.tables import Generation

    out.mkdir(parents=True, exist_ok=True)
    ids = [g for r in job.results for g in r.generation_ids]
    with stack.sessions() as s:
        gens = {g.generation_id: g for g in s.scalars(select(Generation).where(Generation.generation_id.in_(ids)))}
    users = {}
    for r in job.results:
        files = []
        for n, gid in enumerate(r.generation_ids):
            g = gens[gid]
            path = out / r.user_id / f"{n}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(stack.storage.get(g.storage_uri))
            files.append({"file": str(path.relative_to(out)), "generation_id": gid, "seed": g.seed,
                          "storage_uri": g.storage_uri, "model_version": g.model_version,
                          "adapter_version": g.adapter_version, "method": g.method})
        users[r.user_id] = {"status": r.status, "error": r.error, "images": files}
    manifest = out / "manifest.json"
    manifest.write_text(json.dumps({"job_id": job.job_id, "status": job.status, "total": job.total,
                                    "done": job.done, "failed": job.failed, "params": job.params,
                                    "users": users}, indent=2, sort_keys=True) + "\n")
    return manifest
