"""ModelsLab capacity: never more jobs outstanding than the account's queued-request cap.

A ModelsLab account holds only 5, 10 or 15 queued requests (by plan); more get a
429. A job takes a *slot* (``jobs.upstream_slot_since``) when a worker claims it
for submission, and gives it back the moment ModelsLab is done with it (its
terminal result is applied: callback, fetch or timeout) or did not take it (a
429, a rejection, a transient error). Claiming locks the one
``upstream_capacity`` row, so two workers on two machines can never both take
the last slot (SQLite has a single writer anyway).

The cap in force (``effective_cap``) adapts to what ModelsLab accepts, for an
account that another program shares:

1. Normally up to ``effective_cap`` jobs are outstanding (at first, and at most,
   ``MOTIONHOOK_MODELSLAB_MAX_QUEUED``).
2. A 429 pauses every submission until its ``retry_after`` (30 s if it names
   none), and the cap becomes what ModelsLab had accepted: the jobs outstanding
   besides the refused one (at least 1).
3. After the pause, one probe goes out; nothing else is submitted until
   ModelsLab has accepted it.
4. While the cap is below the configured one, one submission beyond it goes out
   as a probe, at most once every ``PROBE_EVERY`` × ``retry_after`` (5 minutes
   for ModelsLab's 30 s); each accepted probe raises the cap by one, back up to
   the configured cap. A refused one is rule 2. So an account shared with another
   program sees at most one 429 per ``retry_after`` window, and far fewer once
   the cap has settled on what ModelsLab takes.

Waiting jobs are taken fairly across projects, first in first out within each:
the next slot goes to the project holding the fewest, so one project's batch of
500 holds back another's single job by at most one slot turnover.
``MOTIONHOOK_QUEUE_TIMEOUT`` bounds the wait: a job that never reached ModelsLab
fails with ``queue_timeout``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from service.db import Database
from service.metrics import record_queue_wait
from service.models import Job, JobStatus, Task, UpstreamCapacity, utcnow
from service.queue import ClaimedTask, aware

STATE_ID = 1
DEFAULT_RETRY_AFTER = 30.0
PROBE_EVERY = 10
# Jobs failed for waiting too long, at most this many per claim (the rest: next claim).
QUEUE_TIMEOUT_BATCH = 100


def lock_state(session: Session, db: Database, max_queued: int) -> UpstreamCapacity:
    """Load and lock the capacity row (the migration creates it)."""
    query = select(UpstreamCapacity).where(UpstreamCapacity.id == STATE_ID)
    if not db.is_sqlite:
        query = query.with_for_update()
    state = session.scalars(query).first()
    if state is None:  # a schema made without the migration's row
        state = UpstreamCapacity(id=STATE_ID, effective_cap=max_queued, probing=False)
        session.add(state)
    return state


def slots_in_use(session: Session) -> int:
    return (
        session.scalar(
            select(func.count()).select_from(Job).where(Job.upstream_slot_since.is_not(None))
        )
        or 0
    )


def effective_cap(state: UpstreamCapacity, max_queued: int) -> int:
    return min(state.effective_cap or max_queued, max_queued)


def free_slots(state: UpstreamCapacity, in_use: int, max_queued: int, now: datetime) -> int:
    """How many jobs may be submitted now, probes included (see the rules above)."""
    if state.paused_until is not None and state.paused_until > now:
        return 0
    if state.probing:
        return 0 if state.probe_job_id else 1
    cap = effective_cap(state, max_queued)
    probe_due = state.probe_after is None or state.probe_after <= now
    probe = 1 if cap < max_queued and state.probe_job_id is None and probe_due else 0
    return max(0, cap - in_use + probe)


def next_submit_due(session: Session, db: Database, max_queued: int) -> datetime | None:
    """When a submit can next go out: None while every slot is taken (a release wakes us)."""
    if max_queued:
        state = session.get(UpstreamCapacity, STATE_ID)
        now = utcnow()
        if state is not None:
            if state.paused_until is not None and state.paused_until > now:
                return state.paused_until
            if not free_slots(state, slots_in_use(session), max_queued, now):
                return None
    return aware(session.scalar(select(func.min(Task.due_at)).where(Task.kind == "submit")))


def release_slot(session: Session, db: Database, job: Job) -> None:
    """Give back the job's slot, if it holds one, and wake the workers to fill it."""
    if job.upstream_slot_since is not None:
        job.upstream_slot_since = None
        db.notify(session)


def _slots_by_project() -> Any:
    """Slots each project holds now."""
    return (
        select(Job.project_id, func.count().label("held"))
        .where(Job.upstream_slot_since.is_not(None))
        .group_by(Job.project_id)
        .subquery()
    )


def _turn(held: Any) -> Any:
    """A waiting job's turn: its place in its project's line plus the slots the project holds.

    Slots go to the lowest turn, oldest job first: a project with nothing at ModelsLab
    goes before one that holds every slot, however long that one's line is.
    """
    place = func.row_number().over(partition_by=Job.project_id, order_by=(Job.created_at, Job.id))
    return (place + func.coalesce(held.c.held, 0)).label("turn")


def claim_submits(
    session: Session,
    db: Database,
    *,
    owner: str,
    lease: float,
    limit: int,
    max_queued: int,
    now: datetime,
) -> list[ClaimedTask]:
    """Lease due submit tasks, first in first out, as far as the ModelsLab cap allows.

    A job that already holds a slot (its worker died before submitting) takes no
    new one. Returns the leased tasks; their jobs hold slots from now on.
    """
    allowed = limit
    state = None
    in_use = 0
    if max_queued:
        state = lock_state(session, db, max_queued)
        if state.probe_job_id and state.updated_at < now - timedelta(seconds=lease):
            state.probe_job_id = None  # its worker died: the probe's lease has run out
        in_use = slots_in_use(session)
        allowed = min(limit, free_slots(state, in_use, max_queued, now))
    if allowed <= 0:
        return []
    # Round-robin across projects, first in first out within each (see _turn). A
    # window function cannot be locked FOR UPDATE: the order is read, then rows locked.
    held = _slots_by_project()
    due = (
        select(Task.id, Job.created_at, Job.id.label("job_id"), _turn(held))
        .join(Job, Job.id == Task.job_id)
        .outerjoin(held, held.c.project_id == Job.project_id)
        .where(Task.kind == "submit", Task.due_at <= now)
        .subquery()
    )
    order = (due.c.turn, due.c.created_at, due.c.job_id)
    picked = list(session.scalars(select(due.c.id).order_by(*order).limit(allowed)))
    if not picked:
        return []
    query = (
        select(Task, Job)
        .join(Job, Job.id == Task.job_id)
        .where(Task.id.in_(picked), Task.due_at <= now)
    )
    if not db.is_sqlite:
        # Both rows, skipping any that another transaction holds: a callback locks the
        # job and then deletes its tasks, so waiting on either here could deadlock.
        query = query.with_for_update(of=(Task, Job), skip_locked=True)
    rank = {task_id: place for place, task_id in enumerate(picked)}
    rows = sorted(session.execute(query).tuples(), key=lambda row: rank[row[0].id])
    claimed = []
    for task, job in rows:
        task.due_at = now + timedelta(seconds=lease)
        task.lease_owner = owner
        task.attempts += 1
        if job.upstream_slot_since is None:
            job.upstream_slot_since = now
            in_use += 1
            record_queue_wait((now - job.created_at).total_seconds())
        claimed.append(
            ClaimedTask(task.id, task.kind, task.job_id, task.attempts, task.created_at, owner)
        )
    if (
        state is not None
        and claimed
        and (state.probing or in_use > effective_cap(state, max_queued))
    ):
        state.probe_job_id = claimed[-1].job_id  # the one beyond the cap, or after a pause
        state.updated_at = now
    return claimed


def settle_submit(
    session: Session,
    db: Database,
    job: Job,
    *,
    accepted: bool,
    rate_limited: bool,
    retry_after: float | None,
    max_queued: int,
) -> None:
    """Update slots and the cap after ModelsLab answered (or did not answer) a submit."""
    if not accepted:
        release_slot(session, db, job)
    if not max_queued:
        return
    state = lock_state(session, db, max_queued)
    was_probe = state.probe_job_id == job.id
    if was_probe:
        state.probe_job_id = None
    now = utcnow()
    if rate_limited:
        state.effective_cap = max(1, slots_in_use(session))
        pause = retry_after or DEFAULT_RETRY_AFTER
        state.paused_until = now + timedelta(seconds=pause)
        state.probe_after = now + timedelta(seconds=pause * PROBE_EVERY)
        state.probing = True
        state.probe_job_id = None
    elif accepted and was_probe:
        if state.probing:
            state.probing = False
        else:
            state.effective_cap = min(max_queued, effective_cap(state, max_queued) + 1)
    state.updated_at = now


def fail_overdue_in_queue(
    session: Session, *, queue_timeout: float, now: datetime, limit: int = QUEUE_TIMEOUT_BATCH
) -> list[Job]:
    """Lock and return queued jobs that never reached ModelsLab within the queue timeout."""
    cutoff = now - timedelta(seconds=queue_timeout)
    query = (
        select(Job)
        .where(
            Job.status == JobStatus.QUEUED,
            Job.submitted_at.is_(None),
            Job.upstream_slot_since.is_(None),
            Job.created_at < cutoff,
        )
        .order_by(Job.created_at)
        .limit(limit)
    )
    return list(session.scalars(query.with_for_update(skip_locked=True)))


def queue_position(session: Session, job: Job) -> int | None:
    """1-based place of a job among those waiting for a slot; None when it is not waiting.

    In the order slots are handed out: round-robin across projects, oldest first in
    each (a job that waits for a retry after a transient error may go a little later).
    """
    if job.status != JobStatus.QUEUED or job.upstream_slot_since is not None:
        return None
    held = _slots_by_project()
    waiting = (
        select(Job.id, Job.created_at, _turn(held))
        .outerjoin(held, held.c.project_id == Job.project_id)
        .where(Job.status == JobStatus.QUEUED, Job.upstream_slot_since.is_(None))
        .subquery()
    )
    mine = select(waiting.c.turn).where(waiting.c.id == job.id).scalar_subquery()
    ahead = session.scalar(
        select(func.count())
        .select_from(waiting)
        .where(
            (waiting.c.turn < mine)
            | and_(waiting.c.turn == mine, waiting.c.created_at < job.created_at)
            | and_(
                waiting.c.turn == mine,
                waiting.c.created_at == job.created_at,
                waiting.c.id < job.id,
            )
        )
    )
    return (ahead or 0) + 1
