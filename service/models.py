"""Database tables: projects and their tokens, jobs, the raw callback log, events,
subscriptions, deliveries, work.

Every job, event, subscription and delivery belongs to one project. The database
is the queue. ``tasks`` holds job work (submit, download, reconcile) and
``deliveries`` holds notification work; both are claimed by moving ``due_at``
forward by the lease length, so a crashed worker's claim simply comes due again.
"""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    FetchedValue,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, MappedColumn, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class JobStatus(StrEnum):
    """Where a job is, as clients see it (``status`` of the job resource)."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


class DeliveryStatus(StrEnum):
    """Where a delivery is (``status`` of the delivery resource)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


DEFAULT_PROJECT_ID = "prj_default"


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """Return a random, unguessable, URL-safe id such as ``job_k3j…``."""
    token = base64.b32encode(secrets.token_bytes(15)).decode().lower()
    return f"{prefix}_{token}"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every engine (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


def project_column() -> MappedColumn[Any]:
    """The owning project of a row.

    The server default is for the pods of the previous release, which still serve
    during a rolling deploy and insert rows without it: every token they know is
    one of ``default``'s. No foreign key: these are the hot tables, and the value is
    always copied from a row that was checked (the token's project, the job's).
    """
    return mapped_column(String(40), server_default=DEFAULT_PROJECT_ID)


class Project(Base):
    """A tenant: its tokens see only its own jobs, subscriptions, deliveries and events."""

    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    # Signs the project's per-job webhooks. None for ``default``, which signs with
    # MOTIONHOOK_WEBHOOK_SECRET until its secret is rotated through the API.
    secret: Mapped[str | None] = mapped_column(Text)
    previous_secret: Mapped[str | None] = mapped_column(Text)
    previous_secret_expires_at: Mapped[datetime | None]
    # The project's own ModelsLab key (None: the instance's MOTIONHOOK_MODELSLAB_API_KEY),
    # kept as given because every upstream call sends it; shown only masked.
    modelslab_api_key: Mapped[str | None] = mapped_column(Text)
    # The capacity account that key names (service.capacity.account_of); None: ``default``.
    modelslab_account: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """A bearer token of a project, kept only as the SHA-256 of its value."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    scope: Mapped[str] = mapped_column(String(8))
    description: Mapped[str] = mapped_column(Text, default="")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = project_column()
    status: Mapped[str] = mapped_column(String(16), index=True)
    model_id: Mapped[str] = mapped_column(String(32))
    input: Mapped[dict[str, Any]]
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[list[Any] | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(300), unique=True)
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))
    upstream_id: Mapped[str | None] = mapped_column(String(64), index=True)
    upstream_status: Mapped[str | None] = mapped_column(String(16))
    eta: Mapped[float | None] = mapped_column(Float)
    fetch_result: Mapped[str | None] = mapped_column(Text)
    source_urls: Mapped[list[Any]]
    outputs: Mapped[list[Any]]
    error_code: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    submitted_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    # Set while the job holds one of the ModelsLab account's queued-request slots.
    upstream_slot_since: Mapped[datetime | None] = mapped_column(index=True)
    # The ModelsLab account whose cap that slot counts against (set when it is taken).
    upstream_account: Mapped[str] = mapped_column(String(40), server_default="default")
    # Where a chat job was asked for: {"kind", "workspace", "channel", "user"} (else None).
    source: Mapped[dict[str, Any] | None]
    # Where a chat job's replies go; holds an interaction token, so never in a resource.
    chat_reply: Mapped[dict[str, Any] | None]

    __table_args__ = (
        Index("ix_jobs_created", "created_at", "id"),
        Index("ix_jobs_project_created", "project_id", "created_at", "id"),
    )


class CallbackRecord(Base):
    """Every authenticated callback body, verbatim (the audit log)."""

    __tablename__ = "callbacks"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    source: Mapped[str] = mapped_column(String(16))
    body: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)


BIGINT_ID = BigInteger().with_variant(Integer, "sqlite")


class Event(Base):
    __tablename__ = "events"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = project_column()
    type: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str | None] = mapped_column(String(40), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    payload: Mapped[dict[str, Any]]
    # The order of the events API and streams, filled in by the database (migration
    # 0005, service/eventlog.py); never read back after an insert.
    # Nullable: SQLite's trigger fills seq in just after the insert.
    seq: Mapped[int | None] = mapped_column(BIGINT_ID, server_default=FetchedValue(), deferred=True)
    txid: Mapped[int] = mapped_column(BIGINT_ID, server_default=FetchedValue(), deferred=True)
    __mapper_args__ = {"eager_defaults": False}

    __table_args__ = (
        Index("ix_events_project_id", "project_id"),
        Index("ix_events_position", "txid", "seq", unique=True),
    )


class Subscription(Base):
    __tablename__ = "subscriptions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = project_column()
    kind: Mapped[str] = mapped_column(String(16))
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[Any]]
    description: Mapped[str] = mapped_column(Text, default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    secret: Mapped[str | None] = mapped_column(Text)
    previous_secret: Mapped[str | None] = mapped_column(Text)
    previous_secret_expires_at: Mapped[datetime | None]
    failing_since: Mapped[datetime | None]
    next_send_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_subscriptions_project_id", "project_id"),)


class Delivery(Base):
    """One event to one target; also the work item the delivery threads claim."""

    __tablename__ = "deliveries"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = project_column()
    # None: a chat reply that is no event (the Discord "queued" edit, service/chat/replies.py).
    # Looked up through uq_delivery_target, which leads with it (no index of its own).
    event_id: Mapped[str | None] = mapped_column(ForeignKey("events.id"))
    subscription_id: Mapped[str | None] = mapped_column(
        ForeignKey("subscriptions.id", ondelete="CASCADE"), index=True
    )
    job_id: Mapped[str | None] = mapped_column(String(40), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    target_url: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    due_at: Mapped[datetime | None] = mapped_column(index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]

    # Declared so the unit of work inserts the event before its deliveries.
    event: Mapped[Event | None] = relationship()

    __table_args__ = (
        UniqueConstraint("event_id", "subscription_id", name="uq_delivery_target"),
        Index("ix_deliveries_project_created", "project_id", "created_at", "id"),
    )


class DeliveryAttempt(Base):
    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("deliveries.id", ondelete="CASCADE"), index=True
    )
    attempted_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    status_code: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    response_excerpt: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(16))


class UpstreamCapacity(Base):
    """The capacity state of one ModelsLab account, shared by every worker (locked to claim).

    ``account`` is ``default`` (the instance's key) or a project key's account.
    ``effective_cap`` is how many queued requests ModelsLab is taking now (at most
    ``MOTIONHOOK_MODELSLAB_MAX_QUEUED``); after a 429 all submissions pause until
    ``paused_until``, then ``probing`` lets one submission out at a time until one is
    accepted; ``probe_job_id`` is the submission in flight as a probe; no probe beyond
    the cap goes out before ``probe_after``.
    """

    __tablename__ = "upstream_capacity"

    account: Mapped[str] = mapped_column(String(40), primary_key=True)
    # 1 on the ``default`` row: the previous release's workers lock ``id = 1``.
    id: Mapped[int | None] = mapped_column(Integer, autoincrement=False)
    effective_cap: Mapped[int | None] = mapped_column(Integer)
    paused_until: Mapped[datetime | None]
    probing: Mapped[bool] = mapped_column(Boolean, default=False)
    probe_job_id: Mapped[str | None] = mapped_column(String(40))
    probe_after: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Task(Base):
    """Job work: ``submit``, ``download`` and ``reconcile``, claimed with a lease."""

    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    due_at: Mapped[datetime] = mapped_column(index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "kind", name="uq_task_job_kind"),)
