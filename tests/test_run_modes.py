"""Run modes: ``serve`` in one process, ``worker --drain``, the drain endpoint.

``serve`` runs as a real process over loopback with the simulator and a local
receiver (also stopped and started again by a callback, as a platform scaling to
zero does, and timed from spawn to its first /readyz); the drain endpoint runs in
the app with a real local sink.
"""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
from flask import Flask
from sqlalchemy import create_engine, text

from service import create_app
from service.callbacks import callback_url
from service.db import normalize_url
from service.demo import start_receiver
from service.devstack import SAMPLE_IMAGE, Process, Stack, answers, wait_until
from service.extension import Services
from service.migrate import upgrade
from service.worker import Worker
from tests.conftest import (
    CALLBACK_SECRET,
    ENGINES,
    TOKEN,
    _make_url,
    app_config,
    eventually,
)
from tests.sinks import Received, Sink

ADMIN = "admin-token-for-tests"
SMALL_VIDEO = {"width": 128, "height": 128, "num_frames": 8, "prompt": "a slow pan"}
SERVE_ENV = {"GUNICORN_ACCESS_LOG": "0", "MOTIONHOOK_RATELIMIT": "1000000/minute"}
DEADLINE = 60.0
# The drain endpoint's time budget in the budget test, and how far past it the answer may come.
BUDGET = 1.5
BUDGET_MARGIN = 1.0
COLD_STARTS = 3
# serve's cold start may cost this many times a bare interpreter importing Flask and
# SQLAlchemy on the same machine: measured here it is about x2 (wall and CPU), and x3
# on the machine the 1 s target was set on would be 0.9 s. The absolute number is the
# benchmark's (README, Run modes).
COLD_START_FACTOR = 3.0
REFERENCE = "import time, flask, sqlalchemy.orm; print(time.process_time())"


@pytest.fixture
def receiver() -> Iterator[tuple[str, queue.Queue[tuple[dict[str, str], bytes]]]]:
    server, received = start_receiver()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def submit(stack: Stack, webhook_url: str) -> str:
    with SAMPLE_IMAGE.open("rb") as image:
        response = stack.api().post(
            f"{stack.web_url}/v1/jobs",
            data={**SMALL_VIDEO, "webhook_url": webhook_url},
            files={"image": image},
            timeout=10,
        )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def completed_jobs(received: queue.Queue[tuple[dict[str, str], bytes]]) -> set[str]:
    """Ids of the jobs whose job.completed arrived since the last look."""
    done: set[str] = set()
    while not received.empty():
        _headers, body = received.get_nowait()
        event = json.loads(body)
        if event["type"] == "job.completed":
            done.add(event["data"]["id"])
    return done


@pytest.mark.e2e
def test_serve_runs_a_job_end_to_end_in_one_process(
    make_stack: Callable[..., Stack], receiver: tuple[str, Any]
) -> None:
    url, received = receiver
    stack = make_stack(**SERVE_ENV)
    stack.migrate()
    stack.start_simulator("--delay", "0.2", "--eta", "1")
    serve = stack.start_serve()
    job_id = submit(stack, url)
    done: set[str] = set()

    def completed() -> bool:
        done.update(completed_jobs(received))
        return job_id in done

    eventually(stack, completed, "job.completed at the receiver", timeout=DEADLINE)
    serve.signal(signal.SIGTERM)
    assert serve.popen.wait(30) == 0
    assert [p.name for p in stack.processes] == ["simulator", "serve"]


@pytest.mark.e2e
def test_sigterm_during_work_loses_nothing(
    make_stack: Callable[..., Stack], receiver: tuple[str, Any]
) -> None:
    url, received = receiver
    stack = make_stack(**SERVE_ENV, MOTIONHOOK_SHUTDOWN_GRACE="5")
    stack.migrate()
    stack.start_simulator("--delay", "0.5", "--eta", "1")
    first = stack.start_serve()
    jobs = {submit(stack, url) for _ in range(3)}
    first.signal(signal.SIGTERM)
    assert first.popen.wait(30) == 0
    # Whatever the first process held was handed back: a fresh one finishes every job.
    stack.start_serve()
    done: set[str] = set()

    def all_done() -> bool:
        done.update(completed_jobs(received))
        return jobs <= done

    eventually(stack, all_done, "every job completed after the restart", timeout=DEADLINE)


def accepts_connections(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port`` (gunicorn's master
    binds before its worker has built the app: a request then waits in the backlog)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.e2e
def test_a_callback_wakes_a_stopped_serve_and_the_notification_goes_out(
    make_stack: Callable[..., Stack],
    stack_database_url: str,
    record_property: Callable[[str, object], None],
) -> None:
    """Scale to zero: nothing runs while ModelsLab works; its callback reaches a fresh
    ``serve`` (as a platform's proxy forwards it to the machine it starts), the webhook
    goes out, and the process stops again with nothing left behind."""
    arrived: dict[str, float] = {}

    def record_arrival(_number: int, request: Received) -> tuple[int, dict[str, str], bytes]:
        arrived.setdefault(json.loads(request.body)["type"], time.monotonic())
        return 204, {}, b""

    sink = Sink(record_arrival)
    stack = make_stack(**SERVE_ENV, MOTIONHOOK_CALLBACK_SECRET=CALLBACK_SECRET)
    stack.migrate()
    # ModelsLab keeps working while motionhook is stopped; the test sends its callback.
    stack.start_simulator("--drop-callback", "--delay", "0.2", "--eta", "1")
    try:
        warm = stack.start_serve()
        job_id = submit(stack, sink.url)

        def upstream_result() -> dict[str, Any] | None:
            job = stack.api().get(f"{stack.web_url}/v1/jobs/{job_id}", timeout=10).json()
            upstream_id = (job.get("upstream") or {}).get("id")
            if upstream_id is None:
                return None
            answer = requests.post(
                f"{stack.sim_url}/api/v6/video/fetch/{upstream_id}", json={"key": "k"}, timeout=10
            ).json()
            return answer if answer["status"] == "success" else None

        result = eventually(stack, upstream_result, "the generation to finish upstream")
        warm.signal(signal.SIGTERM)
        assert warm.popen.wait(30) == 0
        assert "job.completed" not in arrived

        # Nothing of motionhook runs now. The callback wakes a fresh process.
        started = time.monotonic()
        cold = stack.spawn_serve()
        eventually(stack, lambda: accepts_connections(stack.web_port), "serve to bind its port")
        sent = time.monotonic()
        answer = requests.post(
            callback_url(stack.web_url, CALLBACK_SECRET, job_id),
            json={**result, "track_id": job_id},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        eventually(stack, lambda: "job.completed" in arrived, "job.completed at the sink")
        record_property("callback_to_sink_s", round(arrived["job.completed"] - sent, 3))
        record_property("start_to_sink_s", round(arrived["job.completed"] - started, 3))

        cold.signal(signal.SIGTERM)
        assert cold.popen.wait(30) == 0
    finally:
        sink.close()
    engine = create_engine(normalize_url(stack_database_url))
    try:
        with engine.connect() as conn:
            status = conn.execute(
                text("SELECT status FROM jobs WHERE id = :id"), {"id": job_id}
            ).scalar_one()
            leased = conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM tasks WHERE lease_owner IS NOT NULL)"
                    " + (SELECT count(*) FROM deliveries WHERE status != 'delivered')"
                )
            ).scalar_one()
    finally:
        engine.dispose()
    assert status == "completed"
    assert leased == 0, "a task still leased or a delivery not delivered"


def cold_start(stack: Stack) -> tuple[float, Process]:
    """Seconds from spawning ``serve`` to its first 200 on /readyz (polled every 5 ms)."""
    began = time.monotonic()
    process = stack.spawn_serve()

    def ready() -> bool:
        if process.popen.poll() is not None:
            pytest.fail(f"serve exited while starting:\n{process.log()[-3000:]}")
        return answers(f"{stack.web_url}/readyz")

    wait_until(ready, timeout=DEADLINE, interval=0.005, message="serve to answer /readyz")
    return time.monotonic() - began, process


def reference_start() -> tuple[float, float]:
    """Wall and CPU seconds of an interpreter that only imports Flask and SQLAlchemy."""
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", REFERENCE], capture_output=True, text=True, check=True
    )
    return time.monotonic() - began, float(done.stdout)


@pytest.mark.e2e
def test_serve_cold_start_costs_at_most_three_bare_flask_imports(
    make_stack: Callable[..., Stack], record_property: Callable[[str, object], None]
) -> None:
    """From spawning ``motionhook serve`` to its first 200 on /readyz, best of three,
    against the best of three bare imports of Flask and SQLAlchemy on the same machine.

    A fixed number of seconds would test the machine: the same tree starts in 0.5 s on
    one day's VM and 1.1 s on another's. The ratio is what the code costs. The best
    start counts, because slower ones are other processes' turns on the cores; CPU time
    (the process tree's) is held to the same ratio.
    """
    stack = make_stack(**SERVE_ENV)
    stack.migrate()
    walls: list[float] = []
    cpus: list[float] = []
    references = [reference_start() for _ in range(COLD_STARTS)]
    for _ in range(COLD_STARTS):
        wall, process = cold_start(stack)
        walls.append(wall)
        tree = psutil.Process(process.popen.pid)
        cpus.append(sum(sum(p.cpu_times()[:2]) for p in [tree, *tree.children(recursive=True)]))
        process.signal(signal.SIGTERM)
        assert process.popen.wait(30) == 0
    reference_wall = min(wall for wall, _cpu in references)
    reference_cpu = min(cpu for _wall, cpu in references)
    record_property("cold_start_s", [round(wall, 3) for wall in walls])
    record_property("cold_start_cpu_s", [round(cpu, 3) for cpu in cpus])
    record_property("reference_s", [round(wall, 3) for wall, _cpu in references])
    assert min(walls) <= COLD_START_FACTOR * reference_wall, (
        f"cold starts {walls}, bare Flask and SQLAlchemy import {reference_wall:.3f} s"
    )
    assert min(cpus) <= COLD_START_FACTOR * reference_cpu, (
        f"CPU time of the starts {cpus}, of the bare import {reference_cpu:.3f} s"
    )


@pytest.fixture(params=ENGINES)
def admin_app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Flask]:
    url = _make_url(request, request.param, tmp_path)
    # A short delivery timeout: attempts a drain handed back end soon after it.
    config = app_config(
        url, tmp_path, ADMIN_TOKENS=ADMIN, ALLOW_PRIVATE_TARGETS=True, DELIVERY_TIMEOUT=3
    )
    app = create_app(config)
    services: Services = app.extensions["motionhook"]
    upgrade(services.db)
    yield app
    services.db.dispose()


def as_admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def test_drain_endpoint_refuses_client_tokens(admin_app: Flask) -> None:
    response = admin_app.test_client().post(
        "/v1/admin/drain", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 403
    assert "admin token" in response.get_json()["message"]


def test_drain_endpoint_names_a_bad_budget(admin_app: Flask) -> None:
    response = admin_app.test_client().post("/v1/admin/drain?max_seconds=0", headers=as_admin())
    assert response.status_code == 422
    assert "max_seconds" in response.get_json()["message"]


def test_drain_endpoint_runs_due_work_and_says_what_it_did(
    admin_app: Flask, receiver: tuple[str, Any]
) -> None:
    url, received = receiver
    client = admin_app.test_client()
    writer = {"Authorization": f"Bearer {TOKEN}"}
    created = client.post("/v1/subscriptions", json={"kind": "webhook", "url": url}, headers=writer)
    assert created.status_code == 201, created.get_json()
    ping = client.post(f"/v1/subscriptions/{created.get_json()['id']}/test", headers=writer)
    assert ping.status_code in (200, 202), ping.get_json()

    response = client.post("/v1/admin/drain?max_seconds=20", headers=as_admin())

    assert response.status_code == 200
    report = response.get_json()
    assert report["ran"]["delivery"] == 1
    assert report["budget_exhausted"] is False
    assert report["released"] == 0
    _headers, body = received.get(timeout=5)
    assert json.loads(body)["type"] == "test.ping"


def test_drain_endpoint_stops_at_its_budget_and_hands_back_what_it_holds(
    admin_app: Flask,
) -> None:
    # Two deliveries are answered at once, two hang: more due work than fits the budget.
    sink = Sink(lambda number, _request: (204, {}, b"") if number <= 2 else None)
    services: Services = admin_app.extensions["motionhook"]
    client = admin_app.test_client()
    writer = {"Authorization": f"Bearer {TOKEN}"}
    try:
        created = client.post(
            "/v1/subscriptions", json={"kind": "webhook", "url": sink.url}, headers=writer
        )
        assert created.status_code == 201, created.get_json()
        for _ in range(4):
            ping = client.post(f"/v1/subscriptions/{created.get_json()['id']}/test", headers=writer)
            assert ping.status_code in (200, 202), ping.get_json()

        started = time.monotonic()
        response = client.post(f"/v1/admin/drain?max_seconds={BUDGET}", headers=as_admin())
        elapsed = time.monotonic() - started

        assert response.status_code == 200, response.get_json()
        assert elapsed < BUDGET + BUDGET_MARGIN, f"the drain took {elapsed:.2f} s"
        report = response.get_json()
        assert report["budget_exhausted"] is True
        assert report["ran"]["delivery"] == 2
        assert report["released"] == 2
        assert BUDGET <= report["seconds"] < BUDGET + BUDGET_MARGIN
        with services.db.transaction() as session:
            rows = session.execute(text("SELECT status, lease_owner FROM deliveries")).all()
        assert sorted(status for status, _owner in rows) == [
            "delivered",
            "delivered",
            "pending",
            "pending",
        ]
        assert [owner for _status, owner in rows if owner is not None] == []
    finally:
        sink.close()

    # The two attempts handed back still end on their threads (at the delivery timeout)
    # and are recorded: nothing is left running against the database when the test ends.
    def attempts() -> int:
        with services.db.transaction() as session:
            return int(session.execute(text("SELECT count(*) FROM delivery_attempts")).scalar_one())

    wait_until(lambda: attempts() == 4, timeout=DEADLINE, message="the late attempts recorded")


def test_drain_endpoint_with_nothing_due_answers_at_once(admin_app: Flask) -> None:
    response = admin_app.test_client().post("/v1/admin/drain?max_seconds=20", headers=as_admin())
    assert response.status_code == 200
    report = response.get_json()
    assert sum(report["ran"].values()) == 0
    assert report["budget_exhausted"] is False
    assert report["seconds"] < 20


def test_worker_drain_exits_0_when_idle_and_leaves_nothing_claimed(admin_app: Flask) -> None:
    services: Services = admin_app.extensions["motionhook"]
    env = {
        "MOTIONHOOK_DATABASE_URL": services.settings.database_url,
        "MOTIONHOOK_API_TOKENS": TOKEN,
        "MOTIONHOOK_INSTANCE_PATH": str(services.settings.instance_path),
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker", "--drain", "--max-seconds", "30"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "nothing left due" in done.stderr
    with services.db.transaction() as session:
        leased = session.execute(
            text("SELECT count(*) FROM tasks WHERE lease_owner IS NOT NULL")
        ).scalar_one()
    assert leased == 0


@pytest.mark.postgresql
def test_without_listen_the_worker_polls_and_still_delivers(
    request: pytest.FixtureRequest, tmp_path: Path, receiver: tuple[str, Any]
) -> None:
    url, received = receiver
    pooled = _make_url(request, "postgresql", tmp_path) + "&pgbouncer=true"
    app = create_app(app_config(pooled, tmp_path, ALLOW_PRIVATE_TARGETS=True, POLL_INTERVAL=0.2))
    services: Services = app.extensions["motionhook"]
    upgrade(services.db)
    assert services.db.pooled and services.db.listen_url is None
    worker = Worker(services)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        client = app.test_client()
        writer = {"Authorization": f"Bearer {TOKEN}"}
        created = client.post(
            "/v1/subscriptions", json={"kind": "webhook", "url": url}, headers=writer
        )
        client.post(f"/v1/subscriptions/{created.get_json()['id']}/test", headers=writer)
        _headers, body = received.get(timeout=20)
        assert json.loads(body)["type"] == "test.ping"
    finally:
        worker.stop()
        thread.join(20)
        services.db.dispose()
