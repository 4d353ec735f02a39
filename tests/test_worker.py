"""The runner alone: lanes of made-up work, no HTTP, no upstream.

Each lane here claims from a list in memory and records what the runner asks
of it, so the tests see exactly when the runner claims, how much, what it
hands back, and how it rides out a database that fails.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import psycopg
import pytest
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service import worker as worker_module
from service.devstack import wait_until
from service.extension import Services
from service.worker import Lane, Worker

WAIT = 20.0


def outage_error() -> OperationalError:
    """What SQLAlchemy raises when PostgreSQL refuses connections."""
    cause = psycopg.OperationalError("connection refused")
    return OperationalError("SELECT 1", {}, cause)


@dataclass
class FakeWork:
    """A lane's work in memory: items to claim, gates to hold them, records of everything."""

    items: list[int] = field(default_factory=lambda: list(range(100)))
    limits: list[int] = field(default_factory=list)
    ran: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    gates: dict[int, threading.Event] = field(default_factory=dict)
    hold: bool = False
    # Units of work each item stands for (a batch of deliveries is one item).
    size: int = 1
    claim_errors: int = 0
    run_error: Callable[[int], BaseException | None] = lambda _item: None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def claim(self, limit: int) -> list[int]:
        with self.lock:
            self.limits.append(limit)
            if self.claim_errors:
                self.claim_errors -= 1
                raise outage_error()
            count = limit // self.size
            taken, self.items = self.items[:count], self.items[count:]
            for item in taken:
                self.gates[item] = threading.Event()
            return taken

    def run(self, item: int) -> None:
        if self.hold:
            self.gates[item].wait(WAIT)
        error = self.run_error(item)
        with self.lock:
            self.ran.append(item)
        if error is not None:
            raise error

    def open_all(self) -> None:
        """Let every held item finish, and those claimed from now on run at once."""
        with self.lock:
            self.hold = False
            for gate in self.gates.values():
                gate.set()

    def release(self, _session: Session, items: list[int]) -> None:
        with self.lock:
            self.released.extend(items)

    def lane(self, *, threads: int = 4, capacity: int = 8, batch: int = 4) -> Lane[int]:
        return Lane(
            "fake",
            claim=self.claim,
            run=self.run,
            release=self.release,
            next_due=lambda _session: None,
            context=lambda item: {"delivery_id": str(item)},
            threads=threads,
            capacity=capacity,
            batch=batch,
            size=lambda _item: self.size,
        )


@pytest.fixture
def running(services: Services) -> Iterator[Callable[..., Worker]]:
    """Start a Worker over given lanes in a thread; stopped (and joined) at teardown."""
    started: list[tuple[Worker, threading.Thread]] = []

    def start(*lanes: Lane[Any], grace: float = 5.0) -> Worker:
        services.settings = replace(services.settings, shutdown_grace=grace)
        worker = Worker(services, lanes=lambda _services, _owner: list(lanes))
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        started.append((worker, thread))
        return worker

    yield start
    for worker, thread in started:
        worker.stop()
        thread.join(WAIT)


def test_a_lane_claims_what_is_free_then_in_batches(running: Callable[..., Worker]) -> None:
    work = FakeWork(hold=True)
    running(work.lane(capacity=8, batch=4))

    wait_until(lambda: len(work.gates) == 8, timeout=WAIT, message="the first claim")
    assert work.limits[0] == 8
    for item in range(3):
        work.gates[item].set()
    wait_until(lambda: len(work.ran) == 3, timeout=WAIT, message="three items to finish")
    # Three free slots are less than a batch: no claim while five items are still held.
    assert len(work.gates) == 8
    work.gates[3].set()
    wait_until(lambda: len(work.gates) == 12, timeout=WAIT, message="a batch of four")
    assert 4 in work.limits[1:]
    work.open_all()


def test_capacity_counts_the_units_of_work_an_item_stands_for(
    running: Callable[..., Worker],
) -> None:
    work = FakeWork(hold=True, size=4)
    worker = running(work.lane(capacity=8, batch=4))

    wait_until(lambda: len(work.gates) == 2, timeout=WAIT, message="the first claim")
    # Two items of four units fill a capacity of eight: nothing more is claimed.
    assert work.limits == [8]
    work.gates[0].set()
    wait_until(lambda: len(work.gates) == 3, timeout=WAIT, message="a claim for four units")
    assert work.limits[1:] == [4]
    wait_until(lambda: worker.lanes[0].done == 4, timeout=WAIT, message="the finished item counted")
    work.open_all()


@pytest.mark.postgresql
@pytest.mark.parametrize("app", ["postgresql"], indirect=True)
def test_a_notify_wakes_a_lane_that_found_nothing(
    running: Callable[..., Worker], services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the NOTIFY the runner would look again only after a minute.
    monkeypatch.setattr(worker_module, "IDLE_WAIT", 60.0)
    work = FakeWork(items=[])
    running(work.lane())
    wait_until(lambda: len(work.limits) >= 2, timeout=WAIT, message="the claims at start")
    settled = len(work.limits)
    with work.lock:
        work.items = [7]
    with services.db.transaction() as session:
        services.db.notify(session)
    wait_until(lambda: work.ran == [7], timeout=WAIT, message="the notified item to run")
    assert len(work.limits) > settled


def test_the_runner_backs_off_through_database_errors_and_recovers(
    running: Callable[..., Worker], caplog: pytest.LogCaptureFixture
) -> None:
    work = FakeWork(items=[1, 2, 3], claim_errors=4)
    with caplog.at_level(logging.INFO, logger="motionhook.db"):
        worker = running(work.lane())
        wait_until(lambda: work.ran == [1, 2, 3], timeout=WAIT, message="work after the outage")
        # The pass that claimed them declares the recovery once it returns.
        wait_until(
            lambda: any(r.getMessage() == "database available again" for r in caplog.records),
            timeout=WAIT,
            message="the recovery to be logged",
        )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["database unavailable; retrying in 0.2 s"]
    assert warnings[0].exc_info is None  # no traceback per attempt
    db_info = [r for r in caplog.records if r.name == "motionhook.db" and r.levelno == logging.INFO]
    assert [r.getMessage() for r in db_info] == ["database available again"]
    assert not worker.stopping.is_set()


def test_work_that_failed_in_an_outage_is_handed_back_when_the_database_is_back(
    running: Callable[..., Worker],
) -> None:
    failures = {2}

    def fail_once(item: int) -> BaseException | None:
        if item in failures:
            failures.discard(item)
            return outage_error()
        return None

    work = FakeWork(items=[1, 2, 3], run_error=fail_once)
    running(work.lane())
    wait_until(lambda: work.released == [2], timeout=WAIT, message="item 2 to be handed back")
    assert sorted(work.ran) == [1, 2, 3]


def test_an_item_that_raises_is_logged_and_the_worker_goes_on(
    running: Callable[..., Worker], caplog: pytest.LogCaptureFixture
) -> None:
    work = FakeWork(items=[1, 2], run_error=lambda item: ValueError("bug") if item == 1 else None)
    with caplog.at_level(logging.ERROR, logger="motionhook.worker"):
        running(work.lane())
        wait_until(lambda: sorted(work.ran) == [1, 2], timeout=WAIT, message="both items")
    failed = [r for r in caplog.records if r.getMessage() == "work failed"]
    assert len(failed) == 1 and failed[0].exc_info is not None
    assert work.released == []


def test_shutdown_hands_back_what_is_held_after_the_grace_period(
    running: Callable[..., Worker],
) -> None:
    work = FakeWork(items=list(range(6)), hold=True)
    worker = running(work.lane(threads=2, capacity=6, batch=1), grace=0.2)
    wait_until(lambda: len(work.gates) == 6, timeout=WAIT, message="six items claimed")
    work.gates[0].set()
    wait_until(lambda: work.ran == [0], timeout=WAIT, message="item 0 to finish")
    worker.stop()
    # Two items still run past the grace period, three never started: all five go back.
    wait_until(lambda: len(work.released) == 5, timeout=WAIT, message="the hand-back")
    assert sorted(work.released) == [1, 2, 3, 4, 5]
    assert worker.abandoned == 2
    work.open_all()


def test_a_lane_asks_the_database_when_work_comes_due(services: Services) -> None:
    asked: list[datetime | None] = []

    def next_due(_session: Session) -> datetime | None:
        asked.append(None)
        return None

    work = FakeWork(items=[])
    lane = replace(work.lane(), next_due=next_due)
    worker = Worker(services, lanes=lambda _s, _o: [lane])
    thread = threading.Thread(target=worker.run, kwargs={"once": True}, daemon=True)
    thread.start()
    thread.join(WAIT)
    # With nothing due, run(once=True) asks when work comes due and returns.
    assert not thread.is_alive()
    assert asked
