"""End to end over real sockets: durable results, missed callbacks, timeouts, S3.

Web, worker and the ModelsLab simulator run as real processes on loopback
(SQLite, and PostgreSQL when configured); the tests drive them over HTTP the way
a client and ModelsLab would. Tests that need no special settings share one stack
per engine, its simulator reset between tests; the others start their own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit

import boto3
import imageio_ffmpeg
import pytest
import requests
from moto.server import ThreadedMotoServer
from sqlalchemy import create_engine, text
from standardwebhooks.webhooks import Webhook

from service.callbacks import callback_token
from service.db import Database, normalize_url
from service.devstack import ROOT, Stack, free_port, wait_until
from service.media import sign_media
from service.models import Job

pytestmark = pytest.mark.e2e

WAIT = 30.0
HTTP_TIMEOUT = 10.0
NUM_FRAMES = 8
CALLBACK_SECRET = "e2e-callback-secret"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"e2e-webhook-secret-0123456789abc").decode()
# Reconciliation comes due one second after the simulator's one-second eta.
FAST_RECONCILE = {"MOTIONHOOK_CALLBACK_GRACE": "1"}
FAST_KNOBS = {"delay": 0.2, "eta": 1}
# The shared stack caps outputs at 200 kB (the simulator's are ~10 kB) and gives up
# retrying a download after 3 s, so bad outputs settle quickly.
MAX_OUTPUT_BYTES = 200_000
SHARED_ENV = {
    "MOTIONHOOK_MAX_OUTPUT_BYTES": str(MAX_OUTPUT_BYTES),
    "MOTIONHOOK_DOWNLOAD_DEADLINE": "3",
    **FAST_RECONCILE,
}
# Enough of an MP4 for the sniffer: a box size, then "ftyp".
MP4_HEAD = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00" * 64
HTML_PAGE = b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>"

ENGINES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]
PG_URL = os.environ.get("MOTIONHOOK_TEST_DATABASE_URL")

MakeStack = Callable[..., Stack]


# -- helpers -----------------------------------------------------------------------------------


@dataclass
class Receiver:
    """A webhook receiver on loopback that records every POST."""

    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.received.append((dict(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def verified_events(self, secret: str) -> list[dict[str, Any]]:
        """Every event received so far, each checked against its Standard Webhooks signature."""
        with self.lock:
            received = list(self.received)
        events = []
        for headers, body in received:
            payload: dict[str, Any] = Webhook(secret).verify(body, headers)
            events.append(payload)
        return events

    def wait_for_event(self, secret: str, event_type: str) -> dict[str, Any]:
        def arrived() -> dict[str, Any] | None:
            matching = [e for e in self.verified_events(secret) if e["type"] == event_type]
            return matching[0] if matching else None

        return cast("dict[str, Any]", wait_until(arrived, timeout=WAIT, message=event_type))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


class Origin:
    """An output server on loopback that misbehaves the way CDNs and proxies do."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path == "/error.mp4":  # an error page served as a success
                    self._send(200, "text/html", HTML_PAGE)
                elif self.path == "/huge.mp4":  # a real-looking video over the cap
                    self._send(200, "video/mp4", MP4_HEAD.ljust(MAX_OUTPUT_BYTES + 1, b"\x00"))
                elif self.path == "/reset.mp4":  # the connection dies mid-body
                    self.send_response(200)
                    self.send_header("Content-Type", "video/mp4")
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(MP4_HEAD.ljust(4096, b"\x00"))
                    self.wfile.flush()
                    # SO_LINGER 0 makes close() send a RST instead of a FIN.
                    linger = struct.pack("ii", 1, 0)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    self.connection.close()
                else:
                    self._send(404, "text/plain", b"not found")
                self.close_connection = True

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    origin = Origin()
    yield origin
    origin.close()


def set_knobs(stack: Stack, **knobs: Any) -> None:
    """Set the simulator's knobs for the jobs submitted from now on."""
    answer = requests.put(f"{stack.sim_url}/_sim/knobs", json=knobs, timeout=HTTP_TIMEOUT)
    assert answer.status_code == 200, answer.text


def start(make_stack: MakeStack, knobs: dict[str, Any], **env: str) -> Stack:
    """Start a stack of its own (for tests that need special settings) and set knobs."""
    stack = make_stack(MOTIONHOOK_CALLBACK_SECRET=CALLBACK_SECRET, **env)
    stack.start_all()
    set_knobs(stack, **knobs)
    return stack


@pytest.fixture(scope="module", params=ENGINES)
def shared_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One stack per engine for the tests that need no special settings (saves startups)."""
    folder = tmp_path_factory.mktemp("shared")
    drop_schema: Callable[[], None] | None = None
    if request.param == "sqlite":
        url = f"sqlite:///{folder / 'motionhook.db'}"
    else:
        assert PG_URL
        schema = f"t_{uuid.uuid4().hex[:12]}"
        admin = create_engine(normalize_url(PG_URL), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))

        def drop_schema() -> None:
            with admin.connect() as conn:
                conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            admin.dispose()

        separator = "&" if "?" in PG_URL else "?"
        url = f"{PG_URL}{separator}options=-csearch_path%3D{schema}"
    stack = Stack(
        folder / "stack",
        env={
            "MOTIONHOOK_DATABASE_URL": url,
            "MOTIONHOOK_CALLBACK_SECRET": CALLBACK_SECRET,
            **SHARED_ENV,
        },
    )
    try:
        stack.start_all()
        yield stack
    finally:
        stack.kill()
        if drop_schema is not None:
            drop_schema()


@pytest.fixture
def stack(shared_stack: Stack) -> Stack:
    """The shared stack, its simulator reset to fresh knobs and stats."""
    reset = requests.post(
        f"{shared_stack.sim_url}/_sim/reset", json={"knobs": True}, timeout=HTTP_TIMEOUT
    )
    assert reset.status_code == 200, reset.text
    set_knobs(shared_stack, **FAST_KNOBS)
    return shared_stack


def submit(stack: Stack, **body: Any) -> str:
    job = {
        "init_image": f"{stack.sim_url}/_sim/sample.png",
        "prompt": "a slow pan",
        "width": 128,
        "height": 128,
        "num_frames": NUM_FRAMES,
        "fps": 8,
        **body,
    }
    response = stack.api().post(f"{stack.web_url}/v1/jobs", json=job, timeout=HTTP_TIMEOUT)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def get_job(stack: Stack, job_id: str) -> dict[str, Any]:
    response = stack.api().get(f"{stack.web_url}/v1/jobs/{job_id}", timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def wait_for_status(
    stack: Stack, job_id: str, status: str, timeout: float = WAIT
) -> dict[str, Any]:
    """Wait until the job reaches ``status``; fail at once if it settles on another one."""

    def reached() -> dict[str, Any] | None:
        job = get_job(stack, job_id)
        if job["status"] == status:
            return job
        assert job["status"] in ("queued", "processing", "failed"), job
        return None

    try:
        job = wait_until(reached, timeout=timeout, interval=0.1, message=status)
    except TimeoutError as exc:
        logs = "\n".join(f"--- {p.name}\n{p.log()[-3000:]}" for p in stack.processes)
        raise AssertionError(f"{exc}: {get_job(stack, job_id)}\n{logs}") from None
    return cast("dict[str, Any]", job)


def post_success_callback(stack: Stack, job_id: str, output_url: str) -> None:
    """Call back like ModelsLab: a success for ``job_id`` on its signed callback URL."""
    upstream_id = get_job(stack, job_id)["upstream"]["id"]
    body = {
        "status": "success",
        "id": int(upstream_id),
        "output": [output_url],
        "generationTime": 12.5,
        "track_id": job_id,
    }
    token = callback_token(CALLBACK_SECRET, job_id)
    answer = requests.post(
        f"{stack.web_url}/v1/callbacks/modelslab/{job_id}?sig={token}",
        data=json.dumps(body),
        headers={"Content-Type": "application/json"},
        timeout=HTTP_TIMEOUT,
    )
    assert answer.status_code == 200, answer.text


def stored_error(stack: Stack, job_id: str) -> str:
    """Why the job's first output was not stored, as the worker recorded it."""
    db = Database(stack.env["MOTIONHOOK_DATABASE_URL"])
    try:
        with db.transaction() as session:
            row = session.get(Job, job_id)
            assert row is not None
            reason: str = row.outputs[0]["error"]
    finally:
        db.dispose()
    return reason


def sim_stats(stack: Stack) -> dict[str, Any]:
    stats: dict[str, Any] = requests.get(f"{stack.sim_url}/_sim/stats", timeout=HTTP_TIMEOUT).json()
    return stats


def fetch_bytes(url: str, **headers: str) -> requests.Response:
    response = requests.get(url, headers=headers, timeout=HTTP_TIMEOUT)
    assert response.status_code in (200, 206), (response.status_code, response.text[:300])
    return response


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def frame_count(data: bytes, tmp_path: Path) -> int:
    path = tmp_path / f"{sha256(data)[:12]}.mp4"
    path.write_bytes(data)
    frames, _seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    return int(frames)


def only_output(job: dict[str, Any]) -> dict[str, Any]:
    assert len(job["outputs"]) == 1, job
    output: dict[str, Any] = job["outputs"][0]
    return output


# -- durable results ---------------------------------------------------------------------------


def test_stored_video_is_the_simulators_video_with_the_requested_frames(
    stack: Stack, tmp_path: Path
) -> None:
    job = wait_for_status(stack, submit(stack), "completed")
    output = only_output(job)
    assert output["stored"] is True
    assert output["url"].startswith(f"{stack.web_url}/media/outputs/{job['id']}/")

    served = fetch_bytes(output["source_url"]).content
    durable = fetch_bytes(output["url"])
    assert durable.headers["Content-Type"] == "video/mp4"
    assert int(durable.headers["Content-Length"]) == len(served)
    assert durable.headers["ETag"]
    assert sha256(durable.content) == sha256(served) == output["sha256"]
    assert output["bytes"] == len(served)
    assert output["content_type"] == "video/mp4"
    assert frame_count(durable.content, tmp_path) == NUM_FRAMES


def test_durable_url_answers_range_requests_with_the_exact_bytes(stack: Stack) -> None:
    output = only_output(wait_for_status(stack, submit(stack), "completed"))
    whole = fetch_bytes(output["url"]).content

    middle = fetch_bytes(output["url"], Range="bytes=100-299")
    assert middle.status_code == 206
    assert middle.headers["Content-Range"] == f"bytes 100-299/{len(whole)}"
    assert middle.headers["Content-Length"] == "200"
    assert middle.content == whole[100:300]

    tail = fetch_bytes(output["url"], Range="bytes=-64")
    assert tail.status_code == 206
    assert tail.content == whole[-64:]


def test_durable_url_refuses_tampered_expired_and_traversing_requests(stack: Stack) -> None:
    output = only_output(wait_for_status(stack, submit(stack), "completed"))
    url = urlsplit(output["url"])
    key = url.path.removeprefix("/media/")
    query = dict(parse_qsl(url.query))
    media = f"{stack.web_url}/media"

    tampered = {**query, "sig": query["sig"][:-2] + ("AA" if query["sig"][-2:] != "AA" else "BB")}
    assert requests.get(f"{media}/{key}", params=tampered, timeout=HTTP_TIMEOUT).status_code == 403

    past = int(time.time()) - 60
    expired = {"exp": str(past), "sig": sign_media(CALLBACK_SECRET, key, past)}
    assert requests.get(f"{media}/{key}", params=expired, timeout=HTTP_TIMEOUT).status_code == 403

    # Even a correctly signed "../" key never leaves the storage root ("%2e%2e" survives
    # the client's dot-segment removal and reaches the server as "/media/../").
    future = int(time.time()) + 600
    sneaky = {"exp": str(future), "sig": sign_media(CALLBACK_SECRET, "../callback_secret", future)}
    answer = requests.get(f"{media}/%2e%2e/callback_secret", params=sneaky, timeout=HTTP_TIMEOUT)
    assert answer.status_code == 404
    assert answer.json()["message"] == "no such media"  # the media view itself said no


def test_output_404s_are_retried_until_the_future_link_serves_it(stack: Stack) -> None:
    set_knobs(stack, future_link_404s=2)
    output = only_output(wait_for_status(stack, submit(stack), "completed"))
    assert output["stored"] is True
    stats = sim_stats(stack)
    assert stats["output_404s"] >= 2
    assert stats["output_downloads"] >= 1
    assert sha256(fetch_bytes(output["url"]).content) == output["sha256"]


def test_output_on_a_private_address_is_refused_and_the_job_completes_unstored(
    make_stack: MakeStack,
) -> None:
    # The simulator serves its outputs from 127.0.0.1, which production refuses to fetch.
    stack = start(make_stack, FAST_KNOBS, MOTIONHOOK_ALLOW_PRIVATE_TARGETS="0")
    job = wait_for_status(stack, submit(stack), "completed")
    output = only_output(job)
    assert (output["stored"], output["url"]) == (False, None)
    assert output["source_url"].startswith(stack.sim_url)
    assert sim_stats(stack)["output_downloads"] == 0  # never even connected
    assert "loopback address" in stored_error(stack, job["id"])


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/error.mp4", "not a video (looks like text/html)"),
        ("/huge.mp4", f"larger than {MAX_OUTPUT_BYTES} bytes"),
        ("/reset.mp4", "while downloading the output"),
    ],
    ids=["html-page-with-200", "over-the-size-cap", "connection-reset"],
)
def test_bad_output_completes_the_job_unstored_with_the_reason(
    stack: Stack, origin: Origin, path: str, reason: str
) -> None:
    set_knobs(stack, delay=3600)  # the simulator stays quiet; we call back ourselves
    job_id = submit(stack)
    wait_for_status(stack, job_id, "processing")
    post_success_callback(stack, job_id, origin.url(path))
    output = only_output(wait_for_status(stack, job_id, "completed"))
    assert (output["stored"], output["url"]) == (False, None)
    assert output["source_url"] == origin.url(path)
    assert reason in stored_error(stack, job_id)


# -- missed callbacks --------------------------------------------------------------------------


def test_dropped_callback_is_reconciled_through_fetch(stack: Stack) -> None:
    set_knobs(stack, drop_callback=True)
    job = wait_for_status(stack, submit(stack), "completed")
    stats = sim_stats(stack)
    assert stats["callbacks_sent"] == 0
    assert stats["answered"]["fetch"].get("success", 0) >= 1
    assert only_output(job)["stored"] is True


def test_job_that_never_finishes_times_out_and_a_late_success_completes_it(
    make_stack: MakeStack, receiver: Receiver
) -> None:
    # An hour-long generation never ends within the test; MOTIONHOOK_JOB_TIMEOUT counts
    # from the job's creation, so it fails after 3 s whatever fetch answered meanwhile.
    stack = start(
        make_stack,
        {"delay": 3600, "eta": 1},
        MOTIONHOOK_JOB_TIMEOUT="3",
        MOTIONHOOK_WEBHOOK_SECRET=WEBHOOK_SECRET,
        **FAST_RECONCILE,
    )
    job_id = submit(stack, webhook_url=receiver.url)
    failed = wait_for_status(stack, job_id, "failed")
    assert failed["error"]["code"] == "timeout"
    event = receiver.wait_for_event(WEBHOOK_SECRET, "job.failed")
    assert event["data"]["id"] == job_id
    assert event["data"]["error"]["code"] == "timeout"

    # ModelsLab finally calls back with a real success: the job completes after all.
    upstream_id = failed["upstream"]["id"]
    post_success_callback(stack, job_id, f"{stack.sim_url}/outputs/{upstream_id}.mp4")
    completed = wait_for_status(stack, job_id, "completed")
    assert completed["error"] is None
    assert only_output(completed)["stored"] is True
    event = receiver.wait_for_event(WEBHOOK_SECRET, "job.completed")
    assert only_output(event["data"])["url"]


# -- expiry ------------------------------------------------------------------------------------


def test_prune_command_expires_stored_media_while_the_service_runs(stack: Stack) -> None:
    job = wait_for_status(stack, submit(stack), "completed")
    durable_url = only_output(job)["url"]
    completed_at = datetime.fromisoformat(job["completed_at"].replace("Z", "+00:00"))
    wait_until(
        lambda: datetime.now(UTC) - completed_at > timedelta(seconds=1.5),
        timeout=WAIT,
        message="the job to be older than the cutoff",
    )
    command = [sys.executable, "-m", "service.cli", "prune", "--older-than", "1s", "--media"]
    result = subprocess.run(
        command, env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "media objects" in result.stdout

    output = only_output(get_job(stack, job["id"]))
    assert (output["stored"], output["url"]) == (False, None)
    assert requests.get(durable_url, timeout=HTTP_TIMEOUT).status_code == 404


# -- S3 ----------------------------------------------------------------------------------------


@pytest.fixture
def s3_server() -> Iterator[str]:
    """A real S3-compatible server (moto) on loopback, with an empty bucket ``videos``."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket="videos")
    yield endpoint
    server.stop()


def test_s3_backend_serves_the_stored_video_by_presigned_url(
    make_stack: MakeStack, s3_server: str
) -> None:
    stack = start(
        make_stack,
        FAST_KNOBS,
        MOTIONHOOK_STORAGE_URL="s3://videos/motionhook",
        MOTIONHOOK_S3_ENDPOINT_URL=s3_server,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    job = wait_for_status(stack, submit(stack), "completed")
    output = only_output(job)
    assert output["stored"] is True
    assert output["url"].startswith(f"{s3_server}/videos/motionhook/outputs/{job['id']}/")
    assert "Signature=" in output["url"]

    served = fetch_bytes(output["source_url"]).content
    durable = fetch_bytes(output["url"])
    assert durable.content == served
    assert sha256(served) == output["sha256"]
    assert durable.headers["Content-Type"] == "video/mp4"
