"""Batch poster jobs: many users, one target. No grpc, no torch at import.

``JobsCore`` (gateway side) validates a job, writes a ``jobs`` row and one
``job_users`` row per user (its chunk and its render ``request_id``), then
queues one chunk task per chunk. ``ChunkRunner`` (worker side) renders the
users of one chunk through the same path as GeneratePersonalized, with request
id ``{job_id}-{user_id}``, so every user's render is idempotent.

Surviving a worker loss: a chunk task first *claims* its unfinished users with a
lease (owner ``host:pid``, renewed after each user). A chunk whose owner died
(lease expired, or the pid is gone on this host) is claimable again, and
``resend_stalled`` (run when a worker starts, and on demand) re-queues such
chunks; done users are never redone, and a duplicate chunk task finds nothing
to claim. Chunks never claimed are still in the broker (late ack). Replaying
SubmitBatch with the same ``job_id`` re-queues every chunk with pending users.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

from pigment.services.common.errors import (
    AlreadyExists,
    InvalidInput,
    NotFound,
    Overloaded,
    PermissionDenied,
    PigmentError,
    Unavailable,
    Violation,
    check_range,
)
from pigment.services.common.ids import check_id, check_key
from pigment.services.common.limits import check_text
from pigment.services.gateway.core import (
    MAX_PROMPT_CHARS,
    METHODS,
    REQUEST_ID_RE,
    GenerateParams,
    or_default,
    unknown_method,
)
from pigment.services.store.db import transaction
from pigment.services.store.tables import Job, JobUser, User
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

log = logging.getLogger("pigment.jobs")
DEFAULT_CHUNK_SIZE = 8
MAX_CHUNK_SIZE = 256
MAX_JOB_USERS = 100_000
ACTIVE = ("queued", "running")
UNFINISHED = ("pending", "running")


@dataclass
class BatchParams:
    job_id: str
    user_ids: list[str] = field(default_factory=list)
    segment: str = ""  # a tenant name, or "*" for every user
    prompt: str = ""
    images_per_user: int | None = None  # None = 1
    num_inference_steps: int | None = None  # None = preset default
    method: str = ""
    chunk_size: int | None = None  # None = DEFAULT_CHUNK_SIZE


@dataclass
class UserResult:
    user_id: str
    status: str
    generation_ids: list[str]
    error: str = ""


@dataclass
class JobView:
    job_id: str
    status: str
    total: int
    done: int
    failed: int
    results: list[UserResult]
    params: dict = field(default_factory=dict)
    next_offset: int | None = None  # where the next page of results starts; None after the last


def utc(dt: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; they are UTC."""
    return dt.replace(tzinfo=UTC) if dt is not None and dt.tzinfo is None else dt


def request_id_for(job_id: str, user_id: str) -> str:
    """``{job_id}-{user_id}`` when that is a valid request id, else the user part is a hash."""
    rid = f"{job_id}-{user_id}"
    if REQUEST_ID_RE.match(rid):
        return rid
    digest = hashlib.sha256(user_id.encode()).hexdigest()[:16]
    return f"{job_id[:64 - 18]}-u{digest}"


def this_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_is_dead(owner: str | None) -> bool:
    """True only when the owner is a process on this host that no longer exists."""
    host, _, pid = (owner or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def is_stale(row: JobUser, now: datetime) -> bool:
    """Claimable: unfinished and either never claimed or its owner's lease lapsed or the owner died."""
    if row.status not in UNFINISHED:
        return False
    return row.lease_owner is None or utc(row.lease_until) < now or owner_is_dead(row.lease_owner)


class JobsCore:
    def __init__(self, settings, sessions, dispatch_chunk: Callable[[str, int, int], None],
                 charge_images: Callable | None = None):
        self.settings = settings
        self.sessions = sessions
        self.dispatch_chunk = dispatch_chunk  # (job_id, chunk, chunk_size) -> queue one chunk task
        self.charge_images = charge_images  # (principal, n) -> None or RateLimited: the tenant's image quota

    # -- SubmitBatch ----------------------------------------------------------
    def submit(self, p: BatchParams, limit: int | None = None, principal=None) -> JobView:
        """Create (or replay) the job; the view holds the first ``limit`` per-user results.

        ``principal`` (None: trusted internal caller): users must be of its tenant (else NotFound, like unknown
        ones); a segment needs the admin scope and names its own tenant ("*" = every user of it)."""
        p = self.resolve(p)
        if principal is not None:
            self._authorize(p, principal)
        phash = hashlib.sha256(json.dumps(asdict(p), sort_keys=True).encode()).hexdigest()
        with transaction(self.sessions) as s:
            job = s.get(Job, p.job_id)
        if job is not None:
            if principal is not None and not principal.sees(job.tenant):  # ids are global; whose is not told
                raise AlreadyExists(f"job_id {p.job_id} was already used with different parameters",
                                    reason="IDEMPOTENCY_KEY_REUSED", field="job_id")
            return self._replay(job, phash, limit)
        users = self._users(p, principal.tenant if principal is not None else None)
        if principal is not None and self.charge_images is not None:
            self.charge_images(principal, len(users) * p.images_per_user)
        try:
            with transaction(self.sessions) as s:
                s.add(Job(job_id=p.job_id, status="queued", params_hash=phash, params=asdict(p), total=len(users),
                          chunk_size=p.chunk_size, num_chunks=-(-len(users) // p.chunk_size),
                          tenant=principal.tenant if principal is not None else None))
                s.flush()
                s.add_all(JobUser(job_id=p.job_id, user_id=u, chunk=i // p.chunk_size,
                                  request_id=request_id_for(p.job_id, u), status="pending", generation_ids=[])
                          for i, u in enumerate(users))
        except IntegrityError:  # a concurrent submit of the same id won
            with transaction(self.sessions) as s:
                return self._replay(s.get(Job, p.job_id), phash, limit)
        self._send_chunks(p.job_id, range(-(-len(users) // p.chunk_size)), p.chunk_size)
        return self.get(p.job_id, 0, limit)

    def resolve(self, p: BatchParams) -> BatchParams:
        """Fill defaults and check every field, naming it and the allowed values."""
        check_key("job_id", p.job_id, 40)
        if bool(p.user_ids) == bool(p.segment):
            raise InvalidInput("give either user_ids or a segment (a tenant name, or \"*\" for every user)",
                               reason="ONE_OF_REQUIRED", field="user_ids", allowed="either user_ids or segment")
        if p.segment and p.segment != "*":
            check_id("segment", p.segment)
        check_range("user_ids", len(p.user_ids), 0, MAX_JOB_USERS)
        for n, user_id in enumerate(p.user_ids):
            check_id(f"user_ids[{n}]", user_id)
        check_text("prompt", p.prompt, MAX_PROMPT_CHARS)
        method = p.method or self.settings.default_method
        if method not in METHODS:
            raise unknown_method(method)
        r = BatchParams(job_id=p.job_id, user_ids=list(dict.fromkeys(p.user_ids)), segment=p.segment,
                        prompt=p.prompt.strip(), images_per_user=or_default(p.images_per_user, 1),
                        num_inference_steps=p.num_inference_steps, method=method,
                        chunk_size=or_default(p.chunk_size, DEFAULT_CHUNK_SIZE))
        check_range("images_per_user", r.images_per_user, 1, self.settings.max_images)
        if r.num_inference_steps is not None:
            check_range("num_inference_steps", r.num_inference_steps, 1, self.settings.max_steps)
        check_range("chunk_size", r.chunk_size, 1, MAX_CHUNK_SIZE)
        check_range("user_ids", len(r.user_ids), 0, MAX_JOB_USERS)
        return r

    @staticmethod
    def _authorize(p: BatchParams, principal) -> None:
        if not p.segment:
            return
        principal.require_admin(f"a segment batch (segment {p.segment})")
        if principal.tenant is not None and p.segment not in ("*", principal.tenant):
            raise PermissionDenied(f"segment {p.segment} is not the caller's tenant {principal.tenant}: "
                                   f"use {principal.tenant} or \"*\" (every user of it)")

    def _users(self, p: BatchParams, tenant: str | None = None) -> list[str]:
        """The job's users; ``tenant`` (a tenant-bound caller's) limits them to that tenant."""
        with transaction(self.sessions) as s:
            if p.user_ids:
                query = select(User.user_id).where(User.user_id.in_(p.user_ids))
                if tenant is not None:
                    query = query.where(User.tenant == tenant)
                known = set(s.scalars(query))
                missing = [u for u in p.user_ids if u not in known]
                if missing:
                    raise NotFound(f"{len(missing)} unknown users, e.g. {', '.join(missing[:5])}", reason="USER_NOT_FOUND",
                                   violations=[Violation(f"user_ids[{p.user_ids.index(u)}]", f"user {u} not found")
                                               for u in missing])
                return p.user_ids
            query = select(User.user_id).order_by(User.user_id)
            if p.segment != "*" or tenant is not None:
                query = query.where(User.tenant == (tenant or p.segment))
            users = list(s.scalars(query.limit(MAX_JOB_USERS + 1)))
        if not users:
            raise InvalidInput(f"segment {p.segment} has no users", reason="EMPTY_SEGMENT", field="segment")
        if len(users) > MAX_JOB_USERS:
            raise InvalidInput(f"segment {p.segment} has over {MAX_JOB_USERS} users: split the job", reason="TOO_MANY",
                               field="segment", allowed=f"at most {MAX_JOB_USERS} users")
        return users

    def _replay(self, job: Job, phash: str, limit: int | None) -> JobView:
        if job.params_hash != phash:
            raise AlreadyExists(f"job_id {job.job_id} was already used with different parameters",
                                reason="IDEMPOTENCY_KEY_REUSED", field="job_id")
        if job.status in ACTIVE:  # replaying resumes: re-queue every chunk with unfinished users
            with transaction(self.sessions) as s:
                chunks = sorted(set(s.scalars(select(JobUser.chunk).where(
                    JobUser.job_id == job.job_id, JobUser.status.in_(UNFINISHED)))))
            self._send_chunks(job.job_id, chunks, job.chunk_size)
        return self.get(job.job_id, 0, limit)

    def _send_chunks(self, job_id: str, chunks, chunk_size: int) -> None:
        try:
            for chunk in chunks:
                self.dispatch_chunk(job_id, chunk, chunk_size)
        except PigmentError:
            raise
        except Exception as exc:  # broker errors from kombu/redis/amqp; the job is kept
            raise Unavailable(f"batch queue unavailable ({type(exc).__name__}: {str(exc)[:200]}); "
                              f"replay SubmitBatch with job_id {job_id!r} to resume") from exc

    # -- GetJob / CancelJob -----------------------------------------------------
    def get(self, job_id: str, offset: int = 0, limit: int | None = None, principal=None) -> JobView:
        """The job's counts over all users and its per-user results from ``offset`` (``limit`` of them).
        Another tenant's job is NotFound."""
        check_key("job_id", job_id)
        with transaction(self.sessions) as s:
            job = s.get(Job, job_id)
            if job is None or (principal is not None and not principal.sees(job.tenant)):
                raise NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND")
            counts = dict(s.execute(select(JobUser.status, func.count()).where(JobUser.job_id == job_id)
                                    .group_by(JobUser.status)).all())
            page = (select(JobUser).where(JobUser.job_id == job_id).order_by(JobUser.chunk, JobUser.user_id)
                    .offset(offset).limit(None if limit is None else limit + 1))  # one more: is there a next page?
            rows = list(s.scalars(page))
        more = limit is not None and len(rows) > limit
        results = [UserResult(r.user_id, r.status, list(r.generation_ids or []), r.error or "")
                   for r in rows[:limit]]
        return JobView(job.job_id, job.status, job.total, counts.get("done", 0), counts.get("failed", 0), results,
                       dict(job.params), offset + len(results) if more else None)

    def cancel(self, job_id: str, limit: int | None = None, principal=None) -> JobView:
        """Pending users are cancelled; a user already rendering finishes. A finished job is left as it is.
        Another tenant's job is NotFound."""
        check_key("job_id", job_id)
        with transaction(self.sessions) as s:
            job = s.get(Job, job_id)
            if job is None or (principal is not None and not principal.sees(job.tenant)):
                raise NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND")
            if job.status in ACTIVE:
                job.status = "cancelled"
                s.execute(update(JobUser).where(JobUser.job_id == job_id, JobUser.status == "pending")
                          .values(status="cancelled", error="job cancelled"))
                now = datetime.now(UTC)
                for r in s.scalars(select(JobUser).where(JobUser.job_id == job_id, JobUser.status == "running")):
                    if is_stale(r, now):  # its worker is gone: nothing will finish it
                        r.status, r.error = "cancelled", "job cancelled"
        return self.get(job_id, 0, limit)

    # -- resume after a worker loss ----------------------------------------------
    def resend_stalled(self) -> list[tuple[str, int]]:
        """Re-queue chunks that started but whose owner is gone; returns the (job_id, chunk) sent."""
        now = datetime.now(UTC)
        with transaction(self.sessions) as s:
            rows = list(s.execute(select(JobUser, Job.chunk_size).join(Job, Job.job_id == JobUser.job_id)
                                  .where(Job.status.in_(ACTIVE), JobUser.status.in_(UNFINISHED),
                                         JobUser.lease_owner.is_not(None))))
        stalled = sorted({(r.job_id, r.chunk, size) for r, size in rows if is_stale(r, now)})
        for job_id, chunk, size in stalled:
            log.warning("job %s chunk %d lost its worker; re-queueing it", job_id, chunk)
            self._send_chunks(job_id, [chunk], size)
        return [(j, c) for j, c, _ in stalled]


class ChunkRunner:
    """Renders one chunk's users via ``generate(GenerateParams) -> GenerateResult`` (the gateway path)."""

    def __init__(self, sessions, generate: Callable, lease_s: float = 360.0, owner: str | None = None,
                 overloaded_retries: int = 3, overloaded_wait_s: float = 2.0):
        self.sessions = sessions
        self.generate = generate
        self.lease_s = lease_s
        self.owner = owner or this_owner()
        self.overloaded_retries = overloaded_retries
        self.overloaded_wait_s = overloaded_wait_s

    def run(self, job_id: str, chunk: int) -> dict:
        claimed = self.claim(job_id, chunk)
        counts = {"claimed": len(claimed), "done": 0, "failed": 0, "skipped": 0}
        with transaction(self.sessions) as s:
            job = s.get(Job, job_id)
            params = dict(job.params) if job else {}
        for user_id in claimed:
            if not self._start(job_id, user_id):
                counts["skipped"] += 1
                continue
            status = self._render_user(job_id, user_id, params)
            counts[status] += 1
        self.finish_if_complete(job_id)
        return counts

    def claim(self, job_id: str, chunk: int) -> list[str]:
        """Take the lease on every claimable user of the chunk (compare-and-swap on the previous owner)."""
        now = datetime.now(UTC)
        until = now + timedelta(seconds=self.lease_s)
        with transaction(self.sessions) as s:
            rows = list(s.scalars(select(JobUser).where(JobUser.job_id == job_id, JobUser.chunk == chunk)
                                  .order_by(JobUser.user_id)))
            stale = [r for r in rows if is_stale(r, now) or (r.lease_owner == self.owner and r.status in UNFINISHED)]
            for r in stale:
                owner_match = JobUser.lease_owner.is_(None) if r.lease_owner is None else JobUser.lease_owner == r.lease_owner
                s.execute(update(JobUser).where(JobUser.job_id == job_id, JobUser.user_id == r.user_id,
                                                JobUser.status.in_(UNFINISHED), owner_match)
                          .values(lease_owner=self.owner, lease_until=until), execution_options={"synchronize_session": False})
        with transaction(self.sessions) as s:
            return list(s.scalars(select(JobUser.user_id).where(
                JobUser.job_id == job_id, JobUser.chunk == chunk, JobUser.lease_owner == self.owner,
                JobUser.status.in_(UNFINISHED)).order_by(JobUser.user_id)))

    def _start(self, job_id: str, user_id: str) -> bool:
        """Mark the user running (renewing the lease) unless the job was cancelled or someone else took it."""
        until = datetime.now(UTC) + timedelta(seconds=self.lease_s)
        with transaction(self.sessions) as s:
            if s.scalar(select(Job.status).where(Job.job_id == job_id)) not in ACTIVE:
                return False
            res = s.execute(update(JobUser).where(JobUser.job_id == job_id, JobUser.user_id == user_id,
                                                  JobUser.lease_owner == self.owner,
                                                  JobUser.status.in_(UNFINISHED))
                            .values(status="running", lease_until=until, attempts=JobUser.attempts + 1),
                            execution_options={"synchronize_session": False})
            if res.rowcount == 1:
                s.execute(update(JobUser).where(JobUser.job_id == job_id, JobUser.lease_owner == self.owner,
                                                JobUser.status == "pending").values(lease_until=until),
                          execution_options={"synchronize_session": False})  # renew the rest of the chunk
                s.execute(update(Job).where(Job.job_id == job_id, Job.status == "queued").values(status="running"),
                          execution_options={"synchronize_session": False})
            return res.rowcount == 1

    def _render_user(self, job_id: str, user_id: str, params: dict) -> str:
        with transaction(self.sessions) as s:
            request_id = s.get(JobUser, (job_id, user_id)).request_id
        gp = GenerateParams(request_id=request_id, user_id=user_id, prompt=params.get("prompt", ""),
                            num_images=params.get("images_per_user", 1),
                            num_inference_steps=params.get("num_inference_steps") or None,  # 0: rows from before v1
                            method=params.get("method", ""))
        try:
            result = self._generate(gp)
        except PigmentError as exc:
            return self._record(job_id, user_id, "failed", [], f"{exc.status}: {exc}")
        except Exception as exc:
            log.exception("job %s user %s failed", job_id, user_id)
            return self._record(job_id, user_id, "failed", [], f"INTERNAL: {type(exc).__name__}: {exc}")
        return self._record(job_id, user_id, "done", [i.generation_id for i in result.images], None)

    def _generate(self, gp: GenerateParams):
        for attempt in range(self.overloaded_retries + 1):
            try:
                return self.generate(gp)
            except Overloaded:
                if attempt == self.overloaded_retries:
                    raise
                time.sleep(self.overloaded_wait_s * (attempt + 1))

    def _record(self, job_id: str, user_id: str, status: str, generation_ids: list[str], error: str | None) -> str:
        with transaction(self.sessions) as s:
            s.execute(update(JobUser).where(JobUser.job_id == job_id, JobUser.user_id == user_id,
                                            JobUser.lease_owner == self.owner)
                      .values(status=status, generation_ids=generation_ids, error=error and error[:2000],
                              lease_until=None), execution_options={"synchronize_session": False})
        return status

    def finish_if_complete(self, job_id: str) -> None:
        with transaction(self.sessions) as s:
            job = s.get(Job, job_id)
            if job is None or job.status not in ACTIVE:
                return
            counts = dict(s.execute(select(JobUser.status, func.count()).where(JobUser.job_id == job_id)
                                    .group_by(JobUser.status)).all())
            if not any(counts.get(k) for k in UNFINISHED):
                job.status = "failed" if counts.get("failed", 0) == job.total else "done"
