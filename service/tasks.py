"""Job tasks: one plain function per kind (submit, download, reconcile), in ``HANDLERS``.

A handler gets a :class:`TaskContext` (the services and clients it needs) and a
:class:`~service.queue.ClaimedTask`. It reads what it needs in a short
transaction, does its slow work (a call to ModelsLab, a download) outside any
transaction, and writes the outcome through the job state machine
(``service.jobs``). The write that follows work done outside the database (a
submit ModelsLab accepted, an output stored) is retried through a database
outage for as long as the task's lease guards it, so the work is not done twice.
The worker runs handlers; it knows nothing of what they do.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import requests
from sqlalchemy.orm import Session

from schemas.upstream import UpstreamStatus
from service.callbacks import callback_url, record_fetch
from service.capacity import claim_submits as claim_submit_tasks
from service.capacity import fail_overdue_in_queue, settle_submit
from service.downloads import DownloadError, download_output, upload_key_for
from service.extension import Services
from service.jobs import (
    apply_submit_answer,
    apply_upstream_result,
    deadline,
    fail_if_overdue,
    fail_job,
    move_job,
)
from service.models import Job, JobStatus, utcnow
from service.observability import register_secrets
from service.projects import job_api_key
from service.queue import ClaimedTask, finish_task, hold_task, retry_task
from service.retry import Schedule
from service.upstream import RESULT, UpstreamClient

log = logging.getLogger("motionhook.tasks")

# Transient upstream trouble and failed downloads are retried until the job's deadlines.
SUBMIT_SCHEDULE = Schedule((1, 2, 5, 10, 30, 60, 120, 300), give_up=False)
DOWNLOAD_SCHEDULE = Schedule((1, 2, 4, 8, 15, 30, 60), give_up=False)
RECONCILE_EVERY = 600.0


@dataclass(frozen=True)
class TaskContext:
    """What task handlers share in one worker process."""

    services: Services
    upstream: UpstreamClient
    outbound: requests.Session

    def write_deadline(self) -> float:
        """Until when a write after outside work may be retried: half the task's lease."""
        return time.monotonic() + self.services.settings.task_lease / 2


def upstream_params(job: Job, services: Services) -> dict[str, Any]:
    """Build the img2video body (without the key) for a job."""
    settings = services.settings
    params = dict(job.input)
    image_key = params.pop("image_key", None)
    if image_key:
        params["init_image"] = services.media_url(image_key)
    params["model_id"] = job.model_id
    params["webhook"] = callback_url(settings.public_url, settings.callback_secret, job.id)
    params["track_id"] = job.id
    return params


def upstream_key(session: Session, job: Job) -> str | None:
    """The ModelsLab key of the job's project, if it has its own (else the instance's is used).

    Made known to the log and Sentry scrubbers of this process before it is sent.
    """
    api_key = job_api_key(session, job.id)
    register_secrets(api_key)
    return api_key


def claim_submits(ctx: TaskContext, owner: str, limit: int) -> list[ClaimedTask]:
    """Fail jobs that waited too long for a slot, then lease submits the cap allows."""
    services = ctx.services
    db, settings = services.db, services.settings
    now = utcnow()
    with db.transaction() as session:
        for job in fail_overdue_in_queue(session, queue_timeout=settings.queue_timeout, now=now):
            fail_job(
                session,
                db,
                job,
                "queue_timeout",
                "waited longer than MOTIONHOOK_QUEUE_TIMEOUT for a free ModelsLab slot",
                services.media_url,
            )
        return claim_submit_tasks(
            session,
            db,
            owner=owner,
            lease=settings.task_lease,
            limit=limit,
            max_queued=settings.modelslab_max_queued,
            now=now,
        )


def submit(ctx: TaskContext, task: ClaimedTask) -> None:
    """Send a queued job to ModelsLab and apply the answer (or schedule another try)."""
    services = ctx.services
    db, settings = services.db, services.settings
    with db.transaction() as session:
        job = session.get(Job, task.job_id)
        if job is None or job.status != JobStatus.QUEUED:
            finish_task(session, task)
            return
        params = upstream_params(job, services)
        api_key = upstream_key(session, job)
    answer = ctx.upstream.submit(params, api_key)
    log.info(
        "submitted upstream",
        extra={"outcome": answer.kind, "http_status": answer.http_status},
    )

    def apply(session: Session) -> None:
        job = session.get(Job, task.job_id, with_for_update=True)
        if job is None:
            finish_task(session, task)
            return
        outcome = apply_submit_answer(
            session,
            db,
            job,
            answer,
            callback_grace=settings.callback_grace,
            job_timeout=settings.job_timeout,
            media_url=services.media_url,
        )
        settle_submit(
            session,
            db,
            job,
            accepted=answer.kind == RESULT,
            rate_limited=answer.http_status == 429,
            retry_after=answer.retry_after,
            max_queued=settings.modelslab_max_queued,
        )
        if answer.result is not None:
            record_fetch(
                session,
                job.id,
                answer.raw,
                outcome or "retry",
                answer.result.status,
                source="submit",
            )
        if outcome is None:
            delay = SUBMIT_SCHEDULE.delay(task.attempts, retry_after=answer.retry_after)
            retry_task(session, task, delay or 0.0, answer.message)
        else:
            finish_task(session, task)

    db.write_until(ctx.write_deadline(), apply)


def download(ctx: TaskContext, task: ClaimedTask) -> None:
    """Store a finished job's outputs durably, then complete the job (``job.completed``)."""
    services = ctx.services
    db, settings = services.db, services.settings
    with db.transaction() as session:
        job = session.get(Job, task.job_id)
        if (
            job is None
            or job.upstream_status != UpstreamStatus.SUCCESS
            or job.status == JobStatus.COMPLETED
        ):
            finish_task(session, task)
            return
        urls = list(job.source_urls)
    outputs: list[dict[str, Any]] = []
    past_deadline = utcnow() - task.created_at > timedelta(seconds=settings.download_deadline)
    # A download may take download_timeout, longer than the claim's lease: hold the task
    # that long before each one, so no other worker starts the same download meanwhile.
    hold = settings.download_timeout + settings.task_lease

    def retry_later(reason: str) -> None:
        delay = DOWNLOAD_SCHEDULE.delay(task.attempts) or 0.0
        with db.transaction() as session:
            retry_task(session, task, delay, reason)

    for index, url in enumerate(urls):
        with db.transaction() as session:
            if not hold_task(session, task, hold):
                return  # our lease ran out and another worker has taken the task over
        try:
            stored = download_output(
                ctx.outbound,
                url,
                services.storage,
                functools.partial(upload_key_for, task.job_id, index),
                max_bytes=settings.max_output_bytes,
                timeout=settings.download_timeout,
            )
        except DownloadError as exc:
            if exc.retryable and not past_deadline:
                retry_later(exc.reason)
                return
            log.error("output not stored", extra={"reason": exc.reason})
            outputs.append({"source_url": url, "error": exc.reason})
            continue
        except Exception as exc:
            # Storage trouble (disk full, S3 down): retry until the deadline like a 404.
            reason = f"storage failed: {type(exc).__name__}"
            log.exception("storing an output failed")
            if past_deadline:
                outputs.append({"source_url": url, "error": reason})
                continue
            retry_later(reason)
            return
        outputs.append(
            {
                "key": stored.key,
                "source_url": url,
                "content_type": stored.content_type,
                "bytes": stored.size,
                "sha256": stored.sha256,
            }
        )

    def complete(session: Session) -> None:
        job = session.get(Job, task.job_id, with_for_update=True)
        if job is not None:
            move_job(
                session,
                db,
                job,
                JobStatus.COMPLETED,
                media_url=services.media_url,
                outputs=outputs,
            )
        finish_task(session, task)

    db.write_until(ctx.write_deadline(), complete)


def reconcile(ctx: TaskContext, task: ClaimedTask) -> None:
    """Ask ModelsLab about a job whose callback is overdue; fail it at its timeout."""
    services = ctx.services
    db, settings = services.db, services.settings
    with db.transaction() as session:
        job = session.get(Job, task.job_id, with_for_update=True)
        if (
            job is None
            or job.status != JobStatus.PROCESSING
            or job.upstream_status == UpstreamStatus.SUCCESS
        ):
            finish_task(session, task)
            return
        if fail_if_overdue(
            session, db, job, job_timeout=settings.job_timeout, media_url=services.media_url
        ):
            return
        upstream_id = job.upstream_id
        due_by = deadline(job, settings.job_timeout)
        api_key = upstream_key(session, job)
    answer = ctx.upstream.fetch(upstream_id, api_key) if upstream_id else None

    def apply(session: Session) -> None:
        job = session.get(Job, task.job_id, with_for_update=True)
        if job is None:
            finish_task(session, task)
            return
        if answer is not None and answer.result is not None:
            outcome = apply_upstream_result(
                session,
                db,
                job,
                answer.result,
                callback_grace=settings.callback_grace,
                job_timeout=settings.job_timeout,
                media_url=services.media_url,
            )
            record_fetch(session, job.id, answer.raw, outcome, answer.result.status, source="fetch")
            log.info(
                "reconciled",
                extra={"outcome": outcome, "upstream_status": answer.result.status},
            )
        if job.status == JobStatus.PROCESSING and job.upstream_status != UpstreamStatus.SUCCESS:
            due = min(utcnow() + timedelta(seconds=RECONCILE_EVERY), due_by)
            delay = max(0.0, (due - utcnow()).total_seconds())
            retry_task(session, task, delay, answer.message if answer else "")
        else:
            finish_task(session, task)

    db.write_until(ctx.write_deadline(), apply)


Handler = Callable[[TaskContext, ClaimedTask], None]
HANDLERS: dict[str, Handler] = {"submit": submit, "download": download, "reconcile": reconcile}
