"""SQL tables: the source of truth. (Named ``tables`` so "models" always means ML models.)

Everything derived (the FAISS index, caches, images on disk) can be rebuilt
from these rows. ``items.change_seq`` is a monotonically increasing change
counter: the item index remembers the highest value it has applied (its
high-water mark) and catches up from there after a restart.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    tenant: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Counter(Base):
    """Named counters, incremented under a row lock (``items`` change sequence)."""

    __tablename__ = "counters"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class Item(Base):
    __tablename__ = "items"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    item_id: Mapped[str] = mapped_column(String(128), unique=True)
    # None = public catalog item; otherwise visible only to users of that tenant.
    tenant: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    caption: Mapped[str] = mapped_column(Text, default="")
    image_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # float32, L2-normalised
    embedding_model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    attributes: Mapped[dict] = mapped_column(JSON, default=dict)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    change_seq: Mapped[int] = mapped_column(BigInteger, default=0, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class Interaction(Base):
    __tablename__ = "interactions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.user_id", ondelete="CASCADE"))
    item_pk: Mapped[int] = mapped_column(ForeignKey("items.pk", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32), default="view")
    value: Mapped[float] = mapped_column(Float, default=1.0)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (Index("ix_interactions_user_ts", "user_id", "ts"),)


class InteractionBatch(Base):
    """A LogInteractions batch_id already applied: a retry or reload with it logs nothing twice."""

    __tablename__ = "interaction_batches"
    user_id: Mapped[str] = mapped_column(ForeignKey("users.user_id", ondelete="CASCADE"), primary_key=True)
    batch_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64))  # sha256 of the batch: a reused key must match it
    logged: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ReferenceImage(Base):
    """Who uploaded a raw-byte reference image (stored content-addressed, so one file can have several
    uploaders): DeleteUser removes the user's rows, and the file once no other user's row names it."""

    __tablename__ = "reference_images"
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the checked PNG
    user_id: Mapped[str] = mapped_column(ForeignKey("users.user_id", ondelete="CASCADE"), primary_key=True,
                                         index=True)
    tenant: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the uploader's, when it uploaded
    image_uri: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RenderRequest(Base):
    """One GeneratePersonalized call: what was asked, how it was conditioned, where it is."""

    __tablename__ = "render_requests"
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.user_id", ondelete="CASCADE"), index=True)
    params_hash: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict] = mapped_column(JSON)
    conditioning: Mapped[dict] = mapped_column(JSON)  # prompt, keywords, soft tokens (b64), flags
    model_version: Mapped[str] = mapped_column(String(128))
    # Active registry versions when the request was made ({kind: version}); the worker renders with these,
    # so a promotion mid-flight never changes a request that already started.
    adapters: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Last sign of life: the send for a queued row, the rendering worker's heartbeat for a running one.
    # The reaper re-sends rows whose heartbeat went stale (services/gateway/reaper.py).
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    dispatches: Mapped[int] = mapped_column(Integer, default=0)  # sends; compare-and-set token of re-sends
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims by a worker (a poison request stops)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)  # who claimed it last
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    __table_args__ = (Index("ix_render_requests_status_heartbeat", "status", "heartbeat_at"),)


class WorkerBeat(Base):
    """A live render worker: which queues it consumes and when it last said so (readiness)."""

    __tablename__ = "worker_beats"
    worker_id: Mapped[str] = mapped_column(String(191), primary_key=True)
    queues: Mapped[list] = mapped_column(JSON, default=list)
    host: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class Generation(Base):
    __tablename__ = "generations"
    generation_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("render_requests.request_id", ondelete="CASCADE"))
    image_index: Mapped[int] = mapped_column(Integer)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    storage_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    retrieved_item_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    model_version: Mapped[str] = mapped_column(String(128))
    # Registry versions this image was made with, "kind=version,..." sorted; None = preset weights only.
    # Prompt, conditioning and params are on the RenderRequest (join on request_id); the candidates shown
    # with this image are the other generations of the same request.
    adapter_version: Mapped[str | None] = mapped_column(String(256), nullable=True)
    method: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    __table_args__ = (UniqueConstraint("request_id", "image_index", name="uq_generation_request_index"),)


class Feedback(Base):
    __tablename__ = "feedback"
    feedback_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.generation_id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # like | dislike | rating | pick | click
    value: Mapped[float] = mapped_column(Float, default=0.0)
    other_generation_ids: Mapped[list] = mapped_column(JSON, default=list)  # for picks: the ones not chosen
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    """One batch poster job: many users, one target, split into chunks of users on the worker pool."""

    __tablename__ = "jobs"
    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)  # queued|running|done|cancelled
    params_hash: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict] = mapped_column(JSON)  # prompt, images_per_user, steps, method, segment, user_ids
    total: Mapped[int] = mapped_column(Integer, default=0)
    chunk_size: Mapped[int] = mapped_column(Integer, default=1)
    num_chunks: Mapped[int] = mapped_column(Integer, default=0)
    # The submitting key's tenant: only its keys see the job; None = an every-tenant caller (operator, embedded).
    tenant: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class JobUser(Base):
    """One user of a job: its chunk, its request id (idempotency key of the render), status and results.

    A chunk task claims a user with a lease (``lease_owner``/``lease_until``) before rendering, so a
    redelivered or re-sent chunk never renders the same user twice at once and never redoes a done one.
    """

    __tablename__ = "job_users"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.job_id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.user_id", ondelete="CASCADE"), primary_key=True)
    chunk: Mapped[int] = mapped_column(Integer)
    request_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|running|done|failed|cancelled
    generation_ids: Mapped[list] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    __table_args__ = (Index("ix_job_users_job_chunk", "job_id", "chunk"),
                      Index("ix_job_users_job_status", "job_id", "status"))


class ModelVersion(Base):
    """A registered adapter (or head) version: where it is, its sha256, lineage, status and metrics."""

    __tablename__ = "model_versions"
    version: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)  # pmg_head | pigeon_lora | unet_lora | ...
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    parent: Mapped[str | None] = mapped_column(String(128), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="registered", index=True)  # registered|active|retired|rejected
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    notes: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
