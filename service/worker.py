"""The worker: claims due work from the database and does every slow thing.

One main thread claims work; two thread pools run it: job tasks (submit
upstream, download outputs, reconcile missed callbacks) and deliveries. The
main thread sleeps until PostgreSQL ``NOTIFY`` (or, on SQLite, a short poll)
says there is work, or until the next row comes due.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import signal
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import requests

from schemas.upstream import SUCCESS, UpstreamResult
from service.callbacks import record_fetch
from service.db import WAKEUP_CHANNEL, Database
from service.extension import Services
from service.jobs import (
    COMPLETED,
    QUEUED,
    RUNNING,
    apply_upstream_result,
    complete_job,
    fail_job,
)
from service.metrics import HEARTBEAT
from service.models import Job, Task, utcnow
from service.observability import bind, flush_all
from service.queue import claim_tasks, next_due, next_due_by_queue, release_claims
from service.upstream import REJECTED, RESULT, UpstreamClient

log = logging.getLogger("motionhook.worker")

SUBMIT_BACKOFF = (1, 2, 5, 10, 30, 60, 120, 300)
DOWNLOAD_BACKOFF = (1, 2, 4, 8, 15, 30, 60)
RECONCILE_EVERY = 600.0
SQLITE_POLL = 0.05
IDLE_WAIT = 1.0


def backoff(schedule: tuple[float, ...], attempt: int, retry_after: float | None = None) -> float:
    """Delay before retry number ``attempt`` (1-based), with ±20% jitter."""
    base = schedule[min(attempt, len(schedule)) - 1] * random.uniform(0.8, 1.2)
    return max(base, retry_after or 0.0)


def work_context(kind: str, item: Any) -> dict[str, str]:
    """Log and error context of a work item: the job of a task, the id of a delivery."""
    if kind == "task":
        return {"job_id": item[2], "track_id": item[2]}
    return {"delivery_id": str(item)}


def upstream_params(job: Job, services: Services) -> dict[str, Any]:
    """Build the img2video body (without the key) for a job."""
    from service.callbacks import callback_url

    settings = services.settings
    params = dict(job.input)
    image_key = params.pop("image_key", None)
    if image_key:
        params["init_image"] = services.media_url(image_key)
    params["model_id"] = job.model_id
    params["webhook"] = callback_url(settings.public_url, settings.callback_secret, job.id)
    params["track_id"] = job.id
    return params


class Worker:
    """Claims and runs tasks and deliveries until stopped."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.settings = services.settings
        self.db: Database = services.db
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
        self.stopping = threading.Event()
        # On SQLite, commits in this process set the same event (Database.notify).
        self.wake = self.db.local_wakeup
        self.upstream = UpstreamClient(
            self.settings.modelslab_base_url,
            self.settings.modelslab_api_key,
            timeout=self.settings.upstream_timeout,
            session=requests.Session(),
        )
        from service.outbound import make_session

        self.outbound = make_session(
            allow_private=self.settings.allow_private_targets,
            per_host=self.settings.delivery_connections_per_host,
        )
        self.task_pool = ThreadPoolExecutor(self.settings.task_threads, "task")
        self.delivery_pool = ThreadPoolExecutor(self.settings.delivery_threads, "delivery")
        self.task_slots = threading.BoundedSemaphore(self.settings.task_threads)
        self.delivery_slots = threading.BoundedSemaphore(self.settings.delivery_threads * 2)
        self.in_flight: dict[Future[None], tuple[str, Any]] = {}
        self.lock = threading.Lock()
        # When to look at each queue next (monotonic; None: nothing was due, ask the
        # database when something will be). A NOTIFY means new work: look at once.
        self.check_at: dict[str, float | None] = {"task": 0.0, "delivery": 0.0}
        self.blocked = {"task": False, "delivery": False}
        self.notified = threading.Event()
        self.deliveries_in_flight = 0
        # Claim deliveries once at most this many are in flight (a batch's worth free).
        self.delivery_refill_at = self.settings.delivery_threads * 2 - max(
            1, self.settings.delivery_threads // 2
        )
        self.abandoned = 0
        from service.delivery import Deliverer

        self.deliverer = Deliverer(services, self.outbound, self.owner)

    # -- the main loop -------------------------------------------------

    def run(self, *, once: bool = False) -> None:
        """Claim and run work until stopped (or, with ``once``, until idle)."""
        if not self.db.is_sqlite:
            threading.Thread(target=self._listen, name="listen", daemon=True).start()
        log.info("worker started", extra={"owner": self.owner})
        while not self.stopping.is_set():
            HEARTBEAT.beat()
            if self.notified.is_set():
                self.notified.clear()
                self.check_at = {"task": 0.0, "delivery": 0.0}
            claimed = self._claim_tasks() + self._claim_deliveries()
            if claimed:
                continue
            if once and not self.in_flight and self._idle():
                break
            self._wait()
        self._shutdown()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def _idle(self) -> bool:
        with self.db.transaction() as session:
            due = next_due(session)
        return due is None or due > utcnow()

    def _wait(self) -> None:
        """Sleep until work may be claimable: a wake-up, or when the next row comes due.

        The database is asked when the next row comes due only after a queue ran dry,
        not on every pass: under load the loop runs once per finished delivery.
        """
        now = time.monotonic()
        if self.db.is_sqlite or None in self.check_at.values():
            with self.db.transaction() as session:
                due = next_due_by_queue(session)
            for kind, at in self.check_at.items():
                if at is None or self.db.is_sqlite:
                    wait, when = IDLE_WAIT, due[kind]
                    if when is not None:
                        wait = min(wait, max(0.0, (when - utcnow()).total_seconds()))
                    self.check_at[kind] = now + wait
        # A queue whose slots are all busy waits for a finished item (which wakes us).
        ready = [
            at for kind, at in self.check_at.items() if at is not None and not self.blocked[kind]
        ]
        timeout = min([IDLE_WAIT, *(max(0.0, at - now) for at in ready)])
        if self.db.is_sqlite:
            # Another process's commit cannot signal us on SQLite: poll briefly.
            timeout = min(timeout, SQLITE_POLL)
        self.wake.wait(timeout)
        self.wake.clear()

    def _due_now(self, kind: str) -> bool:
        if self.db.is_sqlite:
            return True  # no notifications between processes: always look
        at = self.check_at[kind]
        return at is not None and at <= time.monotonic()

    def _listen(self) -> None:
        """Turn PostgreSQL notifications into wake-ups (reconnecting on failure)."""
        import psycopg

        conninfo = self.db.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        while not self.stopping.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute(f"LISTEN {WAKEUP_CHANNEL}")
                    self.wake.set()
                    self.notified.set()
                    self.wake.set()
                    while not self.stopping.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self.notified.set()
                            self.wake.set()
            except psycopg.Error:
                log.warning("lost the LISTEN connection; reconnecting")
                self.stopping.wait(1.0)

    def _claim(self, slots: threading.BoundedSemaphore, limit: int) -> int:
        free = 0
        while free < limit and slots.acquire(blocking=False):
            free += 1
        return free

    def _claim_tasks(self) -> int:
        self.blocked["task"] = False
        if not self._due_now("task"):
            return 0
        free = self._claim(self.task_slots, self.settings.task_threads)
        if not free:
            self.blocked["task"] = True
            return 0
        with self.db.transaction() as session:
            tasks = claim_tasks(
                session,
                self.db,
                owner=self.owner,
                lease=self.settings.task_lease,
                limit=free,
                now=utcnow(),
            )
            claimed = [
                (task.id, task.kind, task.job_id, task.attempts, task.created_at) for task in tasks
            ]
        for _ in range(free - len(claimed)):
            self.task_slots.release()
        if len(claimed) < free:
            self.check_at["task"] = None
        for item in claimed:
            self._start(self.task_pool, self.task_slots, "task", item, self._run_task)
        return len(claimed)

    def _claim_deliveries(self) -> int:
        self.blocked["delivery"] = False
        if not self._due_now("delivery"):
            return 0
        slots = self.settings.delivery_threads * 2
        free = self._claim(self.delivery_slots, slots)
        if free < slots and free < slots - self.delivery_refill_at:
            # Deliveries are in flight: claim in batches when more slots are free, as a
            # claim is a transaction (one per finished delivery would cost more than it).
            for _ in range(free):
                self.delivery_slots.release()
            self.blocked["delivery"] = True
            return 0
        # Claimed and prepared in one transaction; see Deliverer.claim.
        ids = self.deliverer.claim(free)
        for _ in range(free - len(ids)):
            self.delivery_slots.release()
        if len(ids) < free:
            self.check_at["delivery"] = None
        for delivery_id in ids:
            self._start(
                self.delivery_pool,
                self.delivery_slots,
                "delivery",
                delivery_id,
                self.deliverer.deliver,
            )
        return len(ids)

    def _start(
        self,
        pool: ThreadPoolExecutor,
        slots: threading.BoundedSemaphore,
        kind: str,
        item: Any,
        fn: Any,
    ) -> None:
        context = work_context(kind, item)

        def run(value: Any) -> None:
            with bind(**context):
                fn(value)

        future: Future[None] = pool.submit(run, item)
        with self.lock:
            self.in_flight[future] = (kind, item)
            if kind == "delivery":
                self.deliveries_in_flight += 1

        def done(fut: Future[None]) -> None:
            with self.lock:
                self.in_flight.pop(fut, None)
                if kind == "delivery":
                    self.deliveries_in_flight -= 1
                    # Wake the claim loop only once a batch can be claimed (see
                    # _claim_deliveries), not for every delivery that finishes.
                    worth_waking = self.deliveries_in_flight <= self.delivery_refill_at
                else:
                    worth_waking = True
            slots.release()
            if not fut.cancelled() and fut.exception() is not None:
                with bind(**context):
                    log.error(
                        "work failed",
                        exc_info=fut.exception(),
                        extra={"work_kind": kind, "item": str(item)[:80]},
                    )
            if worth_waking:
                self.wake.set()

        future.add_done_callback(done)

    def _shutdown(self) -> None:
        """Stop claiming, let in-flight work finish within the grace period, hand back the rest."""
        with self.lock:
            pending = dict(self.in_flight)
        not_started = {fut: item for fut, item in pending.items() if fut.cancel()}
        deadline = time.monotonic() + self.settings.shutdown_grace
        for fut in pending:
            if fut in not_started:
                continue
            remaining = deadline - time.monotonic()
            if remaining > 0:
                # Failures were already logged by the done callback.
                with contextlib.suppress(Exception):
                    fut.result(timeout=remaining)
        with self.lock:
            unfinished = dict(self.in_flight)
        handed_back = {**not_started, **unfinished}
        task_ids = [item[0] for kind, item in handed_back.values() if kind == "task"]
        delivery_ids = [item for kind, item in handed_back.values() if kind == "delivery"]
        with self.db.transaction() as session:
            release_claims(session, self.owner, task_ids, delivery_ids)
        self.task_pool.shutdown(wait=False, cancel_futures=True)
        self.delivery_pool.shutdown(wait=False, cancel_futures=True)
        self.deliverer.close()
        # Work still running past the grace period was handed back above; its threads
        # may sit in a network call for a while yet, so run_worker must not wait for them.
        self.abandoned = len(unfinished)
        log.info("worker stopped", extra={"released": len(task_ids) + len(delivery_ids)})

    # -- job tasks -----------------------------------------------------

    def _run_task(self, item: tuple[int, str, str, int, datetime]) -> None:
        task_id, kind, job_id, attempts, created_at = item
        handler = {
            "submit": self._submit,
            "download": self._download,
            "reconcile": self._reconcile,
        }[kind]
        handler(task_id, job_id, attempts, created_at)

    def _owned_task(self, session: Any, task_id: int) -> Task | None:
        task = session.get(Task, task_id)
        return task if task is not None and task.lease_owner == self.owner else None

    def _finish_task(self, session: Any, task_id: int) -> None:
        task = self._owned_task(session, task_id)
        if task is not None:
            session.delete(task)

    def _retry_task(self, session: Any, task_id: int, delay: float, error: str) -> None:
        task = self._owned_task(session, task_id)
        if task is not None:
            task.due_at = utcnow() + timedelta(seconds=delay)
            task.lease_owner = None
            task.last_error = error[:1000]

    def _apply_answer(
        self, session: Any, job: Job, result: UpstreamResult, raw: bytes, *, source: str
    ) -> str:
        """Apply a submit or fetch answer to a locked job and keep it in the audit log."""
        outcome = apply_upstream_result(
            session,
            self.db,
            job,
            result,
            callback_grace=self.settings.callback_grace,
            job_timeout=self.settings.job_timeout,
            media_url=self.services.media_url,
        )
        record_fetch(session, job.id, raw, outcome, result.status, source=source)
        return outcome

    def _submit(self, task_id: int, job_id: str, attempts: int, _created: datetime) -> None:
        media_url = self.services.media_url
        with self.db.transaction() as session:
            job = session.get(Job, job_id)
            if job is None or job.status != QUEUED:
                self._finish_task(session, task_id)
                return
            params = upstream_params(job, self.services)
        answer = self.upstream.submit(params)
        log.info(
            "submitted upstream",
            extra={
                "job_id": job_id,
                "track_id": job_id,
                "outcome": answer.kind,
                "http_status": answer.http_status,
            },
        )
        with self.db.transaction() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                return
            job.submit_attempts = attempts
            if answer.kind == RESULT and answer.result is not None:
                self._apply_answer(session, job, answer.result, answer.raw, source="submit")
                self._finish_task(session, task_id)
            elif answer.kind == REJECTED:
                if job.status == QUEUED:
                    fail_job(session, self.db, job, "upstream_rejected", answer.message, media_url)
                self._finish_task(session, task_id)
            elif job.status != QUEUED:
                self._finish_task(session, task_id)
            elif utcnow() - job.created_at > timedelta(seconds=self.settings.job_timeout):
                fail_job(
                    session,
                    self.db,
                    job,
                    "timeout",
                    f"ModelsLab could not take the job in time: {answer.message}",
                    media_url,
                )
            else:
                delay = backoff(SUBMIT_BACKOFF, attempts, answer.retry_after)
                self._retry_task(session, task_id, delay, answer.message)

    def _download(self, task_id: int, job_id: str, attempts: int, created: datetime) -> None:
        from service.downloads import DownloadError, download_output, upload_key_for

        with self.db.transaction() as session:
            job = session.get(Job, job_id)
            if job is None or job.upstream_status != SUCCESS or job.status == COMPLETED:
                self._finish_task(session, task_id)
                return
            urls = list(job.source_urls)
        outputs: list[dict[str, Any]] = []
        past_deadline = utcnow() - created > timedelta(seconds=self.settings.download_deadline)
        for index, url in enumerate(urls):
            # A download may take download_timeout, longer than the claim's lease: hold the
            # task for that long, so no other worker starts the same download meanwhile.
            with self.db.transaction() as session:
                task = self._owned_task(session, task_id)
                if task is None:
                    return  # our lease ran out and another worker has taken the task over
                hold = self.settings.download_timeout + self.settings.task_lease
                task.due_at = utcnow() + timedelta(seconds=hold)
            try:
                stored = download_output(
                    self.outbound,
                    url,
                    self.services.storage,
                    functools.partial(upload_key_for, job_id, index),
                    max_bytes=self.settings.max_output_bytes,
                    timeout=self.settings.download_timeout,
                )
            except DownloadError as exc:
                if exc.retryable and not past_deadline:
                    with self.db.transaction() as session:
                        self._retry_task(
                            session, task_id, backoff(DOWNLOAD_BACKOFF, attempts), exc.reason
                        )
                    return
                log.error("output not stored", extra={"job_id": job_id, "reason": exc.reason})
                outputs.append({"source_url": url, "error": exc.reason})
                continue
            except Exception as exc:
                # Storage trouble (disk full, S3 down): retry until the deadline like a 404.
                reason = f"storage failed: {type(exc).__name__}"
                log.exception("storing an output failed", extra={"job_id": job_id})
                if past_deadline:
                    outputs.append({"source_url": url, "error": reason})
                    continue
                with self.db.transaction() as session:
                    self._retry_task(session, task_id, backoff(DOWNLOAD_BACKOFF, attempts), reason)
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
        with self.db.transaction() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is not None and job.status != COMPLETED:
                complete_job(session, self.db, job, outputs, self.services.media_url)
            self._finish_task(session, task_id)

    def _reconcile(self, task_id: int, job_id: str, _attempts: int, _created: datetime) -> None:
        media_url = self.services.media_url
        timeout = timedelta(seconds=self.settings.job_timeout)
        with self.db.transaction() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.status != RUNNING or job.upstream_status == SUCCESS:
                self._finish_task(session, task_id)
                return
            if utcnow() >= job.created_at + timeout:
                fail_job(
                    session,
                    self.db,
                    job,
                    "timeout",
                    "no result from ModelsLab before MOTIONHOOK_JOB_TIMEOUT",
                    media_url,
                )
                return
            upstream_id = job.upstream_id
            deadline = job.created_at + timeout
        answer = self.upstream.fetch(upstream_id) if upstream_id else None
        with self.db.transaction() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                return
            if answer is not None and answer.result is not None:
                outcome = self._apply_answer(
                    session, job, answer.result, answer.raw, source="fetch"
                )
                log.info(
                    "reconciled",
                    extra={
                        "job_id": job_id,
                        "outcome": outcome,
                        "upstream_status": answer.result.status,
                    },
                )
            if job.status == RUNNING and job.upstream_status != SUCCESS:
                due = min(utcnow() + timedelta(seconds=RECONCILE_EVERY), deadline)
                delay = max(0.0, (due - utcnow()).total_seconds())
                self._retry_task(session, task_id, delay, answer.message if answer else "")
            else:
                self._finish_task(session, task_id)


def run_worker(services: Services, *, once: bool = False) -> None:
    """Run a worker in this process until SIGTERM/SIGINT (exit 0 after a clean stop)."""
    worker = Worker(services)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("stopping on signal", extra={"signal": signum})
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.run(once=once)
    if worker.abandoned:
        # Threads stuck past the deadline would keep the interpreter alive at exit
        # (executor threads are joined); their leases are released: leave now.
        flush_all()
        os._exit(0)
