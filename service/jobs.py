"""Jobs: creation, the resource clients see, and the state machine.

The state machine is written once, here: every status change goes through
:func:`move_job`, guarded by ``TRANSITIONS``. Every upstream answer (submit
response, callback, fetch) goes through :func:`apply_upstream_result`, which
decides from the job's current state whether the answer moves it forward, is a
duplicate, or is late and ignored; :func:`apply_submit_answer` and
:func:`fail_if_overdue` decide rejections and timeouts.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, object_session

from schemas.upstream import UpstreamResult, UpstreamStatus
from service.capacity import queue_position, release_slot
from service.db import Database
from service.events import emit_job_event
from service.models import Job, JobStatus, new_id, utcnow
from service.queue import cancel_tasks, enqueue_task
from service.upstream import REJECTED, RESULT, UpstreamAnswer

# Which statuses a job may move to from each status; nothing ever moves back.
# A ``failed`` job may still complete, but only when it failed by ``timeout``
# (a real success arriving late): see can_move.
TRANSITIONS: dict[str, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.PROCESSING, JobStatus.COMPLETED, JobStatus.FAILED}),
    JobStatus.PROCESSING: frozenset({JobStatus.COMPLETED, JobStatus.FAILED}),
    JobStatus.FAILED: frozenset({JobStatus.COMPLETED}),
    JobStatus.COMPLETED: frozenset(),
}
TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED})
EVENT_OF = {
    JobStatus.PROCESSING: "job.processing",
    JobStatus.COMPLETED: "job.completed",
    JobStatus.FAILED: "job.failed",
}

APPLIED, DUPLICATE, IGNORED = "applied", "duplicate", "ignored"

MediaUrl = Callable[[str], str]


@dataclass(frozen=True)
class JobError:
    """Why a job failed: ``error.code`` and ``error.message`` of the job resource."""

    code: str
    message: str


def can_move(job: Job, to: JobStatus) -> bool:
    """Say whether the transition table lets ``job`` move to ``to``."""
    if to not in TRANSITIONS[job.status]:
        return False
    return not (job.status == JobStatus.FAILED and job.error_code != "timeout")


def isoformat(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def request_fingerprint(params: dict[str, Any], upload_sha256: str | None = None) -> str:
    """Hash a request body canonically, so the same body under one key matches."""
    canonical = json.dumps({"params": params, "upload": upload_sha256}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def scoped_idempotency_key(project_id: str, key: str) -> str:
    """Scope an ``Idempotency-Key`` to the project whose token sent it."""
    return f"{project_id}:{key}"


def find_idempotent_job(session: Session, scoped_key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.idempotency_key == scoped_key)).first()


def create_job(
    session: Session,
    db: Database,
    params: dict[str, Any],
    *,
    project_id: str,
    job_id: str | None = None,
    idempotency_key: str | None = None,
    fingerprint: str | None = None,
) -> Job:
    """Insert a queued job and its submit task in the caller's transaction."""
    params = dict(params)
    now = utcnow()
    job = Job(
        id=job_id or new_id("job"),
        project_id=project_id,
        status=JobStatus.QUEUED,
        model_id=params.pop("model_id", "wan2.2"),
        metadata_=params.pop("metadata", {}) or {},
        webhook_url=params.pop("webhook_url", None),
        webhook_events=params.pop("webhook_events", None),
        input=params,
        idempotency_key=idempotency_key,
        request_fingerprint=fingerprint,
        source_urls=[],
        outputs=[],
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    enqueue_task(session, db, "submit", job.id, now)
    return job


def job_resource(job: Job, media_url: MediaUrl) -> dict[str, Any]:
    """Render the job as clients see it, with fresh durable URLs.

    ``queue_position`` is read in the job's own session (one count, only for a job
    waiting for a slot).
    """
    outputs = []
    for item in job.outputs or []:
        stored = bool(item.get("key"))
        output = {
            "url": media_url(item["key"]) if stored else None,
            "source_url": item.get("source_url"),
            "content_type": item.get("content_type"),
            "bytes": item.get("bytes"),
            "sha256": item.get("sha256"),
            "stored": stored,
        }
        if not stored:
            output["error"] = item.get("error") or ("pruned" if item.get("pruned_at") else None)
        outputs.append(output)
    job_input = dict(job.input)
    if job_input.get("image_key"):
        job_input["init_image"] = media_url(job_input.pop("image_key"))
    return {
        "id": job.id,
        "status": job.status,
        "model_id": job.model_id,
        "input": job_input,
        "metadata": job.metadata_ or {},
        "webhook_url": job.webhook_url,
        "webhook_events": job.webhook_events,
        "created_at": isoformat(job.created_at),
        "updated_at": isoformat(job.updated_at),
        "completed_at": isoformat(job.completed_at),
        "queue_position": _queue_position(job),
        "upstream": {"id": job.upstream_id, "status": job.upstream_status, "eta": job.eta},
        "outputs": outputs,
        "error": (
            {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None
        ),
    }


def _queue_position(job: Job) -> int | None:
    session = object_session(job)
    return queue_position(session, job) if session is not None else None


def encode_cursor_parts(created_at: datetime, row_id: str) -> str:
    """Encode a keyset cursor (creation time and id of the last row of a page)."""
    raw = f"{isoformat(created_at)}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Decode a list cursor, raising ``ValueError`` when it was not made by us."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, job_id = base64.urlsafe_b64decode(padded).decode().split("|", 1)
        when = datetime.fromisoformat(created.replace("Z", "+00:00")).astimezone(UTC)
        return when, job_id
    except (ValueError, UnicodeDecodeError, OverflowError) as exc:
        raise ValueError("cursor is not valid") from exc


def list_jobs(
    session: Session, project_id: str, *, status: str | None, limit: int, cursor: str | None
) -> tuple[list[Job], str | None]:
    """Return one page of the project's jobs, newest first, and the cursor of the next page."""
    query = (
        select(Job)
        .where(Job.project_id == project_id)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit + 1)
    )
    if status:
        query = query.where(Job.status == status)
    if cursor:
        created, job_id = decode_cursor(cursor)
        query = query.where(
            or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id))
        )
    jobs = list(session.scalars(query))
    next_cursor = (
        encode_cursor_parts(jobs[limit - 1].created_at, jobs[limit - 1].id)
        if len(jobs) > limit
        else None
    )
    return jobs[:limit], next_cursor


def _remember_upstream(job: Job, result: UpstreamResult) -> None:
    if result.upstream_id and not job.upstream_id:
        job.upstream_id = result.upstream_id
    if result.eta is not None and job.upstream_status in (None, UpstreamStatus.PROCESSING):
        job.eta = result.eta
    if result.fetch_result and not job.fetch_result:
        job.fetch_result = result.fetch_result


def move_job(
    session: Session,
    db: Database,
    job: Job,
    to: JobStatus,
    *,
    media_url: MediaUrl,
    error: JobError | None = None,
    outputs: list[dict[str, Any]] | None = None,
    announce: bool = True,
) -> bool:
    """Move a locked job to ``to`` if the transition table allows it; the only status change.

    A terminal move drops the job's pending work. With ``announce`` (the default)
    the move emits its event (``job.processing``, ``job.completed``, ``job.failed``)
    in the same transaction. Returns False, changing nothing, for a move the table
    refuses.
    """
    if not can_move(job, to):
        return False
    now = utcnow()
    job.status = to
    job.updated_at = now
    if to == JobStatus.PROCESSING:
        job.submitted_at = job.submitted_at or now
    if to == JobStatus.COMPLETED:
        job.outputs = outputs or []
        job.error_code = None
        job.error_message = None
    if to == JobStatus.FAILED:
        assert error is not None, "a failed job carries its error"
        job.error_code = error.code
        job.error_message = error.message[:2000]
    if to in TERMINAL:
        job.completed_at = now
        cancel_tasks(session, job.id, keep=())
        release_slot(session, db, job)
    if announce:
        emit_job_event(session, db, EVENT_OF[to], job, job_resource(job, media_url))
    return True


def fail_job(
    session: Session, db: Database, job: Job, code: str, message: str, media_url: MediaUrl
) -> bool:
    """Fail a locked job with ``code`` and ``message`` (see :func:`move_job`)."""
    return move_job(
        session, db, job, JobStatus.FAILED, media_url=media_url, error=JobError(code, message)
    )


def apply_upstream_result(
    session: Session,
    db: Database,
    job: Job,
    result: UpstreamResult,
    *,
    callback_grace: float,
    job_timeout: float,
    media_url: MediaUrl,
) -> str:
    """Apply one ModelsLab answer to a locked job row; return applied/duplicate/ignored."""
    now = utcnow()
    if result.status == UpstreamStatus.SUCCESS:
        if job.upstream_status == UpstreamStatus.SUCCESS:
            return DUPLICATE
        if not can_move(job, JobStatus.COMPLETED):
            return IGNORED
        _remember_upstream(job, result)
        job.upstream_status = UpstreamStatus.SUCCESS
        job.source_urls = result.output or result.future_links
        job.updated_at = now
        release_slot(session, db, job)  # ModelsLab is done with it; the download is ours
        # Accepted and done at once: processing without an event; job.completed follows
        # once the outputs are stored (a failed-by-timeout job stays failed until then).
        move_job(session, db, job, JobStatus.PROCESSING, media_url=media_url, announce=False)
        cancel_tasks(session, job.id, keep=("download",))
        if not job.source_urls:
            fail_job(
                session,
                db,
                job,
                "upstream_error",
                "ModelsLab reported success without output",
                media_url,
            )
            return APPLIED
        enqueue_task(session, db, "download", job.id, now)
        return APPLIED
    if result.status == UpstreamStatus.FAILED:
        if job.upstream_status == UpstreamStatus.SUCCESS or job.status in TERMINAL:
            return DUPLICATE if job.upstream_status == UpstreamStatus.FAILED else IGNORED
        _remember_upstream(job, result)
        job.upstream_status = UpstreamStatus.FAILED
        fail_job(
            session,
            db,
            job,
            "upstream_error",
            result.message or "ModelsLab reported failure",
            media_url,
        )
        return APPLIED
    if result.status == UpstreamStatus.PROCESSING:
        _remember_upstream(job, result)
        if job.status != JobStatus.QUEUED:
            return DUPLICATE
        job.upstream_status = UpstreamStatus.PROCESSING
        move_job(session, db, job, JobStatus.PROCESSING, media_url=media_url, announce=False)
        # First fetch after eta + grace, but never later than the job's timeout.
        first_fetch = now + timedelta(seconds=(job.eta or 0.0) + callback_grace)
        enqueue_task(session, db, "reconcile", job.id, min(first_fetch, deadline(job, job_timeout)))
        emit_job_event(session, db, "job.processing", job, job_resource(job, media_url))
        return APPLIED
    return IGNORED


def deadline(job: Job, job_timeout: float) -> datetime:
    """When a job that ModelsLab has not finished fails with ``timeout``.

    Counted from the upstream submission: waiting for a slot in motionhook's own
    queue is bounded by ``MOTIONHOOK_QUEUE_TIMEOUT`` instead (``service.capacity``).
    """
    return (job.submitted_at or job.created_at) + timedelta(seconds=job_timeout)


def apply_submit_answer(
    session: Session,
    db: Database,
    job: Job,
    answer: UpstreamAnswer,
    *,
    callback_grace: float,
    job_timeout: float,
    media_url: MediaUrl,
) -> str | None:
    """Apply ModelsLab's answer to a submit; return the outcome, or None to submit again.

    A result is applied like a callback; a rejection fails the job for good; a
    transient problem (429, 5xx, no answer) leaves the job queued for another try
    (bounded by ``MOTIONHOOK_QUEUE_TIMEOUT``, see ``service.capacity``).
    """
    if answer.kind == RESULT and answer.result is not None:
        return apply_upstream_result(
            session,
            db,
            job,
            answer.result,
            callback_grace=callback_grace,
            job_timeout=job_timeout,
            media_url=media_url,
        )
    if job.status != JobStatus.QUEUED:
        return IGNORED  # a callback overtook the answer
    if answer.kind == REJECTED:
        fail_job(session, db, job, "upstream_rejected", answer.message, media_url)
        return APPLIED
    return None


def fail_if_overdue(
    session: Session, db: Database, job: Job, *, job_timeout: float, media_url: MediaUrl
) -> bool:
    """Fail a job still waiting on ModelsLab past its timeout; return whether it failed."""
    if utcnow() < deadline(job, job_timeout):
        return False
    return fail_job(
        session,
        db,
        job,
        "timeout",
        "no result from ModelsLab before MOTIONHOOK_JOB_TIMEOUT",
        media_url,
    )
