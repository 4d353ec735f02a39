"""ModelsLab capacity: never more jobs outstanding than an account's queued-request cap.

A ModelsLab account holds only 5, 10 or 15 queued requests (by plan); more get a
429. Capacity is kept per *account*: ``default`` is the instance's key
(``MOTIONHOOK_MODELSLAB_API_KEY``), shared by every project without a key of its
own; a project that brings its own key has its own account (two projects with the
same key share it). A job takes a *slot* of its project's account
(``jobs.upstream_slot_since``, ``jobs.upstream_account``) when a worker claims it
for submission, and gives it back the moment ModelsLab is done with it (its
terminal result is applied: callback, fetch or timeout) or did not take it (a
429, a rejection, a transient error). Claiming locks the accounts'
``upstream_capacity`` rows, so two workers on two machines can never both take
the last slot of an account (SQLite has a single writer anyway).

The cap in force on each account (``effective_cap``) adapts to what ModelsLab
accepts, for an account that another program shares:

1. Normally up to ``effective_cap`` jobs are outstanding (at first, and at most,
   ``MOTIONHOOK_MODELSLAB_MAX_QUEUED``).
2. A 429 pauses every submission to that account until its ``retry_after`` (30 s
   if it names none), and the cap becomes what ModelsLab had accepted: the jobs
   outstanding besides the refused one (at least 1). Other accounts go on.
3. After the pause, one probe goes out; nothing else is submitted to the account
   until ModelsLab has accepted it.
4. While the cap is below the configured one, one submission beyond it goes out
   as a probe, at most once every ``PROBE_EVERY`` × ``retry_after`` (5 minutes
   for ModelsLab's 30 s); each accepted probe raises the cap by one, back up to
   the configured cap. A refused one is rule 2. So an account shared with another
   program sees at most one 429 per ``retry_after`` window, and far fewer once
   the cap has settled on what ModelsLab takes.

Waiting jobs are taken fairly across the projects sharing an account, first in
first out within each: the next slot goes to the project holding the fewest, so
one project's batch of 500 holds back another's single job by at most one slot
turnover. ``MOTIONHOOK_QUEUE_TIMEOUT`` bounds the wait: a job that never reached
ModelsLab fails with ``queue_timeout``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.db import Database
from service.metrics import record_queue_wait
from service.models import Job, JobStatus, Project, Task, UpstreamCapacity, utcnow
from service.queue import ClaimedTask, aware

DEFAULT_ACCOUNT = "default"
DEFAULT_RETRY_AFTER = 30.0
PROBE_EVERY = 10
# Jobs failed for waiting too long, at most this many per claim (the rest: next claim).
QUEUE_TIMEOUT_BATCH = 100


def account_of(api_key: str | None, instance_key: str) -> str | None:
    """Name the ModelsLab account of a project's own key; None for the instance's account.

    A digest, not the key, so the name can sit in every job row and in metrics.
    """
    if not api_key or api_key == instance_key:
        return None
    return "key_" + hashlib.sha256(api_key.encode()).hexdigest()[:32]


def job_account() -> Any:
    """The account a job's slot counts against (needs ``Project`` outer-joined to ``Job``)."""
    # Inline, not a bound parameter: PostgreSQL must see the same expression in GROUP BY.
    return func.coalesce(Project.modelslab_account, literal_column(f"'{DEFAULT_ACCOUNT}'"))


def lock_states(
    session: Session, db: Database, accounts: Iterable[str], max_queued: int
) -> dict[str, UpstreamCapacity]:
    """Load and lock the capacity rows of ``accounts``, creating those not there yet.

    Locked in the order of their names, so two workers never wait on each other in a
    circle; a row two workers create at once is inserted by one, then locked by both.
    """
    names = sorted(set(accounts))
    if not names:
        return {}
    query = (
        select(UpstreamCapacity)
        .where(UpstreamCapacity.account.in_(names))
        .order_by(UpstreamCapacity.account)
    )
    if not db.is_sqlite:
        query = query.with_for_update()
    states = {state.account: state for state in session.scalars(query)}
    missing = [name for name in names if name not in states]
    if missing:
        dialect = sqlite if db.is_sqlite else postgresql
        now = utcnow()
        rows = [
            {"account": name, "effective_cap": max_queued, "probing": False, "updated_at": now}
            for name in missing
        ]
        session.execute(dialect.insert(UpstreamCapacity).values(rows).on_conflict_do_nothing())
        query = query.execution_options(populate_existing=True)
        states = {state.account: state for state in session.scalars(query)}
    return states


def slots_in_use(session: Session, accounts: Iterable[str] | None = None) -> Counter[str]:
    """Slots held now, by account (of ``accounts`` only, when given)."""
    query = select(Job.upstream_account, func.count()).where(Job.upstream_slot_since.is_not(None))
    if accounts is not None:
        query = query.where(Job.upstream_account.in_(list(accounts)))
    return Counter(dict(session.execute(query.group_by(Job.upstream_account)).tuples().all()))


def effective_cap(state: UpstreamCapacity, max_queued: int) -> int:
    return min(state.effective_cap or max_queued, max_queued)


def free_slots(state: UpstreamCapacity, in_use: int, max_queued: int, now: datetime) -> int:
    """How many jobs may be submitted to the account now, probes included (see above)."""
    if state.paused_until is not None and state.paused_until > now:
        return 0
    if state.probing:
        return 0 if state.probe_job_id else 1
    cap = effective_cap(state, max_queued)
    probe_due = state.probe_after is None or state.probe_after <= now
    probe = 1 if cap < max_queued and state.probe_job_id is None and probe_due else 0
    return max(0, cap - in_use + probe)


def finds_no_slot(session: Session, project: Project, position: int, max_queued: int) -> bool:
    """Whether a job of ``project`` at ``position`` in its account's queue waits now.

    A read without locks (the capacity rows are the workers'), good enough to tell a
    chat user; the worker hands out the slots.
    """
    if not max_queued:
        return False
    account = project.modelslab_account or DEFAULT_ACCOUNT
    state = session.scalar(select(UpstreamCapacity).where(UpstreamCapacity.account == account))
    in_use = slots_in_use(session, [account])[account]
    free = max_queued - in_use if state is None else free_slots(state, in_use, max_queued, utcnow())
    return position > free


def _accounts(session: Session) -> list[str]:
    """Every account a job can be submitted on: ``default`` and the projects' own."""
    own = session.scalars(
        select(Project.modelslab_account).where(Project.modelslab_account.is_not(None)).distinct()
    )
    return [DEFAULT_ACCOUNT, *own]


def next_submit_due(session: Session, db: Database, max_queued: int) -> datetime | None:
    """When a submit can next go out: the end of a pause, or the first due submit of an
    account with a free slot; None while every account is full (a release wakes us)."""
    first_due = select(func.min(Task.due_at)).where(Task.kind == "submit")
    if not max_queued:
        return aware(session.scalar(first_due))
    now = utcnow()
    accounts = _accounts(session)
    query = select(UpstreamCapacity).where(UpstreamCapacity.account.in_(accounts))
    states = {state.account: state for state in session.scalars(query)}
    in_use = slots_in_use(session, accounts)
    times: list[datetime] = []
    open_accounts = []
    for name in accounts:
        state = states.get(name)
        if state is not None and state.paused_until is not None and state.paused_until > now:
            times.append(state.paused_until)
        elif state is None or free_slots(state, in_use[name], max_queued, now):
            open_accounts.append(name)
    if open_accounts:
        if len(open_accounts) < len(accounts):
            first_due = (
                first_due.join(Job, Job.id == Task.job_id)
                .outerjoin(Project, Project.id == Job.project_id)
                .where(job_account().in_(open_accounts))
            )
        due = aware(session.scalar(first_due))
        if due is not None:
            times.append(due)
    return min(times, default=None)


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
    """Lease due submit tasks, first in first out, as far as each account's cap allows.

    A job that already holds a slot (its worker died before submitting) takes no
    new one. Returns the leased tasks; their jobs hold slots from now on.
    """
    held = _slots_by_project()
    account = job_account()
    due = (
        select(
            Task.id, Job.created_at, Job.id.label("job_id"), _turn(held), account.label("account")
        )
        .join(Job, Job.id == Task.job_id)
        .outerjoin(Project, Project.id == Job.project_id)
        .outerjoin(held, held.c.project_id == Job.project_id)
        .where(Task.kind == "submit", Task.due_at <= now)
    )
    states: dict[str, UpstreamCapacity] = {}
    in_use: Counter[str] = Counter()
    lines = [(due, limit)]  # no cap: one line for every account
    if max_queued:
        states = lock_states(session, db, _accounts(session), max_queued)
        in_use = slots_in_use(session, states)
        allowed = {}
        for name, state in states.items():
            state.effective_cap = effective_cap(state, max_queued)  # shown by /metrics
            if state.probe_job_id and state.updated_at < now - timedelta(seconds=lease):
                state.probe_job_id = None  # its worker died: the probe's lease has run out
            free = free_slots(state, in_use[name], max_queued, now)
            if free > 0:
                allowed[name] = min(limit, free)
        lines = [(due.where(account == name), free) for name, free in allowed.items()]
    # Round-robin across projects, first in first out within each (see _turn), each
    # account's line up to its free slots. A window function cannot be locked FOR
    # UPDATE: the order is read, then rows locked.
    picks: list[Any] = []
    for query, free in lines:
        line = query.subquery()
        order = (line.c.turn, line.c.created_at, line.c.job_id)
        picks += session.execute(
            select(line.c.id, *order, line.c.account).order_by(*order).limit(free)
        )
    picks = sorted(picks, key=lambda pick: tuple(pick[1:4]))[:limit]
    if not picks:
        return []
    account_of_task = {pick[0]: pick[4] for pick in picks}
    claim = (
        select(Task, Job)
        .join(Job, Job.id == Task.job_id)
        .where(Task.id.in_(list(account_of_task)), Task.due_at <= now)
    )
    if not db.is_sqlite:
        # Both rows, skipping any that another transaction holds: a callback locks the
        # job and then deletes its tasks, so waiting on either here could deadlock.
        claim = claim.with_for_update(of=(Task, Job), skip_locked=True)
    rank = {pick[0]: place for place, pick in enumerate(picks)}
    rows = sorted(session.execute(claim).tuples(), key=lambda row: rank[row[0].id])
    claimed = []
    last_of: dict[str, str] = {}
    for task, job in rows:
        task.due_at = now + timedelta(seconds=lease)
        task.lease_owner = owner
        task.attempts += 1
        if job.upstream_slot_since is None:
            job.upstream_slot_since = now
            job.upstream_account = account_of_task[task.id]
            in_use[job.upstream_account] += 1
            record_queue_wait((now - job.created_at).total_seconds())
        last_of[job.upstream_account] = job.id
        claimed.append(
            ClaimedTask(task.id, task.kind, task.job_id, task.attempts, task.created_at, owner)
        )
    for name, job_id in last_of.items():
        account_state = states.get(name)
        if account_state is not None and (
            account_state.probing or in_use[name] > effective_cap(account_state, max_queued)
        ):
            account_state.probe_job_id = job_id  # the one beyond the cap, or after a pause
            account_state.updated_at = now
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
    """Update slots and the job's account's cap after ModelsLab answered (or did not)."""
    if not accepted:
        release_slot(session, db, job)
    if not max_queued:
        return
    account = job.upstream_account
    state = lock_states(session, db, [account], max_queued)[account]
    was_probe = state.probe_job_id == job.id
    if was_probe:
        state.probe_job_id = None
    now = utcnow()
    if rate_limited:
        state.effective_cap = max(1, slots_in_use(session, [account])[account])
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
    """1-based place of a job among those waiting for a slot of its account; None when
    it is not waiting.

    In the order slots are handed out: round-robin across the account's projects,
    oldest first in each (a job that waits for a retry after a transient error may
    go a little later).
    """
    if job.status != JobStatus.QUEUED or job.upstream_slot_since is not None:
        return None
    held = _slots_by_project()
    account = job_account()
    mine_account = (
        select(account).select_from(Job).outerjoin(Project, Project.id == Job.project_id)
    ).where(Job.id == job.id)
    waiting = (
        select(Job.id, Job.created_at, _turn(held))
        .outerjoin(held, held.c.project_id == Job.project_id)
        .outerjoin(Project, Project.id == Job.project_id)
        .where(
            Job.status == JobStatus.QUEUED,
            Job.upstream_slot_since.is_(None),
            account == mine_account.scalar_subquery(),
        )
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
