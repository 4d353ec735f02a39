"""End to end: the PostgreSQL server crashes under load and comes back.

A private cluster (``tests/pgcluster.py``) carries a real stack: the simulator,
gunicorn ``web`` and ``motionhook worker``. Clients keep submitting, a webhook
subscription receives every event at a local sink, and the server is crashed with
``pg_ctl stop -m immediate`` while jobs and deliveries are in flight, then started
again. What must hold: the worker never exits; ``/readyz`` says 503 during the
outage and 200 after; submissions during it get 503 with ``Retry-After`` (never a
500); a ModelsLab callback that hits the outage gets 503 and reconciliation (the
fetch fallback) completes its job; every job answered 202 completes and is notified
exactly once, counted at the sink by ``webhook-id``. The second test checks what an
operator sees of an outage in web: one WARNING per outage, nothing in Sentry.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine, text

from service.api.errors import DATABASE_UNAVAILABLE, RETRY_AFTER_SECONDS
from service.callbacks import callback_token
from service.db import normalize_url
from service.devstack import Stack
from tests.conftest import CALLBACK_SECRET, eventually
from tests.pgcluster import PgCluster, pg_cluster  # noqa: F401 - the fixture
from tests.sinks import Sink
from tests.test_e2e_core import SMALL_VIDEO
from tests.test_e2e_core import STACK_ENV as CORE_STACK_ENV
from tests.test_sentry import Ingest, ingest  # noqa: F401 - the fixture

pytestmark = pytest.mark.e2e

STACK_ENV = {
    **CORE_STACK_ENV,
    # A job whose callback was lost is fetched 1 s after its eta (the simulator says 1 s).
    "MOTIONHOOK_CALLBACK_GRACE": "1",
    # Work whose transaction died with the server comes back when its lease runs out.
    "MOTIONHOOK_TASK_LEASE": "5",
    "MOTIONHOOK_DELIVERY_TIMEOUT": "2",
    "MOTIONHOOK_DELIVERY_LEASE": "5",
    "MOTIONHOOK_UPSTREAM_TIMEOUT": "3",
    "MOTIONHOOK_DOWNLOAD_TIMEOUT": "3",
    "MOTIONHOOK_RETRY_SCHEDULE": "0.5,1,1,1,1,1,1,1",
}
SIMULATOR_FLAGS = ("--delay", "0.5", "--eta", "1")
CLIENTS = 2
#: Each client's pause between submissions, so the load stays within two cores.
PACE = 0.25
#: Bounds of the load, whatever happens: no client loops forever.
MAX_SUBMISSIONS = 400
HTTP_TIMEOUT = 10
DEADLINE = 45.0


@dataclass
class Answer:
    at: float
    status: int
    job_id: str | None = None
    body: Any = None
    retry_after: str | None = None


@dataclass
class Clients:
    """A few clients submitting small jobs until told to stop; every answer is kept."""

    stack: Stack
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for _ in range(CLIENTS):
            thread = threading.Thread(target=self._submit, daemon=True)
            thread.start()
            self.threads.append(thread)

    def _submit(self) -> None:
        api = self.stack.api()
        body = {"init_image": f"{self.stack.sim_url}/_sim/sample.png", **SMALL_VIDEO}
        for _ in range(MAX_SUBMISSIONS // CLIENTS):
            if self.stop.is_set():
                return
            try:
                response = api.post(
                    f"{self.stack.web_url}/v1/jobs", json=body, timeout=HTTP_TIMEOUT
                )
            except requests.RequestException as exc:
                answer = Answer(time.monotonic(), 0, body=repr(exc))
            else:
                payload = response.json() if response.content else None
                answer = Answer(
                    time.monotonic(),
                    response.status_code,
                    job_id=payload.get("id") if response.status_code == 202 else None,
                    body=payload,
                    retry_after=response.headers.get("Retry-After"),
                )
            with self.lock:
                self.answers.append(answer)
            self.stop.wait(PACE)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(HTTP_TIMEOUT + 5)

    def since(self, moment: float, status: int) -> list[Answer]:
        with self.lock:
            return [a for a in self.answers if a.at >= moment and a.status == status]

    def accepted(self) -> list[str]:
        with self.lock:
            return [a.job_id for a in self.answers if a.status == 202 and a.job_id]


def readyz(stack: Stack) -> int:
    try:
        return requests.get(f"{stack.web_url}/readyz", timeout=HTTP_TIMEOUT).status_code
    except requests.RequestException:
        return 0


def refused_callbacks(stack: Stack, after: datetime) -> set[str]:
    """Jobs whose ModelsLab callback was sent after ``after`` and answered 503.

    A callback in flight at the very moment of the crash may have committed and still
    be answered 503 (the server died before confirming the commit); one sent after
    the server was down cannot have been stored.
    """
    stats = requests.get(f"{stack.sim_url}/_sim/stats", timeout=HTTP_TIMEOUT).json()
    return {
        c["track_id"]
        for c in stats["recent_callbacks"]
        if c["status_code"] == 503 and datetime.fromisoformat(c["sent_at"]) > after
    }


def completed_ids(sink: Sink) -> Counter[str]:
    """For each job, how many distinct ``job.completed`` events reached the sink."""
    seen: dict[str, str] = {}
    with sink.lock:
        received = list(sink.received)
    for request in received:
        event = json.loads(request.body)
        if event["type"] == "job.completed":
            seen[request.headers["webhook-id"]] = event["data"]["id"]
    return Counter(seen.values())


def query(url: str, sql: str, **params: Any) -> list[Any]:
    """Run one SQL statement in its own transaction; return its rows, if any."""
    engine = create_engine(normalize_url(url))
    try:
        with engine.begin() as connection:
            result = connection.execute(text(sql), params)
            return list(result) if result.returns_rows else []
    finally:
        engine.dispose()


@pytest.fixture
def sink() -> Iterator[Sink]:
    receiver = Sink()
    yield receiver
    receiver.close()


@pytest.fixture
def outage_stack(tmp_path: Path, pg_cluster: PgCluster) -> Iterator[Stack]:  # noqa: F811
    stack = Stack(tmp_path / "stack", env={"MOTIONHOOK_DATABASE_URL": pg_cluster.url, **STACK_ENV})
    try:
        stack.start_all(*SIMULATOR_FLAGS)
        yield stack
    finally:
        stack.kill()


def test_a_database_crash_loses_and_doubles_nothing(
    outage_stack: Stack,
    pg_cluster: PgCluster,  # noqa: F811
    sink: Sink,
) -> None:
    stack = outage_stack
    worker = next(p for p in stack.processes if p.name == "worker")
    every_event = ["job.processing", "job.completed", "job.failed", "test.ping"]
    subscribed = stack.api().post(
        f"{stack.web_url}/v1/subscriptions",
        json={"kind": "webhook", "url": sink.url, "events": every_event},
        timeout=HTTP_TIMEOUT,
    )
    assert subscribed.status_code == 201, subscribed.text
    clients = Clients(stack)
    clients.start()
    try:
        eventually(
            stack,
            lambda: len(clients.accepted()) >= 5 and sum(completed_ids(sink).values()) >= 2,
            "jobs and deliveries flowing",
        )

        crashed_at = time.monotonic()
        pg_cluster.crash()
        down_since = datetime.now(UTC)
        eventually(stack, lambda: readyz(stack) == 503, "/readyz to say 503 during the outage")
        eventually(
            stack,
            lambda: (
                len(clients.since(crashed_at, 503)) >= 3 and refused_callbacks(stack, down_since)
            ),
            "submissions and a ModelsLab callback refused with 503",
        )
        assert worker.popen.poll() is None, f"worker exited:\n{worker.log()[-3000:]}"

        delivered_before = len(sink.received)
        restarted_at = time.monotonic()
        pg_cluster.start()
        eventually(stack, lambda: readyz(stack) == 200, "/readyz to say 200 again")
        ready_after = time.monotonic() - restarted_at
        eventually(stack, lambda: len(sink.received) > delivered_before, "deliveries flowing again")
        delivering_after = time.monotonic() - restarted_at
        eventually(
            stack, lambda: len(clients.since(restarted_at, 202)) >= 5, "submissions accepted again"
        )
    finally:
        clients.finish()
    accepted_again_after = clients.since(restarted_at, 202)[0].at - restarted_at

    accepted = clients.accepted()
    refused_jobs = refused_callbacks(stack, down_since)

    def every_job_notified_once() -> bool:
        notified = completed_ids(sink)
        return all(notified[job_id] >= 1 for job_id in accepted)

    eventually(stack, every_job_notified_once, "every accepted job notified", DEADLINE)
    assert worker.popen.poll() is None, f"worker exited:\n{worker.log()[-3000:]}"

    statuses = Counter(answer.status for answer in clients.answers)
    assert set(statuses) <= {202, 503}, statuses
    for answer in clients.since(crashed_at, 503):
        assert answer.body == {
            "code": 503,
            "status": "Service Unavailable",
            "message": DATABASE_UNAVAILABLE,
        }
        assert answer.retry_after == str(RETRY_AFTER_SECONDS)

    api = stack.api()
    for job_id in accepted:
        job = api.get(f"{stack.web_url}/v1/jobs/{job_id}", timeout=HTTP_TIMEOUT).json()
        assert job["status"] == "completed", job
    notified = completed_ids(sink)
    assert {job_id: notified[job_id] for job_id in accepted} == dict.fromkeys(accepted, 1)
    # The callbacks refused during the outage were recovered by fetching the result.
    for job_id in refused_jobs & set(accepted):
        sources = query(
            pg_cluster.url,
            "SELECT source, outcome FROM callbacks WHERE job_id = :job_id",
            job_id=job_id,
        )
        assert ("fetch", "applied") in [(row.source, row.outcome) for row in sources], sources

    receipts = Counter(request.headers["webhook-id"] for request in sink.received)
    figures = {
        "accepted": len(accepted),
        "refused_503": statuses[503],
        "callbacks_refused_503": len(refused_jobs),
        "lost": sum(1 for job_id in accepted if notified[job_id] == 0),
        "doubled_events": sum(1 for job_id in accepted if notified[job_id] > 1),
        "redelivered_receipts": sum(count - 1 for count in receipts.values()),
        "outage_seconds": round(restarted_at - crashed_at, 2),
        "seconds_to_ready": round(ready_after, 2),
        "seconds_to_accept": round(accepted_again_after, 2),
        "seconds_to_deliver": round(delivering_after, 2),
    }
    sys.stdout.write(f"\noutage figures: {json.dumps(figures)}\n")


def test_web_logs_an_outage_once_and_sends_nothing_to_sentry(
    tmp_path: Path,
    pg_cluster: PgCluster,  # noqa: F811
    ingest: Ingest,  # noqa: F811
) -> None:
    env = {
        "MOTIONHOOK_DATABASE_URL": pg_cluster.url,
        "MOTIONHOOK_CALLBACK_SECRET": CALLBACK_SECRET,
        "SENTRY_DSN": ingest.dsn,
        "WEB_CONCURRENCY": "1",
    }
    stack = Stack(tmp_path / "stack", env=env, simulator=False)
    stack.migrate()
    try:
        web = stack.start_web()
        api = stack.api()
        track_id = "job_outagesentry00000000000001"
        callback_url = (
            f"{stack.web_url}/v1/callbacks/modelslab/{track_id}"
            f"?sig={callback_token(CALLBACK_SECRET, track_id)}"
        )
        body = {"init_image": "http://127.0.0.1:9/a.png"}

        for _outage in range(2):
            pg_cluster.crash()
            for _ in range(3):
                refused = api.post(f"{stack.web_url}/v1/jobs", json=body, timeout=HTTP_TIMEOUT)
                assert refused.status_code == 503, refused.text
            callback = requests.post(callback_url, json={"status": "success"}, timeout=10)
            assert callback.status_code == 503, callback.text
            pg_cluster.start()
            eventually(
                stack,
                lambda: (
                    api.get(f"{stack.web_url}/v1/jobs", timeout=HTTP_TIMEOUT).status_code == 200
                ),
                "web to answer from the database again",
            )

        # A real bug after the outages: its event arriving means earlier ones would have too.
        query(pg_cluster.url, "DROP TABLE callbacks")
        failed = requests.post(callback_url, json={"status": "success"}, timeout=10)
        assert failed.status_code == 500
        eventually(stack, lambda: ingest.event_with("track_id", track_id), "the bug's event")
        assert len(ingest.events()) == 1, [e.get("exception") for e in ingest.events()]

        warnings = [
            line for line in web.log().splitlines() if "database unavailable; answering 503" in line
        ]
        assert len(warnings) == 2, warnings
        assert all(json.loads(line)["level"] == "WARNING" for line in warnings)
    finally:
        stack.kill()
