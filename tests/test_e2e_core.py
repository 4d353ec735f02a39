"""End to end: the simulator, gunicorn ``web`` and ``motionhook worker`` as real processes.

Each scenario drives a job through ``POST /v1/jobs`` over loopback and judges it
only by what crosses the wire or lands in the database: the simulator's
counters (``/_sim/stats``), the job resource, the ``events``/``callbacks``/``tasks``
tables and a local receiver for the job's signed ``webhook_url``.

Most scenarios share one stack per database engine (the simulator is reset
between them); killing a worker gets a stack of its own with a short lease.
"""

from __future__ import annotations

import hashlib
import queue
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine, text
from standardwebhooks import Webhook

from service.callbacks import callback_token
from service.db import normalize_url
from service.demo import start_receiver, video_frames
from service.devstack import SAMPLE_IMAGE, Stack
from service.notifiers.webhook import generate_secret
from tests.conftest import CALLBACK_SECRET, ENGINES, _make_url, eventually

pytestmark = pytest.mark.e2e

WEBHOOK_SECRET = generate_secret()
#: Shared by every process of a stack: known secrets, and few gunicorn workers to start fast.
STACK_ENV = {
    "MOTIONHOOK_CALLBACK_SECRET": CALLBACK_SECRET,
    "MOTIONHOOK_WEBHOOK_SECRET": WEBHOOK_SECRET,
    "WEB_CONCURRENCY": "2",
    "GUNICORN_ACCESS_LOG": "0",
    # The tests poll the job every 50 ms; the per-token API limit is not what they test.
    "MOTIONHOOK_RATELIMIT": "1000000/minute",
}
SIMULATOR_FLAGS = ("--delay", "0.2", "--eta", "1")
#: Small videos keep rendering, downloading and hashing in the milliseconds.
SMALL_VIDEO = {"width": 128, "height": 128, "num_frames": 8, "prompt": "a slow pan"}
#: A generous deadline for anything the stack should do "soon"; never a timing assertion.
DEADLINE = 30.0
HTTP_TIMEOUT = 10


# -- helpers ---------------------------------------------------------------------------


def query(stack: Stack, sql: str, **params: Any) -> list[Any]:
    """Run one read-only SQL statement against the stack's database."""
    engine = create_engine(normalize_url(stack.env["MOTIONHOOK_DATABASE_URL"]))
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params))
    finally:
        engine.dispose()


def event_types(stack: Stack, job_id: str) -> list[str]:
    rows = query(stack, "SELECT type FROM events WHERE job_id = :job_id", job_id=job_id)
    return sorted(row.type for row in rows)


def callback_sources(stack: Stack, job_id: str) -> list[tuple[str, str]]:
    rows = query(
        stack, "SELECT source, outcome FROM callbacks WHERE job_id = :job_id", job_id=job_id
    )
    return sorted((row.source, row.outcome) for row in rows)


def pending_tasks(stack: Stack, job_id: str) -> list[Any]:
    return query(stack, "SELECT kind, lease_owner FROM tasks WHERE job_id = :job_id", job_id=job_id)


def deliveries_settled(stack: Stack, job_id: str) -> bool:
    rows = query(stack, "SELECT status FROM deliveries WHERE job_id = :job_id", job_id=job_id)
    return bool(rows) and all(row.status != "pending" for row in rows)


def sim_stats(stack: Stack) -> dict[str, Any]:
    response = requests.get(f"{stack.sim_url}/_sim/stats", timeout=HTTP_TIMEOUT)
    response.raise_for_status()
    stats: dict[str, Any] = response.json()
    return stats


def set_knobs(stack: Stack, **knobs: Any) -> None:
    response = requests.put(f"{stack.sim_url}/_sim/knobs", json=knobs, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text


def callbacks_sent_for(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    return [c for c in sim_stats(stack)["recent_callbacks"] if c["track_id"] == job_id]


def submit(stack: Stack, init_image: str | None = None, **fields: Any) -> dict[str, Any]:
    """POST a small JSON job (the simulator's own sample image by default)."""
    body = {"init_image": init_image or f"{stack.sim_url}/_sim/sample.png", **SMALL_VIDEO, **fields}
    response = stack.api().post(f"{stack.web_url}/v1/jobs", json=body, timeout=HTTP_TIMEOUT)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    assert job["status"] == "queued"
    return job


def get_job(stack: Stack, job_id: str) -> dict[str, Any]:
    response = stack.api().get(f"{stack.web_url}/v1/jobs/{job_id}", timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def settle(stack: Stack, job_id: str, status: str, timeout: float = DEADLINE) -> dict[str, Any]:
    """Wait until the job reaches ``status`` (failing early on another final status)."""
    final = {"completed", "failed"}

    def reached() -> dict[str, Any] | None:
        job = get_job(stack, job_id)
        if job["status"] in final - {status}:
            pytest.fail(f"job ended {job['status']} instead of {status}: {job['error']}")
        return job if job["status"] == status else None

    job: dict[str, Any] = eventually(stack, reached, f"job {job_id} to be {status}", timeout)
    return job


@dataclass
class Receiver:
    """A local endpoint for per-job webhooks that verifies every signature it gets."""

    server: ThreadingHTTPServer
    inbox: queue.Queue[tuple[dict[str, str], bytes]]
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def received(self, job_id: str) -> list[dict[str, Any]]:
        """Every verified event received so far for ``job_id``, in arrival order."""
        verifier = Webhook(WEBHOOK_SECRET)
        while True:
            try:
                headers, body = self.inbox.get_nowait()
            except queue.Empty:
                break
            event = verifier.verify(body, headers)  # raises unless signed with our secret
            assert headers["webhook-id"] == event["id"]
            self.events.append(event)
        return [event for event in self.events if event["data"]["id"] == job_id]

    def types(self, job_id: str) -> list[str]:
        return [event["type"] for event in self.received(job_id)]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server, inbox = start_receiver()
    yield Receiver(server, inbox)
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module", params=ENGINES)
def shared_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One simulator + web + worker per database engine, shared by this module."""
    tmp = tmp_path_factory.mktemp("e2e")
    url = _make_url(request, request.param, tmp)
    stack = Stack(tmp / "stack", env={"MOTIONHOOK_DATABASE_URL": url, **STACK_ENV})
    try:
        stack.start_all(*SIMULATOR_FLAGS)
        yield stack
    finally:
        stack.kill()


@pytest.fixture
def stack(shared_stack: Stack) -> Stack:
    """The shared stack with a freshly reset simulator (initial knobs, zero counters)."""
    response = requests.post(
        f"{shared_stack.sim_url}/_sim/reset", json={"knobs": True}, timeout=HTTP_TIMEOUT
    )
    assert response.status_code == 200, response.text
    for process in shared_stack.processes:
        assert process.popen.poll() is None, f"{process.name} died:\n{process.log()[-3000:]}"
    return shared_stack


# -- scenarios -------------------------------------------------------------------------


def test_upload_completes_with_a_durable_playable_video(
    stack: Stack, receiver: Receiver, tmp_path: Path
) -> None:
    with SAMPLE_IMAGE.open("rb") as image:
        response = stack.api().post(
            f"{stack.web_url}/v1/jobs",
            files={"image": ("sample.png", image, "image/png")},
            data={**{k: str(v) for k, v in SMALL_VIDEO.items()}, "webhook_url": receiver.url},
            timeout=HTTP_TIMEOUT,
        )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    job = settle(stack, job_id, "completed")

    assert job["error"] is None
    assert job["completed_at"] is not None
    output = job["outputs"][0]
    assert output["url"].startswith(f"{stack.web_url}/media/")
    assert output["content_type"] == "video/mp4"
    assert len(output["sha256"]) == 64
    assert output["bytes"] > 0
    video = requests.get(output["url"], timeout=HTTP_TIMEOUT)  # no bearer token: signed URL
    assert video.status_code == 200
    assert video.headers["Content-Type"] == "video/mp4"
    assert len(video.content) == output["bytes"]
    assert hashlib.sha256(video.content).hexdigest() == output["sha256"]
    path = tmp_path / "video.mp4"
    path.write_bytes(video.content)
    assert video_frames(path) == SMALL_VIDEO["num_frames"]
    # The upload reached ModelsLab as a URL to our own media, and came back as one callback.
    stats = sim_stats(stack)
    assert stats["submits"] == 1
    assert stats["answered"]["submit"] == {"processing": 1}
    eventually(stack, lambda: callbacks_sent_for(stack, job_id), "the callback to be recorded")
    assert [c["status_code"] for c in callbacks_sent_for(stack, job_id)] == [200]
    # The signed job.completed carries the durable URL.
    eventually(stack, lambda: "job.completed" in receiver.types(job_id), "job.completed webhook")
    completed = [e for e in receiver.received(job_id) if e["type"] == "job.completed"]
    assert completed[0]["data"]["outputs"][0]["sha256"] == output["sha256"]


def test_duplicate_callbacks_complete_the_job_once(stack: Stack, receiver: Receiver) -> None:
    set_knobs(stack, duplicate_callbacks=2)
    job_id = submit(stack, webhook_url=receiver.url)["id"]

    settle(stack, job_id, "completed")
    eventually(stack, lambda: len(callbacks_sent_for(stack, job_id)) == 3, "all three callbacks")
    assert [c["status_code"] for c in callbacks_sent_for(stack, job_id)] == [200, 200, 200]
    eventually(stack, lambda: deliveries_settled(stack, job_id), "webhook deliveries to settle")

    # (job.processing may be skipped when a callback overtakes the submit answer: not judged.)
    assert event_types(stack, job_id).count("job.completed") == 1
    assert "job.failed" not in event_types(stack, job_id)
    callbacks = [
        outcome for source, outcome in callback_sources(stack, job_id) if source == "callback"
    ]
    assert callbacks == ["applied", "duplicate", "duplicate"]
    assert receiver.types(job_id).count("job.completed") == 1


def test_dropped_callback_with_immediate_success_completes(stack: Stack) -> None:
    set_knobs(stack, drop_callback=True, immediate_success=True)
    job_id = submit(stack)["id"]

    job = settle(stack, job_id, "completed")

    assert job["outputs"][0]["sha256"]
    stats = sim_stats(stack)
    assert stats["answered"]["submit"] == {"success": 1}
    assert stats["callbacks_sent"] == 0
    assert callback_sources(stack, job_id) == [("submit", "applied")]
    assert event_types(stack, job_id) == ["job.completed"]


def test_rate_limited_job_stays_queued_then_completes(stack: Stack) -> None:
    set_knobs(stack, rate_limit_next=2, rate_limit_retry_after=1)
    job_id = submit(stack)["id"]

    eventually(
        stack,
        lambda: sim_stats(stack)["http_statuses"]["submit"].get("429", 0) >= 1,
        "the first 429",
    )
    waiting = get_job(stack, job_id)  # the next submit is at least retry_after (1 s) away
    assert waiting["status"] == "queued"
    assert waiting["error"] is None
    assert waiting["upstream"]["id"] is None

    settle(stack, job_id, "completed")

    stats = sim_stats(stack)
    assert stats["http_statuses"]["submit"] == {"429": 2, "200": 1}
    assert stats["answered"]["submit"] == {"error": 2, "processing": 1}


def test_upstream_error_fails_the_job_without_retry(stack: Stack, receiver: Receiver) -> None:
    set_knobs(stack, error_next=1)
    job_id = submit(stack, webhook_url=receiver.url, webhook_events=["job.failed"])["id"]

    job = settle(stack, job_id, "failed")

    assert job["error"]["code"] == "upstream_rejected"
    assert "Failed to queue the request" in job["error"]["message"]
    assert sim_stats(stack)["submits"] == 1
    assert pending_tasks(stack, job_id) == []  # nothing left that could retry
    eventually(stack, lambda: receiver.types(job_id) == ["job.failed"], "signed job.failed")
    assert receiver.received(job_id)[0]["data"]["error"]["code"] == "upstream_rejected"


def test_callbacks_with_a_bad_token_are_refused_over_http(stack: Stack) -> None:
    set_knobs(stack, drop_callback=True)  # both jobs stay processing: only we call back
    job_id = submit(stack)["id"]
    other_id = submit(stack)["id"]
    for each in (job_id, other_id):
        settle(stack, each, "processing")
    before = get_job(stack, job_id)
    upstream_id = before["upstream"]["id"]
    success = {
        "status": "success",
        "id": int(upstream_id),
        "output": [f"{stack.sim_url}/outputs/{upstream_id}.mp4"],
        "track_id": job_id,
    }
    url = f"{stack.web_url}/v1/callbacks/modelslab/{job_id}"
    bad_tokens = {
        "wrong": "not-a-token",
        "other job's": callback_token(CALLBACK_SECRET, other_id),
        "other secret's": callback_token("another-secret", job_id),
        "empty": "",
    }

    for name, token in bad_tokens.items():
        response = requests.post(url, params={"sig": token}, json=success, timeout=HTTP_TIMEOUT)
        assert response.status_code == 401, f"{name} token: {response.text}"
        assert response.json()["code"] == 401
    missing = requests.post(url, json=success, timeout=HTTP_TIMEOUT)
    assert missing.status_code == 401

    assert get_job(stack, job_id) == before
    assert callback_sources(stack, job_id) == [("submit", "applied")]
    assert pending_tasks(stack, job_id) == [("reconcile", None)]
    # The same URL with the right token is accepted and applied: the 401s were about the token.
    failure = {"status": "failed", "id": int(upstream_id), "message": "boom", "track_id": job_id}
    accepted = requests.post(
        url,
        params={"sig": callback_token(CALLBACK_SECRET, job_id)},
        json=failure,
        timeout=HTTP_TIMEOUT,
    )
    assert accepted.status_code == 200, accepted.text
    assert get_job(stack, job_id)["error"] == {"code": "upstream_error", "message": "boom"}
    assert get_job(stack, other_id)["status"] == "processing"


def test_worker_submits_a_new_job_promptly(stack: Stack) -> None:
    job_id = submit(stack)["id"]

    eventually(stack, lambda: sim_stats(stack)["submits"] >= 1, "the submit upstream", timeout=10)

    settle(stack, job_id, "completed")  # leave the stack idle for the next scenario


# -- a worker killed mid-request -------------------------------------------------------


@dataclass
class HangingImage:
    """Serves the sample PNG, except that the first GET hangs until released, then 503s."""

    server: ThreadingHTTPServer
    first_request: threading.Event
    release: threading.Event
    requests: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/sample.png"


@pytest.fixture
def hanging_image() -> Iterator[HangingImage]:
    first_request, release = threading.Event(), threading.Event()
    seen: list[str] = []
    png = SAMPLE_IMAGE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append(self.path)
            if len(seen) == 1:
                first_request.set()
                release.wait(DEADLINE)
                self.send_error(503)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield HangingImage(server, first_request, release, seen)
    release.set()
    server.shutdown()
    server.server_close()


def test_job_survives_a_worker_killed_while_holding_its_claim(
    make_stack: Callable[..., Stack], hanging_image: HangingImage
) -> None:
    stack = make_stack(MOTIONHOOK_TASK_LEASE="3", MOTIONHOOK_UPSTREAM_TIMEOUT="2", **STACK_ENV)
    stack.start_all(*SIMULATOR_FLAGS)
    first_worker = stack.processes[-1]
    assert first_worker.name == "worker"
    # ModelsLab downloads init_image before it answers: a hanging image holds the submit open.
    job_id = submit(stack, init_image=hanging_image.url)["id"]
    eventually(stack, hanging_image.first_request.is_set, "the submit to reach ModelsLab")
    [(kind, owner)] = pending_tasks(stack, job_id)
    assert (kind, owner is not None) == ("submit", True)

    first_worker.signal(signal.SIGKILL)
    assert first_worker.popen.wait(5) == -signal.SIGKILL
    hanging_image.release.set()  # the upstream answer goes nowhere: its reader is dead
    assert get_job(stack, job_id)["status"] == "queued"

    stack.start_worker()
    settle(stack, job_id, "completed")

    assert len(hanging_image.requests) == 2
    stats = sim_stats(stack)
    assert stats["submits"] == 2
    assert stats["answered"]["submit"] == {"error": 1, "processing": 1}
    assert event_types(stack, job_id).count("job.completed") == 1
