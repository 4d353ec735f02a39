"""Graceful shutdown: SIGTERM to a real worker with work in flight loses nothing.

The worker stops claiming, lets in-flight work finish within
``MOTIONHOOK_SHUTDOWN_GRACE``, hands back what is still running after that, and
exits 0 within the deadline. Work handed back is done by the next worker.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from service import create_app
from service.callbacks import callback_token
from service.devstack import Process, Stack, wait_until
from service.extension import Services
from service.models import Delivery, Job, Task, utcnow
from tests.conftest import CALLBACK_SECRET, TOKEN, app_config
from tests.local_http import LocalServer, Received

pytestmark = pytest.mark.e2e

WAIT = 30.0


@dataclass
class Gate:
    """An HTTP endpoint that holds each request until released, then answers ``answer``."""

    answer: tuple[int, dict[str, str], bytes]

    def __post_init__(self) -> None:
        self.opened = threading.Event()
        self.server = LocalServer(self._respond)

    def _respond(self, _request: Received) -> tuple[int, dict[str, str], bytes]:
        self.opened.wait(WAIT * 2)
        return self.answer

    def arrived(self, count: int) -> bool:
        return len(self.server.received) >= count


@pytest.fixture
def gate() -> Iterator[Gate]:
    body = {"status": "processing", "id": 146, "eta": 60, "output": []}
    held = Gate((200, {"Content-Type": "application/json"}, json.dumps(body).encode()))
    yield held
    held.opened.set()
    held.server.stop()


@pytest.fixture
def local_app(
    tmp_path: Path, stack_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Flask]:
    """The web app in this process, on the database the worker processes use."""
    monkeypatch.setenv("MOTIONHOOK_INSTANCE_PATH", str(tmp_path / "local"))
    flask_app = create_app(app_config(stack_database_url, tmp_path, ALLOW_PRIVATE_TARGETS=True))
    yield flask_app
    flask_app.extensions["motionhook"].db.dispose()


@pytest.fixture
def make_stack(tmp_path: Path, stack_database_url: str, gate: Gate) -> Iterator[Any]:
    stacks: list[Stack] = []

    def make(grace: float) -> Stack:
        env = {
            "MOTIONHOOK_DATABASE_URL": stack_database_url,
            "MOTIONHOOK_CALLBACK_SECRET": CALLBACK_SECRET,
            "MOTIONHOOK_MODELSLAB_BASE_URL": f"{gate.server.url}/api/v6",
            "MOTIONHOOK_SHUTDOWN_GRACE": str(grace),
            "MOTIONHOOK_DELIVERY_TIMEOUT": "120",
            "MOTIONHOOK_UPSTREAM_TIMEOUT": "120",
        }
        stack = Stack(tmp_path / f"stack{len(stacks)}", env=env, token=TOKEN, simulator=False)
        stack.migrate()
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.kill()


def failed_job_with_webhook(app: Flask, url: str) -> str:
    """A job whose ``job.failed`` event waits, as a pending delivery, for a worker."""
    client = app.test_client()
    job = client.post(
        "/v1/jobs",
        json={"init_image": "https://example.com/cat.png", "webhook_url": url},
        headers={"Authorization": f"Bearer {TOKEN}"},
    ).get_json()
    token = callback_token(CALLBACK_SECRET, job["id"])
    answer = client.post(
        f"/v1/callbacks/modelslab/{job['id']}?sig={token}",
        json={"status": "failed", "id": 146, "message": "no", "track_id": job["id"]},
    )
    assert answer.status_code == 200
    return str(job["id"])


def delivery_of(services: Services, job_id: str) -> Delivery:
    with services.db.transaction() as session:
        delivery = session.scalars(select(Delivery).where(Delivery.job_id == job_id)).one()
        session.expunge(delivery)
        return delivery


def terminate(worker: Process) -> float:
    worker.signal(signal.SIGTERM)
    return time.monotonic()


def test_sigterm_lets_in_flight_delivery_finish_and_exits_0(
    local_app: Flask, gate: Gate, make_stack: Any
) -> None:
    services: Services = local_app.extensions["motionhook"]
    stack = make_stack(grace=WAIT)
    job_id = failed_job_with_webhook(local_app, f"{gate.server.url}/hook")
    worker = stack.start_worker()
    wait_until(lambda: gate.arrived(1), timeout=WAIT, message="the delivery in flight")

    terminate(worker)
    wait_until(lambda: "stopping on signal" in worker.log(), timeout=WAIT, message="SIGTERM seen")
    assert worker.popen.poll() is None  # still finishing the delivery
    gate.opened.set()
    assert worker.popen.wait(WAIT) == 0

    delivery = delivery_of(services, job_id)
    assert delivery.status == "delivered"
    assert delivery.attempt_count == 1
    assert len(gate.server.received) == 1


def test_work_past_the_grace_period_is_handed_back_and_done_by_the_next_worker(
    local_app: Flask, gate: Gate, make_stack: Any
) -> None:
    services: Services = local_app.extensions["motionhook"]
    grace = 1.0
    stack = make_stack(grace=grace)
    job_id = failed_job_with_webhook(local_app, f"{gate.server.url}/hook")
    worker = stack.start_worker()
    wait_until(lambda: gate.arrived(1), timeout=WAIT, message="the delivery in flight")

    started = terminate(worker)
    assert worker.popen.wait(WAIT) == 0
    assert time.monotonic() - started < grace + 10  # well inside any orchestrator's deadline
    handed_back = delivery_of(services, job_id)
    assert handed_back.status == "pending"
    assert handed_back.lease_owner is None
    assert handed_back.due_at is not None and handed_back.due_at <= utcnow()
    assert "worker stopped" in worker.log()

    gate.opened.set()
    stack.start_worker()
    wait_until(
        lambda: delivery_of(services, job_id).status == "delivered",
        timeout=WAIT,
        message="the next worker delivering it",
    )
    first, second = gate.server.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"]


def test_a_submit_in_flight_is_handed_back_and_submitted_again(
    local_app: Flask, gate: Gate, make_stack: Any
) -> None:
    services: Services = local_app.extensions["motionhook"]
    stack = make_stack(grace=1.0)
    job = (
        local_app.test_client()
        .post(
            "/v1/jobs",
            json={"init_image": "https://example.com/cat.png"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        .get_json()
    )
    worker = stack.start_worker()
    wait_until(lambda: gate.arrived(1), timeout=WAIT, message="the submit in flight")

    terminate(worker)
    assert worker.popen.wait(WAIT) == 0
    with services.db.transaction() as session:
        task = session.scalars(select(Task).where(Task.job_id == job["id"])).one()
        assert (task.kind, task.lease_owner) == ("submit", None)
        assert task.due_at <= utcnow()

    gate.opened.set()
    stack.start_worker()

    def processing() -> bool:
        with services.db.transaction() as session:
            found = session.get(Job, job["id"])
            return found is not None and found.status == "processing"

    wait_until(processing, timeout=WAIT, message="the job submitted by the next worker")
    assert len(gate.server.received) == 2
