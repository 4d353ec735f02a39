"""End to end Slack app: gunicorn web, the worker, the simulator, and a local fake of Slack
(Web API, upload URL, ``response_url``, ``url_private`` files) that records what it
receives; requests are signed with the v0 HMAC exactly as Slack signs them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from service.devstack import Stack
from tests.conftest import eventually
from tests.local_http import LocalServer, Received
from tests.test_chat_slack import (
    BOT_TOKEN,
    COMMANDS,
    INTERACTIONS,
    SIGNING_SECRET,
    api_params,
    command_body,
    fake_slack,
    interaction_body,
    shortcut_payload,
    slack_signed,
)
from tests.test_e2e_chat import STACK_ENV, WAIT

pytestmark = pytest.mark.e2e

SLACK_ENV = {
    **{k: v for k, v in STACK_ENV.items() if not k.startswith("MOTIONHOOK_DISCORD")},
    "MOTIONHOOK_SLACK_SIGNING_SECRET": SIGNING_SECRET,
}


@pytest.fixture
def slack() -> Iterator[LocalServer]:
    """Slack; its first files.getUploadURLExternal answers 429 ratelimited, Retry-After: 1."""
    with LocalServer(fake_slack(ratelimit_first_upload=True)) as server:
        yield server


def calls(server: LocalServer, prefix: str) -> list[Received]:
    return [r for r in server.received if urlsplit(r.path).path.startswith(prefix)]


def chat_replies(stack: Stack) -> list[dict[str, Any]]:
    listed = stack.api().get(stack.web_url + "/v1/deliveries", timeout=5).json()["items"]
    return [d for d in listed if d["kind"] == "slack_reply"]


def all_settled(stack: Stack) -> list[dict[str, Any]] | None:
    replies = chat_replies(stack)
    done = replies and all(d["status"] in ("delivered", "failed") for d in replies)
    return replies if done else None


def test_shortcut_ends_with_a_v2_upload_in_the_thread(
    make_stack: Callable[..., Stack], slack: LocalServer
) -> None:
    stack = make_stack(
        **SLACK_ENV,
        MOTIONHOOK_SLACK_BOT_TOKEN=BOT_TOKEN,
        MOTIONHOOK_SLACK_API_URL=slack.url + "/api",
    )
    stack.start_all("--delay", "0.2", "--eta", "1")
    payload = shortcut_payload(slack.url, text="@everyone wave <!channel>")
    body = interaction_body(payload)
    started = time.monotonic()
    answer = requests.post(
        stack.web_url + INTERACTIONS, data=body, headers=slack_signed(body), timeout=10
    )
    assert time.monotonic() - started < 3.0
    assert answer.status_code == 200, answer.text
    [ack] = calls(slack, "/actions/")
    assert json.loads(ack.body)["text"].startswith("Queued, position 1:")

    complete = eventually(
        stack,
        lambda: calls(slack, "/api/files.completeUploadExternal"),
        "the video uploaded to Slack",
        timeout=WAIT,
    )
    params = api_params(complete[-1])
    assert params["channel_id"] == "C1"
    assert params["thread_ts"] == "1700000000.000100"
    assert params["initial_comment"] == "@everyone wave &lt;!channel&gt;"
    [upload] = calls(slack, "/upload/")
    api = stack.api()
    [job] = api.get(stack.web_url + "/v1/jobs", timeout=5).json()["items"]
    assert job["status"] == "completed"
    assert job["source"] == {"kind": "slack", "workspace": "T1", "channel": "C1", "user": "U1"}
    video = requests.get(job["outputs"][0]["url"], timeout=10)
    assert upload.body == video.content

    # The replies are deliveries: progress on the response_url, then the upload, whose
    # first try was rate limited and retried after Retry-After.
    replies = eventually(stack, lambda: all_settled(stack), "every reply settled")
    assert [d["status"] for d in replies] == ["delivered", "delivered"]
    retried = [d for d in replies if d["attempt_count"] == 2]
    assert len(retried) == 1
    detail = api.get(stack.web_url + f"/v1/deliveries/{retried[0]['id']}", timeout=5).json()
    attempts = detail["attempts"]
    assert [a["status_code"] for a in attempts] == [429, 200]
    assert len(calls(slack, "/api/files.getUploadURLExternal")) == 2
    progress = [json.loads(r.body) for r in calls(slack, "/actions/")][1:]
    assert progress == [{"text": "⏳ Generating, about 1 s", "response_type": "ephemeral"}]
    # No secret of Slack's in what the API shows.
    shown = json.dumps(replies) + json.dumps(detail) + json.dumps(job)
    assert "response-secret" not in shown and BOT_TOKEN not in shown


def test_command_without_bot_token_ends_on_response_url(
    make_stack: Callable[..., Stack], slack: LocalServer
) -> None:
    stack = make_stack(**SLACK_ENV, MOTIONHOOK_SLACK_API_URL=slack.url + "/api")
    stack.start_all("--delay", "0.2", "--eta", "1")
    text = f"<{slack.url}/public/cat.png> @everyone look <!channel> & <@U9>"
    body = command_body(slack.url, text)
    started = time.monotonic()
    answer = requests.post(
        stack.web_url + COMMANDS, data=body, headers=slack_signed(body), timeout=10
    )
    assert time.monotonic() - started < 3.0
    assert answer.status_code == 200, answer.text
    assert answer.json()["response_type"] == "ephemeral"
    assert answer.json()["text"].startswith("Queued, position 1:")

    def result() -> dict[str, Any] | None:
        posted = [json.loads(r.body) for r in calls(slack, "/commands/")]
        final = [p for p in posted if p.get("response_type") == "in_channel"]
        return final[-1] if final else None

    final = eventually(stack, result, "the link posted to response_url", timeout=WAIT)
    [job] = stack.api().get(stack.web_url + "/v1/jobs", timeout=5).json()["items"]
    shown = json.dumps(final)
    assert job["outputs"][0]["url"].split("?")[0] in shown
    assert "&lt;!channel&gt; &amp; &lt;@U9&gt;" in shown
    assert "<!channel>" not in shown and "<@U9>" not in shown
    # Nothing went to the Web API: there is no bot token.
    assert calls(slack, "/api/") == []
    replies = eventually(stack, lambda: all_settled(stack), "every reply settled")
    assert {d["status"] for d in replies} == {"delivered"}


def test_signature_rate_limit_and_allow_list_over_real_sockets(
    make_stack: Callable[..., Stack], slack: LocalServer
) -> None:
    # One web process: with the default memory:// storage each process counts on its own.
    limits = {"MOTIONHOOK_CHAT_RATE_LIMIT": "2/hour", "MOTIONHOOK_CHAT_ALLOWED": "T1"}
    stack = make_stack(**(SLACK_ENV | limits | {"WEB_CONCURRENCY": "1"}))
    stack.migrate()
    stack.start_web()

    def ask(body: bytes, headers: dict[str, str] | None = None) -> requests.Response:
        sent = slack_signed(body) if headers is None else headers
        return requests.post(stack.web_url + COMMANDS, data=body, headers=sent, timeout=10)

    body = command_body(slack.url)
    stale = slack_signed(body, timestamp=int(time.time()) - 301)
    forged = slack_signed(body, secret="not-the-secret")
    for headers in (stale, forged):
        assert ask(body, headers).status_code == 401
    assert slack.received == []

    texts = [ask(body).json()["text"] for _ in range(3)]
    assert [t.startswith("Queued") for t in texts] == [True, True, False]
    assert "please wait" in texts[2]
    other_team = ask(command_body(slack.url, team="T2", user="U7")).json()["text"]
    assert "not allowed" in other_team
    jobs = stack.api().get(stack.web_url + "/v1/jobs", timeout=5).json()["items"]
    assert len(jobs) == 2
