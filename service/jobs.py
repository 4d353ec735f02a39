"""Jobs: creation, the resource clients see, and the state machine.

The state machine is written once, here. Every upstream answer (submit
response, callback, fetch) goes through :func:`apply_upstream_result`, which
decides from the job's current state whether the answer moves it forward, is a
duplicate, or is late and ignored.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from schemas.upstream import FAILED, PROCESSING, SUCCESS, UpstreamResult
from service.db import Database
from service.events import emit_job_event
from service.models import Job, Task, new_id, utcnow
from service.queue import cancel_tasks, enqueue_task

QUEUED, RUNNING, COMPLETED, FAILED_STATUS = "queued", "processing", "completed", "failed"

# Which statuses a job may move to from each status; nothing ever moves back.
# A ``failed`` job may still complete, but only when it failed by ``timeout``.
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, COMPLETED, FAILED_STATUS}),
    RUNNING: frozenset({COMPLETED, FAILED_STATUS}),
    FAILED_STATUS: frozenset({COMPLETED}),
    COMPLETED: frozenset(),
}

APPLIED, DUPLICATE, IGNORED = "applied", "duplicate", "ignored"

MediaUrl = Callable[[str], str]


def can_move(job: Job, to: str) -> bool:
    """Say whether the state machine lets ``job`` move to ``to``."""
    if to not in TRANSITIONS[job.status]:
        return False
    return not (job.status == FAILED_STATUS and job.error_code != "timeout")


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
        status=QUEUED,
        model_id=params.pop("model_id", "wan2.2"),
        metadata_=params.pop("metadata", {}) or {},
        webhook_url=params.pop("webhook_url", None),
        webhook_events=params.pop("webhook_events", None),
        input=params,
        idempotency_key=idempotency_key,
        request_fingerprint=fingerprint,
        source_urls=[],
        outputs=[],
        submit_attempts=0,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    enqueue_task(session, db, "submit", job.id, now)
    return job


def job_resource(job: Job, media_url: MediaUrl) -> dict[str, Any]:
    """Render the job as clients see it (DESIGN §3), with fresh durable URLs."""
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
        "upstream": {"id": job.upstream_id, "status": job.upstream_status, "eta": job.eta},
        "outputs": outputs,
        "error": (
            {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None
        ),
    }


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
    if result.eta is not None and job.upstream_status in (None, PROCESSING):
        job.eta = result.eta
    if result.fetch_result and not job.fetch_result:
        job.fetch_result = result.fetch_result


def fail_job(
    session: Session, db: Database, job: Job, code: str, message: str, media_url: MediaUrl
) -> None:
    """Move a job to ``failed``, drop its pending work and emit ``job.failed``."""
    now = utcnow()
    job.status = FAILED_STATUS
    job.error_code = code
    job.error_message = message[:2000]
    job.updated_at = now
    job.completed_at = now
    cancel_tasks(session, job.id, keep=())
    emit_job_event(session, db, "job.failed", job, job_resource(job, media_url))


def complete_job(
    session: Session, db: Database, job: Job, outputs: list[dict[str, Any]], media_url: MediaUrl
) -> None:
    """Move a job to ``completed`` with its stored outputs and emit ``job.completed``."""
    now = utcnow()
    job.status = COMPLETED
    job.outputs = outputs
    job.error_code = None
    job.error_message = None
    job.updated_at = now
    job.completed_at = now
    cancel_tasks(session, job.id, keep=())
    emit_job_event(session, db, "job.completed", job, job_resource(job, media_url))


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
    if result.status == SUCCESS:
        if job.upstream_status == SUCCESS or not can_move(job, COMPLETED):
            return DUPLICATE if job.upstream_status == SUCCESS else IGNORED
        _remember_upstream(job, result)
        job.upstream_status = SUCCESS
        job.source_urls = result.output or result.future_links
        if job.status == QUEUED:
            job.status = RUNNING
        job.updated_at = now
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
    if result.status == FAILED:
        if job.upstream_status == SUCCESS or job.status in (COMPLETED, FAILED_STATUS):
            return DUPLICATE if job.upstream_status == FAILED else IGNORED
        _remember_upstream(job, result)
        job.upstream_status = FAILED
        fail_job(
            session,
            db,
            job,
            "upstream_error",
            result.message or "ModelsLab reported failure",
            media_url,
        )
        return APPLIED
    if result.status == PROCESSING:
        _remember_upstream(job, result)
        if job.status != QUEUED:
            return DUPLICATE
        job.status = RUNNING
        job.upstream_status = PROCESSING
        job.submitted_at = job.submitted_at or now
        job.updated_at = now
        # First fetch after eta + grace, but never later than the job's timeout.
        first_fetch = min(
            now + timedelta(seconds=(job.eta or 0.0) + callback_grace),
            job.created_at + timedelta(seconds=job_timeout),
        )
        enqueue_task(session, db, "reconcile", job.id, first_fetch)
        emit_job_event(session, db, "job.processing", job, job_resource(job, media_url))
        return APPLIED
    return IGNORED


def pending_task_kinds(session: Session, job_id: str) -> list[str]:
    return list(session.scalars(select(Task.kind).where(Task.job_id == job_id)))
