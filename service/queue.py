"""The work queue: tasks and deliveries live in the database and are claimed with leases.

A claim moves a row's ``due_at`` forward by the lease length and stamps the
owner, all in one short transaction. Finishing deletes the task (or settles the
delivery); a worker that dies simply lets the lease run out, after which the
row is due again for any worker. PostgreSQL claims with ``FOR UPDATE SKIP
LOCKED`` so many workers never take the same row; SQLite has one writer.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Insert, Table, Update, bindparam, delete, func, select, update
from sqlalchemy.orm import Session

from service.db import Database
from service.models import Delivery, DeliveryStatus, Task, utcnow

PENDING = DeliveryStatus.PENDING
TASKS = cast(Table, Task.__table__)


@functools.cache
def _upsert_task(dialect: str) -> Insert:
    """The task upsert of ``dialect`` (postgresql, sqlite), built once; the dialect's
    module is imported then, so an SQLite process never loads PostgreSQL's."""
    insert = importlib.import_module(f"sqlalchemy.dialects.{dialect}").insert
    upsert = insert(TASKS)
    return cast(
        Insert,
        upsert.on_conflict_do_update(
            index_elements=[TASKS.c.job_id, TASKS.c.kind],
            set_={"due_at": upsert.excluded.due_at, "lease_owner": None},
        ),
    )


# Built once: these run in every callback and every state change.
DELETE_TASKS = delete(TASKS).where(TASKS.c.job_id == bindparam("job"))
DELETE_TASKS_EXCEPT = DELETE_TASKS.where(TASKS.c.kind.not_in(bindparam("keep", expanding=True)))


def enqueue_task(session: Session, db: Database, kind: str, job_id: str, due_at: datetime) -> None:
    """Schedule ``kind`` work for a job (one per job and kind) and wake the workers.

    One upsert on the (job, kind) unique key: an existing task is rescheduled and
    its lease dropped, else a new one is inserted.
    """
    now = utcnow()
    session.connection().execute(
        _upsert_task("sqlite" if db.is_sqlite else "postgresql"),
        {"kind": kind, "job_id": job_id, "due_at": due_at, "attempts": 0, "created_at": now},
    )
    _forget_tasks(session, job_id, lambda task: task.kind == kind)
    if due_at <= now + timedelta(seconds=1):
        db.notify(session)


def cancel_tasks(session: Session, job_id: str, *, keep: Iterable[str]) -> None:
    """Delete a job's pending tasks except the kinds in ``keep``."""
    kept = list(keep)
    session.flush()  # pending changes first, as the ORM's autoflush would
    if kept:
        session.connection().execute(DELETE_TASKS_EXCEPT, {"job": job_id, "keep": kept})
    else:
        session.connection().execute(DELETE_TASKS, {"job": job_id})
    _forget_tasks(session, job_id, lambda task: task.kind not in kept)


def _forget_tasks(session: Session, job_id: str, which: Callable[[Task], bool]) -> None:
    """Expire tasks this session holds that the SQL above changed behind the ORM's back."""
    for item in list(session.identity_map.values()):
        if isinstance(item, Task) and item.job_id == job_id and which(item):
            session.expire(item)


@dataclass(frozen=True)
class ClaimedTask:
    """A task just leased to a worker: what its handler needs to know of it."""

    id: int
    kind: str
    job_id: str
    attempts: int
    created_at: datetime
    owner: str


def claim_tasks(
    session: Session, db: Database, *, owner: str, lease: float, limit: int, now: datetime
) -> list[ClaimedTask]:
    """Lease up to ``limit`` due tasks to ``owner``, oldest due first (submits aside).

    Submits are claimed by ``service.capacity.claim_submits``, within the ModelsLab cap.
    """
    query = (
        select(Task)
        .where(Task.due_at <= now, Task.kind != "submit")
        .order_by(Task.due_at)
        .limit(limit)
    )
    if not db.is_sqlite:
        query = query.with_for_update(skip_locked=True)
    tasks = list(session.scalars(query))
    for task in tasks:
        task.due_at = now + timedelta(seconds=lease)
        task.lease_owner = owner
        task.attempts += 1
    return [
        ClaimedTask(task.id, task.kind, task.job_id, task.attempts, task.created_at, owner)
        for task in tasks
    ]


def _leased(task: ClaimedTask) -> Any:
    return (TASKS.c.id == task.id) & (TASKS.c.lease_owner == task.owner)


def finish_task(session: Session, task: ClaimedTask) -> None:
    """Delete a task that is done, unless our lease ran out and another worker has it."""
    session.connection().execute(delete(TASKS).where(_leased(task)))


def retry_task(session: Session, task: ClaimedTask, delay: float, error: str) -> None:
    """Put a task back, due again in ``delay`` seconds (if it is still ours)."""
    session.connection().execute(
        update(TASKS)
        .where(_leased(task))
        .values(
            due_at=utcnow() + timedelta(seconds=delay), lease_owner=None, last_error=error[:1000]
        )
    )


def hold_task(session: Session, task: ClaimedTask, seconds: float) -> bool:
    """Extend our lease on a task by ``seconds``; False when it is no longer ours."""
    result = session.connection().execute(
        update(TASKS).where(_leased(task)).values(due_at=utcnow() + timedelta(seconds=seconds))
    )
    return bool(result.rowcount)


@dataclass(frozen=True)
class ClaimedDelivery:
    """A delivery just leased to us: what is needed to prepare and send it."""

    id: str
    # None: a chat reply that is no event (``service.chat.replies.QUEUED``), of ``job_id``.
    event_id: str | None
    subscription_id: str | None
    kind: str
    target_url: str | None
    job_id: str | None


def _claim_deliveries_statement() -> Update:
    deliveries = cast(Table, Delivery.__table__)
    due = (
        select(deliveries.c.id)
        .where(deliveries.c.status == PENDING, deliveries.c.due_at <= bindparam("now"))
        .order_by(deliveries.c.due_at)
        .limit(bindparam("limit"))
        .with_for_update(skip_locked=True)  # not rendered on SQLite (one writer)
    )
    return (
        update(deliveries)
        .where(deliveries.c.id.in_(due.scalar_subquery()))
        .values(due_at=bindparam("until"), lease_owner=bindparam("owner"))
        .returning(
            deliveries.c.id,
            deliveries.c.event_id,
            deliveries.c.subscription_id,
            deliveries.c.kind,
            deliveries.c.target_url,
            deliveries.c.job_id,
        )
    )


# Built once: a worker claims many times a second and building SQL is not free.
CLAIM_DELIVERIES = _claim_deliveries_statement()


def claim_deliveries(
    session: Session, db: Database, *, owner: str, lease: float, limit: int, now: datetime
) -> list[ClaimedDelivery]:
    """Lease up to ``limit`` due pending deliveries to ``owner``, in one statement.

    ``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED) RETURNING``: one round
    trip and no ORM objects, since a worker claims thousands of these a second.
    """
    params = {
        "now": now,
        "limit": limit,
        "until": now + timedelta(seconds=lease),
        "owner": owner,
    }
    rows = session.connection().execute(CLAIM_DELIVERIES, params)
    return [ClaimedDelivery(*row) for row in rows]


def release_tasks(session: Session, owner: str, ids: Iterable[int]) -> None:
    """Hand back task leases this worker holds but will not finish (graceful shutdown)."""
    wanted = list(ids)
    if wanted:
        session.execute(
            update(Task)
            .where(Task.id.in_(wanted), Task.lease_owner == owner)
            .values(due_at=utcnow(), lease_owner=None)
        )


def release_deliveries(session: Session, owner: str, ids: Iterable[str]) -> None:
    """Hand back delivery leases this worker holds but will not finish."""
    wanted = list(ids)
    if wanted:
        session.execute(
            update(Delivery)
            .where(
                Delivery.id.in_(wanted), Delivery.lease_owner == owner, Delivery.status == PENDING
            )
            .values(due_at=utcnow(), lease_owner=None)
        )


def next_task_due(session: Session) -> datetime | None:
    """When the earliest task other than a submit comes due."""
    return aware(session.scalar(select(func.min(Task.due_at)).where(Task.kind != "submit")))


def next_delivery_due(session: Session) -> datetime | None:
    """When the earliest pending delivery comes due."""
    return aware(
        session.scalar(select(func.min(Delivery.due_at)).where(Delivery.status == PENDING))
    )


def aware(value: datetime | str | None) -> datetime | None:
    # func.min bypasses the column type on SQLite and returns naive or text values.
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value
