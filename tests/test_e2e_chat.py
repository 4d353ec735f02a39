"""End to end Discord ``/animate``: gunicorn web, the worker, the simulator, and local fakes
of Discord's API and CDN that record what they receive (requests signed with a real
Ed25519 key pair, as Discord signs them)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from service.callbacks import callback_url
from service.devstack import Stack
from tests.conftest import eventually
from tests.local_http import Answer, LocalServer, Received
from tests.test_chat_discord import PUBLIC_KEY, URL, animate, png, signed
from tests.test_e2e_core import set_knobs, settle, submit

pytestmark = pytest.mark.e2e

EDIT_PATH = "/api/webhooks/app1/interaction-token/messages/@original"
STACK_ENV = {
    "MOTIONHOOK_CALLBACK_SECRET": "chat-callback-secret",
    "WEB_CONCURRENCY": "2",
    "GUNICORN_ACCESS_LOG": "0",
    "MOTIONHOOK_RETRY_SCHEDULE": "0.2,0.5,1,2",
    "MOTIONHOOK_DELIVERY_TIMEOUT": "2",
    "MOTIONHOOK_ALLOW_PRIVATE_TARGETS": "1",
    "MOTIONHOOK_DISCORD_PUBLIC_KEY": PUBLIC_KEY,
}
WAIT = 60.0


@pytest.fixture
def discord() -> Iterator[LocalServer]:
    """Discord's API and CDN: serves the attachment; the first result edit is rate limited."""
    image = png()
    edits: list[Received] = []

    def respond(request: Received) -> Answer:
        if request.path.startswith("/attachments/"):
            return 200, {"Content-Type": "image/png"}, image
        if request.method == "PATCH" and request.path == EDIT_PATH:
            if b"/media/outputs/" in request.body:
                edits.append(request)
            if len(edits) == 1 and b"/media/outputs/" in request.body:
                body = json.dumps({"message": "You are being rate limited.", "retry_after": 0.3})
                return 429, {"Content-Type": "application/json"}, body.encode()
            return 200, {"Content-Type": "application/json"}, b'{"id": "m1"}'
        return 404, {"Content-Type": "application/json"}, b'{"message": "Unknown"}'

    with LocalServer(respond) as server:
        yield server


def edits(server: LocalServer) -> list[dict[str, Any]]:
    return [
        json.loads(r.body) for r in server.received if r.method == "PATCH" and r.path == EDIT_PATH
    ]


def test_animate_ends_with_original_edited_to_the_video(
    make_stack: Callable[..., Stack], discord: LocalServer
) -> None:
    stack = make_stack(
        **STACK_ENV,
        MOTIONHOOK_DISCORD_API_URL=discord.url + "/api",
        MOTIONHOOK_MODELSLAB_MAX_QUEUED="1",
    )
    stack.start_all("--delay", "0.2", "--eta", "1")
    # The one slot is taken by a job whose callback does not come until the test sends it.
    set_knobs(stack, drop_callback=True)
    blocker = settle(stack, submit(stack)["id"], "processing")
    set_knobs(stack, drop_callback=False)
    prompt = "@everyone look <!channel>"
    body = json.dumps(animate(discord.url, prompt=prompt, frames=8)).encode()
    started = time.monotonic()
    answer = requests.post(stack.web_url + URL, data=body, headers=signed(body), timeout=10)
    elapsed = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"type": 5}
    assert elapsed < 3.0

    # While the job waits for the slot, the answer says where it is in the queue.
    queued = {"content": "🕒 Queued, position 1", "embeds": [], "allowed_mentions": {"parse": []}}
    eventually(stack, lambda: queued in edits(discord), "@original edited to the queue position")
    failed = {"status": "failed", "id": blocker["upstream"]["id"], "message": "test frees the slot"}
    freed = requests.post(
        callback_url(stack.web_url, STACK_ENV["MOTIONHOOK_CALLBACK_SECRET"], blocker["id"]),
        json={**failed, "track_id": blocker["id"]},
        timeout=10,
    )
    assert freed.status_code == 200, freed.text

    def finished() -> dict[str, Any] | None:
        done = [e for e in edits(discord) if "/media/outputs/" in e.get("content", "")]
        return done[-1] if done else None

    final = eventually(stack, finished, "@original edited with the video", timeout=WAIT)
    assert final["allowed_mentions"] == {"parse": []}
    assert final["embeds"][0]["url"] == final["content"]
    # Queued, then generating, then the video (the 429 made the video edit twice).
    contents = [e["content"] for e in edits(discord)]
    assert contents[:2] == ["🕒 Queued, position 1", "⏳ Generating, about 1 s"]
    assert all("/media/outputs/" in content for content in contents[2:])
    api = stack.api()
    listed_jobs = api.get(stack.web_url + "/v1/jobs", timeout=5).json()["items"]
    [job] = [item for item in listed_jobs if item["source"]]
    assert job["status"] == "completed"
    assert job["source"] == {"kind": "discord", "workspace": "g1", "channel": "c1", "user": "u1"}
    assert final["content"].split("?")[0] == job["outputs"][0]["url"].split("?")[0]

    # The reply is a delivery like any other: the 429 was retried after retry_after.
    def replies() -> list[dict[str, Any]]:
        listed = api.get(stack.web_url + "/v1/deliveries", timeout=5).json()["items"]
        return [d for d in listed if d["kind"] == "discord_reply"]

    listed = eventually(
        stack,
        lambda: all(d["status"] == "delivered" for d in replies()) and replies(),
        "every reply delivered",
    )
    # The queue position (no event), job.processing, job.completed.
    assert sorted(str(d["event_type"]) for d in listed) == [
        "None",
        "job.completed",
        "job.processing",
    ]
    retried = [d for d in listed if d["attempt_count"] == 2]
    assert len(retried) == 1
    detail = api.get(stack.web_url + f"/v1/deliveries/{retried[0]['id']}", timeout=5).json()
    assert [a["status_code"] for a in detail["attempts"]] == [429, 200]
    # Nothing of the token leaks into the deliveries API.
    assert "interaction-token" not in json.dumps(listed)
