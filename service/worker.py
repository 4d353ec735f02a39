"""The worker: generic machinery that claims work from the database and runs it.

A worker runs :class:`Lane` s, one per kind of work (job tasks, deliveries). A
lane says how to claim a batch, how to run one item, how to hand items back and
when its next item comes due. The runner decides when to claim, runs items on
the lane's thread pool, sleeps until a wake-up (PostgreSQL ``NOTIFY``, a commit
in this process, a finished item, or the next due time), rides out database
outages (one WARNING, capped backoff, work resumes when the database answers)
and stops gracefully on SIGTERM. It knows nothing of what the work does: job
tasks are :mod:`service.tasks`, deliveries :mod:`service.delivery`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

import requests
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from service.capacity import next_submit_due
from service.db import CONNECT_TIMEOUT, WAKEUP_CHANNEL, Database, database_unavailable
from service.delivery import Batch, Deliverer
from service.extension import Services
from service.metrics import HEARTBEAT
from service.models import utcnow
from service.observability import bind, flush_all
from service.outbound import make_session
from service.queue import (
    ClaimedTask,
    claim_tasks,
    next_delivery_due,
    next_task_due,
    release_deliveries,
    release_tasks,
)
from service.tasks import HANDLERS, TaskContext, claim_submits
from service.upstream import UpstreamClient

log = logging.getLogger("motionhook.worker")

T = TypeVar("T")

# Another process's commit cannot wake us on SQLite: look this often (``serve`` needs not).
SQLITE_POLL = 0.05
# Ask the database when work comes due at least this often.
IDLE_WAIT = 1.0


@dataclass(eq=False)
class Lane(Generic[T]):
    """One kind of work: how to claim, run and hand back its items, and how many at once.

    ``claim(n)`` leases up to ``n`` due units of work in a transaction of its own,
    as items of ``size`` units each (a batch of deliveries to one broker is one
    item); ``release(session, items)`` hands leases back (shutdown, or work whose
    transaction failed in an outage); ``next_due(session)`` says when the next
    item comes due. The lane holds at most ``capacity`` units (running or waiting
    for one of its ``threads``) and, while some are held, claims only once
    ``batch`` are free: a claim is a transaction, not worth making per item.
    """

    name: str
    claim: Callable[[int], Sequence[T]]
    run: Callable[[T], None]
    release: Callable[[Session, list[T]], None]
    next_due: Callable[[Session], datetime | None]
    context: Callable[[T], dict[str, str]]
    threads: int
    capacity: int
    batch: int = 1
    size: Callable[[T], int] = lambda _item: 1
    # Releases what the lane's work holds open (connections), once the worker stops.
    close: Callable[[], None] = lambda: None
    pool: ThreadPoolExecutor = field(init=False, repr=False)
    held: dict[Future[None], T] = field(init=False, default_factory=dict, repr=False)
    # Items whose work failed because the database was away: handed back once it is back.
    returned: list[T] = field(init=False, default_factory=list, repr=False)
    # When to look for due items next (time.monotonic()); None: ask the database when.
    check_at: float | None = field(init=False, default=0.0)
    # Units run to the end (successfully or not) since the worker started.
    done: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(self.threads, self.name)

    @property
    def free(self) -> int:
        return self.capacity - sum(map(self.size, self.held.values()))

    @property
    def blocked(self) -> bool:
        """Busy: it waits for finished items (which wake the runner), not for a time."""
        return self.free <= 0 or (self.free < self.batch and bool(self.held))


def job_lanes(services: Services, owner: str) -> list[Lane[Any]]:
    """The lanes of a motionhook worker: submits (within the ModelsLab cap), other job
    tasks (download, reconcile), deliveries."""
    settings = services.settings
    db = services.db
    outbound = make_session(
        allow_private=settings.allow_private_targets,
        per_host=settings.delivery_connections_per_host,
    )
    upstream = UpstreamClient(
        settings.modelslab_base_url,
        settings.modelslab_api_key,
        timeout=settings.upstream_timeout,
        session=requests.Session(),
    )
    context = TaskContext(services, upstream, outbound)
    deliverer = Deliverer(services, outbound, owner)

    def claim(limit: int) -> list[ClaimedTask]:
        with db.transaction() as session:
            return claim_tasks(
                session, db, owner=owner, lease=settings.task_lease, limit=limit, now=utcnow()
            )

    max_queued = settings.modelslab_max_queued
    submits: Lane[ClaimedTask] = Lane(
        "submit",
        claim=lambda limit: claim_submits(context, owner, limit),
        run=lambda task: HANDLERS[task.kind](context, task),
        release=lambda session, items: release_tasks(session, owner, [t.id for t in items]),
        next_due=lambda session: next_submit_due(session, db, max_queued),
        context=lambda task: {"job_id": task.job_id, "track_id": task.job_id},
        # One submit in flight at a time: a 429 then stops the next one from going out.
        threads=1,
        capacity=1,
    )
    tasks: Lane[ClaimedTask] = Lane(
        "task",
        claim=claim,
        run=lambda task: HANDLERS[task.kind](context, task),
        release=lambda session, items: release_tasks(session, owner, [t.id for t in items]),
        next_due=next_task_due,
        context=lambda task: {"job_id": task.job_id, "track_id": task.job_id},
        threads=settings.task_threads,
        capacity=settings.task_threads,
    )
    deliveries: Lane[Batch] = Lane(
        "delivery",
        claim=deliverer.claim,
        run=deliverer.deliver,
        release=lambda session, items: release_deliveries(
            session, owner, [p.delivery_id for batch in items for p in batch]
        ),
        next_due=next_delivery_due,
        context=lambda batch: {"delivery_id": " ".join(p.delivery_id for p in batch)},
        size=len,
        threads=settings.delivery_threads,
        capacity=settings.delivery_threads * 2,
        batch=max(1, settings.delivery_threads // 2),
        close=deliverer.close,
    )
    return [submits, tasks, deliveries]


def new_owner() -> str:
    """A lease owner id unique to this worker: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"


@dataclass(frozen=True)
class DrainReport:
    """What a drain did: items run per lane, leases handed back, and why it ended."""

    ran: dict[str, int]
    released: int
    # True: the time budget ran out while work was still due; False: nothing was left.
    budget_exhausted: bool
    seconds: float


class Worker:
    """Claims and runs the work of its lanes until stopped.

    ``sole_writer`` says every write to an SQLite database comes from this process
    (``motionhook serve``): its commits wake the worker, so it waits for those
    instead of looking every ``SQLITE_POLL``. ``shutdown_grace`` is how long work in
    flight may finish once the worker stops (default ``MOTIONHOOK_SHUTDOWN_GRACE``).
    """

    def __init__(
        self,
        services: Services,
        *,
        lanes: Callable[[Services, str], list[Lane[Any]]] = job_lanes,
        sole_writer: bool = False,
        shutdown_grace: float | None = None,
    ) -> None:
        self.services = services
        self.settings = services.settings
        self.shutdown_grace = (
            self.settings.shutdown_grace if shutdown_grace is None else shutdown_grace
        )
        self.db: Database = services.db
        self.owner = new_owner()
        self.stopping = threading.Event()
        # On SQLite, commits in this process set both events (Database.notify); on
        # PostgreSQL the LISTEN thread sets them for every NOTIFY.
        self.wake = self.db.local_wakeup
        self.notified = self.db.local_commit if self.db.is_sqlite else threading.Event()
        self.lock = threading.Lock()
        self.lanes = lanes(services, self.owner)
        self.abandoned = 0
        self.released = 0
        self.budget_exhausted = False
        self.deadline: float | None = None
        self.polls_sqlite = self.db.is_sqlite and not sole_writer
        # Without LISTEN (a transaction pooler and no direct URL) nothing wakes us: poll.
        self.idle_wait = (
            IDLE_WAIT if self.db.is_sqlite or self.db.listen_url else self.settings.poll_interval
        )

    # -- the main loop -------------------------------------------------

    def run(self, *, once: bool = False, deadline: float | None = None) -> None:
        """Claim and run work until stopped (or, with ``once``, until idle).

        Past ``deadline`` (a ``time.monotonic()``) nothing more is claimed; work in
        flight gets the shutdown grace, then what is still held is handed back.
        """
        self.deadline = deadline
        if self.db.listen_url:
            threading.Thread(target=self._listen, name="listen", daemon=True).start()
        elif not self.db.is_sqlite:
            log.info(
                "no LISTEN (the database URL goes through a transaction pooler and "
                "MOTIONHOOK_DATABASE_LISTEN_URL is not set): polling every %.1f s",
                self.idle_wait,
            )
        elif self.polls_sqlite and not once:
            log.info(
                "SQLite: other processes' commits cannot wake this worker, polling every "
                "%.2f s (motionhook serve wakes up in-process instead)",
                SQLITE_POLL,
            )
        log.info("worker started", extra={"owner": self.owner})
        while not self.stopping.is_set():
            HEARTBEAT.beat()
            if deadline is not None and time.monotonic() >= deadline:
                self.budget_exhausted = True
                break
            try:
                if self._pass(once=once):
                    break
            except Exception as exc:
                if not database_unavailable(exc):
                    raise
                self.stopping.wait(self.db.outage.failed(exc))
                for lane in self.lanes:
                    lane.check_at = 0.0
                continue
            self.db.outage.recovered()
        self._shutdown()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def report(self, started: float) -> DrainReport:
        """What this worker did since ``started`` (a ``time.monotonic()``)."""
        return DrainReport(
            ran={lane.name: lane.done for lane in self.lanes},
            released=self.released,
            budget_exhausted=self.budget_exhausted,
            seconds=round(time.monotonic() - started, 3),
        )

    def _pass(self, *, once: bool) -> bool:
        """Hand back, claim, or wait once; True when ``once`` and nothing is left to do."""
        self._hand_back_returned()
        if self.notified.is_set():
            self.notified.clear()
            for lane in self.lanes:
                lane.check_at = 0.0
        claimed = sum(self._claim(lane) for lane in self.lanes)
        if claimed:
            return False
        if once and not any(lane.held for lane in self.lanes) and self._idle():
            return True
        self._wait()
        return False

    def _claim(self, lane: Lane[Any]) -> int:
        if not self.polls_sqlite and (lane.check_at is None or lane.check_at > time.monotonic()):
            return 0
        with self.lock:
            if lane.blocked:
                return 0
            free = lane.free
        items = lane.claim(free)
        if sum(map(lane.size, items)) < free:
            lane.check_at = None  # drained: ask the database when more comes due
        for item in items:
            self._start(lane, item)
        return len(items)

    def _idle(self) -> bool:
        now = utcnow()
        with self.db.transaction() as session:
            dues = [lane.next_due(session) for lane in self.lanes]
        return all(due is None or due > now for due in dues)

    def _wait(self) -> None:
        """Sleep until work may be claimable: a wake-up, or when the next item comes due.

        The database is asked when the next item comes due only after a lane ran
        dry, not on every pass: under load the loop runs once per finished batch.
        """
        if self.polls_sqlite:
            # Another process's commit cannot signal us on SQLite: look again shortly.
            timeout = SQLITE_POLL
        else:
            now = time.monotonic()
            asking = [lane for lane in self.lanes if lane.check_at is None]
            if asking:
                with self.db.transaction() as session:
                    dues = [(lane, lane.next_due(session)) for lane in asking]
                for lane, due in dues:
                    wait = self.idle_wait
                    if due is not None:
                        wait = min(wait, max(0.0, (due - utcnow()).total_seconds()))
                    lane.check_at = now + wait
            with self.lock:
                ready = [
                    lane.check_at
                    for lane in self.lanes
                    if lane.check_at is not None and not lane.blocked
                ]
            timeout = min([self.idle_wait, *(max(0.0, at - now) for at in ready)])
        if self.deadline is not None:
            timeout = min(timeout, max(0.0, self.deadline - time.monotonic()))
        self.wake.wait(timeout)
        self.wake.clear()

    def _listen(self) -> None:
        """Turn PostgreSQL notifications into wake-ups, reconnecting through outages.

        Its failures count towards the process's outage (one WARNING, shared
        backoff); recovery is the main loop's to declare, once claims work again.
        """
        import psycopg  # PostgreSQL only: SQLite processes never load it

        assert self.db.listen_url is not None, "run starts this thread only with a listen URL"
        conninfo = (
            make_url(self.db.listen_url)
            .set(drivername="postgresql")
            .render_as_string(hide_password=False)
        )
        while not self.stopping.is_set():
            try:
                with psycopg.connect(
                    conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT
                ) as conn:
                    conn.execute(f"LISTEN {WAKEUP_CHANNEL}")
                    # Whatever was notified while we were not listening: look now.
                    self.notified.set()
                    self.wake.set()
                    while not self.stopping.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self.notified.set()
                            self.wake.set()
            except psycopg.Error as exc:
                self.stopping.wait(self.db.outage.failed(exc))

    # -- running items -------------------------------------------------

    def _start(self, lane: Lane[T], item: T) -> None:
        context = lane.context(item)

        def run() -> None:
            with bind(**context):
                lane.run(item)

        with self.lock:
            future = lane.pool.submit(run)
            lane.held[future] = item
        future.add_done_callback(lambda done: self._finished(lane, item, context, done))

    def _finished(
        self, lane: Lane[T], item: T, context: dict[str, str], future: Future[None]
    ) -> None:
        error = None if future.cancelled() else future.exception()
        with self.lock:
            lane.held.pop(future, None)
            lane.done += lane.size(item)
            if error is not None and database_unavailable(error):
                lane.returned.append(item)
            worth_waking = not lane.blocked
        if error is not None:
            if database_unavailable(error):
                # One WARNING per outage; the item is handed back once the database is back.
                self.db.outage.failed(error)
            else:
                with bind(**context):
                    log.error("work failed", exc_info=error, extra={"work_kind": lane.name})
        if worth_waking:
            # Only once a batch can be claimed, not for every item that finishes.
            self.wake.set()

    def _hand_back_returned(self) -> None:
        with self.lock:
            returned = [(lane, lane.returned) for lane in self.lanes if lane.returned]
            for lane in self.lanes:
                lane.returned = []
        if not returned:
            return
        try:
            with self.db.transaction() as session:
                for lane, items in returned:
                    lane.release(session, items)
        except Exception:
            with self.lock:
                for lane, items in returned:
                    lane.returned.extend(items)
            raise
        for lane, _items in returned:
            lane.check_at = 0.0

    def _shutdown(self) -> None:
        """Stop claiming, let in-flight work finish within the grace period, hand back the rest."""
        with self.lock:
            pending = {fut: (lane, item) for lane in self.lanes for fut, item in lane.held.items()}
        cancelled = [pending[fut] for fut in list(pending) if fut.cancel()]
        deadline = time.monotonic() + self.shutdown_grace
        for fut in pending:
            remaining = deadline - time.monotonic()
            if not fut.cancelled() and remaining > 0:
                # Failures were already logged by the done callback.
                with contextlib.suppress(Exception):
                    fut.result(timeout=remaining)
        with self.lock:
            running = [(lane, item) for lane in self.lanes for item in lane.held.values()]
            returned = [(lane, item) for lane in self.lanes for item in lane.returned]
        back: dict[Lane[Any], list[Any]] = {}
        for lane, item in [*cancelled, *running, *returned]:
            back.setdefault(lane, []).append(item)
        try:
            with self.db.transaction() as session:
                for lane, items in back.items():
                    lane.release(session, items)
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            log.warning(
                "could not hand back leases: the database is unavailable; "
                "they come due again when they expire"
            )
        for lane in self.lanes:
            lane.pool.shutdown(wait=False, cancel_futures=True)
            lane.close()
        # Work still running past the grace period was handed back above; its threads
        # may sit in a network call for a while yet, so run_worker must not wait for them.
        self.abandoned = len(running)
        self.released = sum(lane.size(item) for lane, items in back.items() for item in items)
        log.info("worker stopped", extra={"released": self.released})


def drain_due_work(services: Services, *, max_seconds: float | None = None) -> DrainReport:
    """Run due work until none is due or ``max_seconds`` are up; say what was done.

    The budget is the caller's (a request's): at its end, work still in flight is
    handed back at once, without the shutdown grace, and finishes (or not) on its
    thread; its lease is already free for the next drain or worker.
    """
    worker = Worker(services, shutdown_grace=0.0)
    started = time.monotonic()
    worker.run(once=True, deadline=None if max_seconds is None else started + max_seconds)
    return worker.report(started)


def run_worker(
    services: Services, *, drain: bool = False, max_seconds: float | None = None
) -> DrainReport:
    """Run a worker in this process until SIGTERM/SIGINT (exit 0 after a clean stop).

    ``drain``: stop once no work is due, or after ``max_seconds``.
    """
    worker = Worker(services)
    started = time.monotonic()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("stopping on signal", extra={"signal": signum})
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.run(
        once=drain,
        deadline=None if max_seconds is None else started + max_seconds,
    )
    if worker.abandoned:
        # Threads stuck past the deadline would keep the interpreter alive at exit
        # (executor threads are joined); their leases are released: leave now.
        flush_all()
        os._exit(0)
    return worker.report(started)
