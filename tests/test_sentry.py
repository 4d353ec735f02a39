"""Sentry: real web and worker processes report failures to a local DSN, tagged and scrubbed.

A thread plays Sentry's ingest endpoint. The processes get ``SENTRY_DSN`` pointing
at it, fail while handling data that carries every kind of secret (bearer token,
callback ``sig``, ``whsec_`` secret, ModelsLab key, callback secret), and the test
reads the envelopes as they arrive: the event is there, tagged with the job, and
none of the secrets is anywhere in the bytes Sentry would have stored.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine, text

from service import create_app
from service.callbacks import callback_token
from service.db import normalize_url
from service.devstack import Stack, wait_until
from service.jobs import create_job
from service.models import DEFAULT_PROJECT_ID
from tests.local_http import LocalServer, Received

API_TOKEN = "mh_tok_4f1d2c9b7a3e8f60"
CALLBACK_SECRET = "cbsecret-9d8c7b6a5f4e3d2c"
WEBHOOK_SECRET = "whsec_dGVzdC13ZWJob29rLXNlY3JldC1ieXRlcw=="
MODELSLAB_KEY = "mlkey-0a1b2c3d4e5f6a7b8c9d"
QUERY_SIG = "c2lnbmVkLXF1ZXJ5LXZhbHVlLTQy"


class Ingest:
    """Sentry's envelope endpoint on loopback: keeps each envelope, decompressed."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.server = LocalServer(self._receive)

    @property
    def dsn(self) -> str:
        return f"{self.server.url.replace('http://', 'http://publickey@')}/1"

    def _receive(self, request: Received) -> tuple[int, dict[str, str], bytes]:
        body = request.body
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        assert request.headers.get("content-encoding") in (None, "gzip", "identity")
        self.raw.append(body)
        return 200, {"Content-Type": "application/json"}, b"{}"

    def events(self) -> list[dict[str, Any]]:
        found = []
        for envelope in self.raw:
            lines = envelope.split(b"\n")
            index = 1
            while index + 1 < len(lines):
                header = json.loads(lines[index])
                if header.get("type") == "event":
                    found.append(json.loads(lines[index + 1]))
                index += 2
        return found

    def event_with(self, tag: str, value: str) -> dict[str, Any] | None:
        for event in self.events():
            if event.get("tags", {}).get(tag) == value:
                return event
        return None


@pytest.fixture
def ingest() -> Iterator[Ingest]:
    sentry = Ingest()
    yield sentry
    sentry.server.stop()


@pytest.fixture
def stack(tmp_path: Path, stack_database_url: str, ingest: Ingest) -> Iterator[Stack]:
    env = {
        "MOTIONHOOK_DATABASE_URL": stack_database_url,
        "MOTIONHOOK_CALLBACK_SECRET": CALLBACK_SECRET,
        "MOTIONHOOK_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "MOTIONHOOK_MODELSLAB_API_KEY": MODELSLAB_KEY,
        "SENTRY_DSN": ingest.dsn,
        "SENTRY_ENVIRONMENT": "test",
        "WEB_CONCURRENCY": "1",
    }
    processes = Stack(tmp_path / "stack", env=env, token=API_TOKEN, simulator=False)
    processes.migrate()
    yield processes
    processes.kill()


def assert_no_secrets(ingest: Ingest, extra: tuple[str, ...] = ()) -> None:
    everything = b"\n".join(ingest.raw)
    for secret in (API_TOKEN, CALLBACK_SECRET, WEBHOOK_SECRET, MODELSLAB_KEY, QUERY_SIG, *extra):
        for form in {secret, json.dumps(secret)[1:-1], secret.split("_", 1)[-1]}:
            assert form.encode() not in everything, f"{secret!r} reached Sentry"


@pytest.mark.e2e
def test_web_failure_is_reported_tagged_and_scrubbed(stack: Stack, ingest: Ingest) -> None:
    stack.start_web()
    engine = create_engine(normalize_url(stack.env["MOTIONHOOK_DATABASE_URL"]))
    with engine.begin() as connection:  # storing any callback now fails: a real 500
        connection.execute(text("DROP TABLE callbacks"))
    engine.dispose()
    track_id = "job_sentrywebtest0000000000001"
    sig = callback_token(CALLBACK_SECRET, track_id)
    body = {
        "status": "success",
        "id": 146,
        "output": [f"https://cdn.example.com/v.mp4?exp=1&sig={QUERY_SIG}"],
        "track_id": track_id,
        "key": MODELSLAB_KEY,
        "meta": {"secret": WEBHOOK_SECRET, "note": f"Bearer {API_TOKEN}"},
    }
    response = requests.post(
        f"{stack.web_url}/v1/callbacks/modelslab/{track_id}?sig={sig}",
        json=body,
        headers={"Authorization": f"Bearer {API_TOKEN}", "X-Request-ID": "req-sentry-1"},
        timeout=10,
    )
    assert response.status_code == 500
    event = wait_until(
        lambda: ingest.event_with("job_id", track_id), timeout=30, message="the Sentry event"
    )
    assert isinstance(event, dict)
    assert event["tags"]["track_id"] == track_id
    assert event["tags"]["request_id"] == "req-sentry-1"
    assert event["tags"]["component"] == "web"
    assert event["environment"] == "test"
    exception = event["exception"]["values"][-1]
    assert "callbacks" in json.dumps(exception)  # the real failure, with its frames
    assert any(frame.get("vars") for frame in exception["stacktrace"]["frames"])
    assert_no_secrets(ingest, extra=(sig,))


@pytest.mark.e2e
def test_worker_failure_is_reported_tagged_and_scrubbed(
    stack: Stack, ingest: Ingest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOTIONHOOK_INSTANCE_PATH", str(tmp_path / "local"))
    app = create_app({"DATABASE_URL": stack.env["MOTIONHOOK_DATABASE_URL"]})
    db = app.extensions["motionhook"].db
    params = {
        "init_image": f"https://images.example.com/in.png?sig={QUERY_SIG}",
        "prompt": f"Bearer {API_TOKEN} {WEBHOOK_SECRET} key={MODELSLAB_KEY}",
        # Not a storage key at all: building the upstream request raises in the worker.
        "image_key": f"/{CALLBACK_SECRET}",
    }
    with db.transaction() as session:
        job_id = create_job(session, db, params, project_id=DEFAULT_PROJECT_ID).id
    db.dispose()
    stack.start_worker()
    event = wait_until(
        lambda: ingest.event_with("job_id", job_id), timeout=30, message="the Sentry event"
    )
    assert isinstance(event, dict)
    assert event["tags"]["track_id"] == job_id
    assert event["tags"]["component"] == "worker"
    assert event["exception"]["values"][-1]["type"] == "InvalidKey"
    assert_no_secrets(ingest)
