"""Expiry: delete old raw callbacks, delivery response bodies and (optionally) stored media.

``prune`` is safe to run while web and worker run: every batch is its own short
transaction, so neither engine holds locks for long, and storage I/O never
happens inside a transaction. Every step is idempotent; a run that is
interrupted just leaves work for the next run.

What goes:

- ``callbacks`` rows received before the cutoff (the raw audit log of callbacks,
  submit and fetch answers).
- The ``response_excerpt`` of delivery attempts made before the cutoff. The
  attempt rows themselves stay: they are the small, structured history that
  ``GET /v1/deliveries/{id}`` shows (time, status, latency, error), while the
  excerpt is the bulk of the row and the only part holding a receiver's words.
- With ``include_media``: the stored outputs and uploaded input image of jobs
  that finished before the cutoff. Objects are deleted first, then the job is
  marked (``key`` removed, ``pruned_at`` set), so its resource shows
  ``stored: false`` and no URL; a crash in between only repeats the deletes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, cast, delete, func, select, update

from service.db import Database
from service.jobs import isoformat
from service.models import CallbackRecord, DeliveryAttempt, Job, JobStatus, utcnow
from service.storage import Storage

log = logging.getLogger("motionhook.prune")

DEFAULT_BATCH_SIZE = 500
FINISHED = (JobStatus.COMPLETED, JobStatus.FAILED)
# Cheap prefilters on the JSON text (the same on both engines); Python checks again.
HAS_OUTPUT_KEY = '%"key":%'
HAS_IMAGE_KEY = '%"image_key":%'


@dataclass
class PruneReport:
    """What one run deleted (or, with ``dry_run``, would delete)."""

    cutoff: datetime
    dry_run: bool = False
    callbacks_deleted: int = 0
    attempt_bodies_cleared: int = 0
    media_jobs_pruned: int = 0
    media_objects_deleted: int = 0
    media_failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "cutoff": isoformat(self.cutoff),
            "dry_run": self.dry_run,
            "callbacks_deleted": self.callbacks_deleted,
            "attempt_bodies_cleared": self.attempt_bodies_cleared,
            "media_jobs_pruned": self.media_jobs_pruned,
            "media_objects_deleted": self.media_objects_deleted,
            "media_failures": self.media_failures,
        }


def prune(
    db: Database,
    storage: Storage,
    *,
    older_than: timedelta,
    include_media: bool,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dry_run: bool = False,
    now: datetime | None = None,
) -> PruneReport:
    """Delete what is older than ``older_than``, in batches of ``batch_size`` rows."""
    if older_than <= timedelta(0):
        raise ValueError("older_than must be positive")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    cutoff = (now or utcnow()) - older_than
    report = PruneReport(cutoff=cutoff, dry_run=dry_run)
    if dry_run:
        _count(db, storage, report, include_media=include_media, batch_size=batch_size)
    else:
        report.callbacks_deleted = _delete_callbacks(db, cutoff, batch_size)
        report.attempt_bodies_cleared = _clear_attempt_bodies(db, cutoff, batch_size)
        if include_media:
            _prune_media(db, storage, report, batch_size)
    log.info("pruned", extra=report.as_dict())
    return report


def _delete_callbacks(db: Database, cutoff: datetime, batch_size: int) -> int:
    total = 0
    while True:
        with db.transaction() as session:
            ids = list(
                session.scalars(
                    select(CallbackRecord.id)
                    .where(CallbackRecord.received_at < cutoff)
                    .order_by(CallbackRecord.id)
                    .limit(batch_size)
                )
            )
            if ids:
                session.execute(delete(CallbackRecord).where(CallbackRecord.id.in_(ids)))
        total += len(ids)
        if len(ids) < batch_size:
            return total


def _clear_attempt_bodies(db: Database, cutoff: datetime, batch_size: int) -> int:
    total = 0
    while True:
        with db.transaction() as session:
            ids = list(
                session.scalars(
                    select(DeliveryAttempt.id)
                    .where(
                        DeliveryAttempt.attempted_at < cutoff,
                        DeliveryAttempt.response_excerpt.is_not(None),
                    )
                    .order_by(DeliveryAttempt.id)
                    .limit(batch_size)
                )
            )
            if ids:
                session.execute(
                    update(DeliveryAttempt)
                    .where(DeliveryAttempt.id.in_(ids))
                    .values(response_excerpt=None)
                )
        total += len(ids)
        if len(ids) < batch_size:
            return total


@dataclass(frozen=True)
class _MediaJob:
    """A finished job's stored objects, read in one short transaction."""

    job_id: str
    output_keys: tuple[str, ...]
    image_key: str | None

    @property
    def keys(self) -> tuple[str, ...]:
        return self.output_keys + ((self.image_key,) if self.image_key else ())


def _media_of(job_id: str, outputs: Any, job_input: Any) -> _MediaJob | None:
    output_keys = tuple(
        str(item["key"]) for item in outputs or [] if isinstance(item, dict) and item.get("key")
    )
    image_key = job_input.get("image_key") if isinstance(job_input, dict) else None
    if not output_keys and not image_key:
        return None
    return _MediaJob(job_id, output_keys, str(image_key) if image_key else None)


def _old_media_batches(
    db: Database, cutoff: datetime, batch_size: int
) -> Iterator[list[_MediaJob]]:
    """Yield finished jobs with stored media, keyset-paginated by id."""
    after = ""
    while True:
        with db.transaction() as session:
            rows = session.execute(
                select(Job.id, Job.outputs, Job.input)
                .where(
                    Job.status.in_(FINISHED),
                    Job.completed_at < cutoff,
                    Job.id > after,
                    cast(Job.outputs, String).like(HAS_OUTPUT_KEY)
                    | cast(Job.input, String).like(HAS_IMAGE_KEY),
                )
                .order_by(Job.id)
                .limit(batch_size)
            ).all()
        if not rows:
            return
        after = rows[-1].id
        media = [_media_of(row.id, row.outputs, row.input) for row in rows]
        yield [item for item in media if item is not None]
        if len(rows) < batch_size:
            return


def _storage_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError,)
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return errors
    return (*errors, BotoCoreError, ClientError)


def _prune_media(db: Database, storage: Storage, report: PruneReport, batch_size: int) -> None:
    storage_errors = _storage_errors()
    for batch in _old_media_batches(db, report.cutoff, batch_size):
        deleted: list[_MediaJob] = []
        for media in batch:
            try:
                for key in media.keys:
                    storage.delete(key)
            except storage_errors:
                log.exception("could not delete stored media", extra={"job_id": media.job_id})
                report.media_failures += 1
                continue
            deleted.append(media)
            report.media_objects_deleted += len(media.keys)
        if deleted:
            report.media_jobs_pruned += _mark_pruned(db, deleted, report.cutoff)


def _mark_pruned(db: Database, batch: list[_MediaJob], cutoff: datetime) -> int:
    """Forget the deleted keys on each job, so its resource shows ``stored: false``."""
    now = utcnow()
    marked = 0
    with db.transaction() as session:
        for media in batch:
            job = session.get(Job, media.job_id, with_for_update=True)
            if job is None or job.completed_at is None or job.completed_at >= cutoff:
                continue  # gone, or finished again (a late success) since it was read
            gone = set(media.keys)
            outputs = []
            for item in job.outputs or []:
                if isinstance(item, dict) and item.get("key") in gone:
                    item = {k: v for k, v in item.items() if k != "key"}
                    item["pruned_at"] = isoformat(now)
                outputs.append(item)
            # New objects: plain JSON columns only notice assignment, not mutation.
            job.outputs = outputs
            if job.input.get("image_key") in gone:
                job.input = {k: v for k, v in job.input.items() if k != "image_key"}
            job.updated_at = now
            marked += 1
    return marked


def _count(
    db: Database, storage: Storage, report: PruneReport, *, include_media: bool, batch_size: int
) -> None:
    """Fill ``report`` with what a real run would delete, changing nothing."""
    del storage  # a dry run never touches storage
    with db.transaction() as session:
        report.callbacks_deleted = int(
            session.scalar(
                select(func.count())
                .select_from(CallbackRecord)
                .where(CallbackRecord.received_at < report.cutoff)
            )
            or 0
        )
        report.attempt_bodies_cleared = int(
            session.scalar(
                select(func.count())
                .select_from(DeliveryAttempt)
                .where(
                    DeliveryAttempt.attempted_at < report.cutoff,
                    DeliveryAttempt.response_excerpt.is_not(None),
                )
            )
            or 0
        )
    if include_media:
        for batch in _old_media_batches(db, report.cutoff, batch_size):
            report.media_jobs_pruned += len(batch)
            report.media_objects_deleted += sum(len(media.keys) for media in batch)
