"""``motionhook submit`` and ``motionhook listen`` against a real stack."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from standardwebhooks import Webhook

from service.demo import video_frames
from service.devstack import ROOT, SAMPLE_IMAGE, Stack
from service.notifiers.webhook import generate_secret
from tests.conftest import eventually
from tests.sinks import Sink

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Iterator[Stack]:
    stack = make_stack()
    stack.start_all()
    yield stack


def cli_env(stack: Stack, *, token_file: bool = False) -> dict[str, str]:
    env = {key: value for key, value in stack.env.items() if key != "MOTIONHOOK_API_TOKENS"}
    env["MOTIONHOOK_URL"] = stack.web_url
    if token_file:
        # What `make run` leaves behind: the default when MOTIONHOOK_TOKEN is unset.
        (stack.instance / "api_token").write_text(stack.token)
    else:
        env["MOTIONHOOK_TOKEN"] = stack.token
    return env


def motionhook(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_submit_wait_output_writes_a_playable_video_and_exits_0(
    stack: Stack, tmp_path: Path
) -> None:
    video = tmp_path / "out.mp4"
    done = motionhook(
        "submit",
        str(SAMPLE_IMAGE),
        "--prompt",
        "a slow zoom",
        "--frames",
        "8",
        "--output",
        str(video),
        env=cli_env(stack, token_file=True),
    )
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["status"] == "completed"
    assert job["input"]["num_frames"] == 8
    assert video_frames(video) > 0
    assert "completed" in done.stderr  # the progress bar's last state


def test_a_failing_job_exits_non_zero_with_the_error_message(stack: Stack) -> None:
    knobs = requests.put(f"{stack.sim_url}/_sim/knobs", json={"fail_generation": True}, timeout=10)
    assert knobs.status_code == 200
    done = motionhook("submit", str(SAMPLE_IMAGE), "--prompt", "zoom", "--wait", env=cli_env(stack))
    assert done.returncode == 1
    job = json.loads(done.stdout)
    assert job["status"] == "failed"
    assert job["error"]["message"] in " ".join(done.stderr.split())


def test_submit_reports_a_refused_request_by_its_message(stack: Stack) -> None:
    done = motionhook(
        "submit", "https://example.com/x.png", "--prompt", "p", "--model", "svd", env=cli_env(stack)
    )
    assert done.returncode == 1
    assert "model_id: must be one of" in done.stderr


def test_listen_prints_and_forwards_events_signed(stack: Stack) -> None:
    sink = Sink()
    secret = generate_secret()
    listener = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "listen",
            "--forward-to",
            sink.url,
            "--secret",
            secret,
        ],
        env=cli_env(stack),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        api = stack.api()
        # The subscription's own deliveries go elsewhere: the sink hears only the listener.
        body = {"kind": "webhook", "url": f"{stack.web_url}/healthz", "events": ["job.completed"]}
        sub = api.post(f"{stack.web_url}/v1/subscriptions", json=body, timeout=10).json()
        # The listener may not be connected yet: ping until one reaches the sink through it.
        forwarded = eventually(
            stack,
            lambda: _ping(stack, api, sub["id"]) and list(sink.received),
            "a forwarded test.ping",
        )
        received = forwarded[0]
        envelope = Webhook(secret).verify(received.body, received.headers)
        assert envelope["type"] == "test.ping"
    finally:
        listener.terminate()
        output, _ = listener.communicate(timeout=10)
        sink.close()
    assert "test.ping" in output
    assert "→ 200" in output


def _ping(stack: Stack, api: requests.Session, subscription_id: str) -> bool:
    url = f"{stack.web_url}/v1/subscriptions/{subscription_id}/test"
    return api.post(url, timeout=10).status_code == 202
