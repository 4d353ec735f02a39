"""The Slack endpoints: signatures, ``/animate`` and the message shortcut to a queued job.

Requests are signed as Slack signs them (``v0=`` HMAC-SHA256 of ``v0:timestamp:body``
with the signing secret, computed here by hand); images, ``url_private`` files and
``response_url`` are served by a local fake of Slack over a real socket.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.chat.common import ChatRefusal
from service.chat.slack import read_command, read_shortcut
from tests.local_http import Answer, LocalServer, Received
from tests.test_chat_discord import jobs, make_app, png

__all__ = ["make_app"]  # the fixture, shared with the Discord tests

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
BOT_TOKEN = "xoxb-test-bot-token"
COMMANDS = "/v1/chat/slack/commands"
INTERACTIONS = "/v1/chat/slack/interactions"
FORM = "application/x-www-form-urlencoded"


def slack_signed(
    body: bytes, *, secret: str = SIGNING_SECRET, timestamp: int | None = None
) -> dict[str, str]:
    """The headers Slack sends: ``v0=`` + HMAC-SHA256 over ``v0:{timestamp}:{body}``."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    base = b"v0:" + stamp.encode() + b":" + body
    digest = hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return {
        "X-Slack-Request-Timestamp": stamp,
        "X-Slack-Signature": f"v0={digest}",
        "Content-Type": FORM,
    }


def command_body(
    slack_url: str,
    text: str | None = None,
    *,
    team: str = "T1",
    user: str = "U1",
) -> bytes:
    """A ``/animate`` slash command as Slack posts it."""
    fields = {
        "token": "legacy-verification-token",
        "team_id": team,
        "team_domain": "example",
        "channel_id": "C1",
        "channel_name": "general",
        "user_id": user,
        "user_name": "someone",
        "command": "/animate",
        "text": f"{slack_url}/public/cat.png the cat waves" if text is None else text,
        "api_app_id": "A1",
        "response_url": f"{slack_url}/commands/T1/1/response-secret",
        "trigger_id": "1.2.3",
    }
    return urlencode(fields).encode()


def shortcut_payload(
    slack_url: str,
    *,
    text: str = "the cat waves",
    mimetype: str = "image/png",
    callback_id: str = "animate_image",
    thread_ts: str | None = None,
    team: str = "T1",
) -> dict[str, Any]:
    """A message shortcut on a message that carries one file, as Slack sends it."""
    message: dict[str, Any] = {
        "type": "message",
        "user": "U2",
        "ts": "1700000000.000100",
        "text": text,
        "files": [
            {
                "id": "F0",
                "name": "cat.png",
                "mimetype": mimetype,
                "size": 1000,
                "url_private": f"{slack_url}/files/cat.png",
            }
        ],
    }
    if thread_ts:
        message["thread_ts"] = thread_ts
    return {
        "type": "message_action",
        "callback_id": callback_id,
        "team": {"id": team, "domain": "example"},
        "channel": {"id": "C1", "name": "general"},
        "user": {"id": "U1", "name": "someone"},
        "message_ts": message["ts"],
        "message": message,
        "response_url": f"{slack_url}/actions/T1/1/response-secret",
        "trigger_id": "1.2.3",
    }


def interaction_body(payload: dict[str, Any]) -> bytes:
    return urlencode({"payload": json.dumps(payload)}).encode()


def api_params(request: Received) -> dict[str, Any]:
    """The parameters of a Web API call: query string, then a form or JSON body."""
    params: dict[str, Any] = dict(parse_qsl(urlsplit(request.path).query))
    if request.headers.get("content-type", "").startswith("application/json"):
        params.update(json.loads(request.body))
    elif request.body:
        params.update(parse_qsl(request.body.decode()))
    return params


def fake_slack(
    *, ratelimit_first_upload: bool = False, complete_error: str | None = None
) -> Callable[[Received], Answer]:
    """Slack's Web API, upload URL, ``response_url`` and file hosting, in one responder."""
    image = png()
    upload_calls: list[int] = []

    def reply(payload: dict[str, Any], status: int = 200, **headers: str) -> Answer:
        return status, {"Content-Type": "application/json", **headers}, json.dumps(payload).encode()

    def respond(request: Received) -> Answer:
        path = urlsplit(request.path).path
        bearer = request.headers.get("authorization") == f"Bearer {BOT_TOKEN}"
        if path == "/public/cat.png":
            return 200, {"Content-Type": "image/png"}, image
        if path == "/public/notes.txt":
            return 200, {"Content-Type": "text/plain"}, b"not an image at all"
        if path.startswith("/files/"):
            # url_private: only with the bot token.
            if not bearer:
                return 403, {"Content-Type": "text/plain"}, b"forbidden"
            return 200, {"Content-Type": "image/png"}, image
        if path.startswith(("/commands/", "/actions/")):
            return 200, {"Content-Type": "text/plain"}, b"ok"
        if path.startswith("/upload/"):
            return 200, {"Content-Type": "text/plain"}, f"OK - {len(request.body)}".encode()
        if path.startswith("/api/"):
            if not bearer:
                return reply({"ok": False, "error": "invalid_auth"})
            method = path.removeprefix("/api/")
            if method == "files.getUploadURLExternal":
                upload_calls.append(1)
                if ratelimit_first_upload and len(upload_calls) == 1:
                    return reply({"ok": False, "error": "ratelimited"}, 429, **{"Retry-After": "1"})
                host = request.headers["host"]
                return reply(
                    {"ok": True, "upload_url": f"http://{host}/upload/F1", "file_id": "F1"}
                )
            if method == "files.completeUploadExternal":
                if complete_error:
                    return reply({"ok": False, "error": complete_error})
                return reply({"ok": True, "files": [{"id": "F1", "title": "motionhook video"}]})
            if method == "chat.postMessage":
                return reply({"ok": True, "ts": "1700000001.000200"})
            return reply({"ok": False, "error": "unknown_method"})
        return 404, {"Content-Type": "text/plain"}, b"not found"

    return respond


@pytest.fixture
def slack_api() -> Iterator[LocalServer]:
    with LocalServer(fake_slack()) as server:
        yield server


@pytest.fixture
def slack_app(make_app: Callable[..., Flask]) -> Callable[..., Flask]:
    def make(**overrides: Any) -> Flask:
        return make_app(**({"SLACK_SIGNING_SECRET": SIGNING_SECRET} | overrides))

    return make


def post(client: FlaskClient, url: str, body: bytes, **sign: Any) -> Any:
    return client.post(url, data=body, headers=slack_signed(body, **sign))


def posted_to_response_url(server: LocalServer) -> list[dict[str, Any]]:
    return [
        json.loads(r.body)
        for r in server.received
        if r.path.startswith(("/commands/", "/actions/"))
    ]


# Parsing (no requests).


def test_command_text_is_an_image_url_then_the_prompt() -> None:
    form = {"text": "<https://img.example/cat.png|cat.png>  the cat  waves ", "user_id": "U1"}
    ask = read_command(form)
    assert ask.image_url == "https://img.example/cat.png"
    assert ask.prompt == "the cat  waves"
    assert ask.user == "U1" and ask.thread_ts is None and not ask.private_file


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("", "image: give the URL"),
        ("cat.png the cat waves", "is not an http(s) URL"),
        ("ftp://host/cat.png the cat waves", "is not an http(s) URL"),
        ("https://img.example/cat.png", "prompt"),
        ("https://img.example/cat.png " + "x" * 1001, "prompt: at most 1000"),
    ],
)
def test_command_refusals_name_the_problem(text: str, named: str) -> None:
    with pytest.raises(ChatRefusal, match=re.escape(named)):
        read_command({"text": text, "user_id": "U1"})


def test_shortcut_reads_the_image_file_the_text_and_the_thread() -> None:
    ask = read_shortcut(shortcut_payload("https://files.example"), max_bytes=10_000)
    assert ask.image_url == "https://files.example/files/cat.png" and ask.private_file
    assert ask.prompt == "the cat waves"
    assert ask.thread_ts == "1700000000.000100"  # the message itself starts the thread
    assert ask.source == {"kind": "slack", "workspace": "T1", "channel": "C1", "user": "U1"}
    in_thread = shortcut_payload("https://files.example", thread_ts="1699999999.000001")
    assert read_shortcut(in_thread, max_bytes=10_000).thread_ts == "1699999999.000001"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"mimetype": "application/pdf"}, "no image file (found application/pdf)"),
        ({"text": "  "}, "prompt"),
        ({"callback_id": "something_else"}, "not supported"),
    ],
)
def test_shortcut_refusals_name_the_problem(change: dict[str, Any], named: str) -> None:
    with pytest.raises(ChatRefusal, match=re.escape(named)):
        read_shortcut(shortcut_payload("https://files.example", **change), max_bytes=10_000)


@pytest.mark.parametrize(
    "message",
    [None, "text", {"files": "F0", "text": "x"}, {"files": [1, None], "text": "x"}],
    ids=["no message", "message not an object", "files not a list", "files not objects"],
)
def test_shortcut_of_odd_shape_is_refused_not_a_crash(message: Any) -> None:
    payload = shortcut_payload("https://files.example") | {"message": message}
    with pytest.raises(ChatRefusal, match="image: the message has no image file"):
        read_shortcut(payload, max_bytes=10_000)


def test_shortcut_refuses_a_file_over_the_upload_limit() -> None:
    with pytest.raises(ChatRefusal, match="image: larger than 999 bytes"):
        read_shortcut(shortcut_payload("https://files.example"), max_bytes=999)


# The endpoints.


@pytest.mark.parametrize("url", [COMMANDS, INTERACTIONS])
def test_not_configured_answers_404_naming_the_setting(
    make_app: Callable[..., Flask], slack_api: LocalServer, url: str
) -> None:
    client = make_app().test_client()
    response = post(client, url, command_body(slack_api.url))
    assert response.status_code == 404
    assert "MOTIONHOOK_SLACK_SIGNING_SECRET" in response.get_json()["message"]


@pytest.mark.parametrize(
    "breakage", ["other secret", "tampered body", "stale", "no headers", "not a number"]
)
@pytest.mark.parametrize("url", [COMMANDS, INTERACTIONS])
def test_bad_or_stale_signature_is_401_and_creates_nothing(
    slack_app: Callable[..., Flask], slack_api: LocalServer, breakage: str, url: str
) -> None:
    flask_app = slack_app(SLACK_BOT_TOKEN=BOT_TOKEN)
    body = (
        command_body(slack_api.url)
        if url == COMMANDS
        else interaction_body(shortcut_payload(slack_api.url))
    )
    headers = slack_signed(body)
    if breakage == "other secret":
        headers = slack_signed(body, secret="another-secret")
    elif breakage == "tampered body":
        body = body.replace(b"cat", b"dog")
    elif breakage == "stale":
        # Correctly signed, but six minutes old: outside Slack's 5-minute window.
        headers = slack_signed(body, timestamp=int(time.time()) - 360)
    elif breakage == "no headers":
        headers = {"Content-Type": FORM}
    else:
        headers["X-Slack-Request-Timestamp"] = "yesterday"
    response = flask_app.test_client().post(url, data=body, headers=headers)
    assert response.status_code == 401
    assert "signature" in response.get_json()["message"]
    assert jobs(flask_app) == []
    assert slack_api.received == []


def test_command_acks_queued_and_makes_an_ordinary_job_with_its_source(
    slack_app: Callable[..., Flask], slack_api: LocalServer
) -> None:
    flask_app = slack_app()
    client = flask_app.test_client()
    started = time.monotonic()
    response = post(client, COMMANDS, command_body(slack_api.url))
    assert time.monotonic() - started < 3.0
    assert response.status_code == 200
    answer = response.get_json()
    assert answer["response_type"] == "ephemeral"
    assert answer["text"].startswith("Queued, position 1: _the cat waves_.")
    assert [r.path for r in slack_api.received] == ["/public/cat.png"]
    [job] = jobs(flask_app)
    assert job.project_id == "prj_default"
    assert job.input["prompt"] == "the cat waves"
    assert job.input["image_key"].startswith("inputs/")
    assert job.chat_reply is not None and job.chat_reply["kind"] == "slack_reply"
    resource = client.get(f"/v1/jobs/{job.id}", headers={"Authorization": "Bearer test-token"})
    assert resource.status_code == 200
    body = resource.get_json()
    assert body["source"] == {"kind": "slack", "workspace": "T1", "channel": "C1", "user": "U1"}
    # The response_url (a secret) is not in the resource.
    assert "response-secret" not in json.dumps(body)
    # A second request waits behind the first.
    second = post(client, COMMANDS, command_body(slack_api.url, user="U2")).get_json()
    assert second["text"].startswith("Queued, position 2:")


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("", "image: give the URL"),
        ("{url}/public/cat.png", "prompt"),
        ("{url}/public/notes.txt the cat waves", "image"),
        ("{url}/missing.png the cat waves", "image: the image host answered 404"),
        ("not-a-url the cat waves", "not an http(s) URL"),
    ],
)
def test_bad_command_gets_an_ephemeral_message_and_no_job(
    slack_app: Callable[..., Flask], slack_api: LocalServer, text: str, named: str
) -> None:
    flask_app = slack_app()
    body = command_body(slack_api.url, text.format(url=slack_api.url))
    response = post(flask_app.test_client(), COMMANDS, body)
    assert response.status_code == 200
    answer = response.get_json()
    assert answer["response_type"] == "ephemeral"
    assert answer["text"].startswith("Sorry, I cannot animate that:")
    assert named in answer["text"]
    assert jobs(flask_app) == []


def test_prompt_mentions_are_escaped_in_the_ack(
    slack_app: Callable[..., Flask], slack_api: LocalServer
) -> None:
    text = f"{slack_api.url}/public/cat.png <!channel> & <@U999> look"
    answer = post(slack_app().test_client(), COMMANDS, command_body(slack_api.url, text))
    shown = answer.get_json()["text"]
    assert "&lt;!channel&gt; &amp; &lt;@U999&gt; look" in shown
    assert "<!channel>" not in shown and "<@U999>" not in shown


def test_rate_limit_per_chat_user(slack_app: Callable[..., Flask], slack_api: LocalServer) -> None:
    flask_app = slack_app(CHAT_RATE_LIMIT="2/hour")
    client = flask_app.test_client()
    texts = [post(client, COMMANDS, command_body(slack_api.url)).get_json()["text"] for _ in "abc"]
    assert [t.startswith("Queued") for t in texts] == [True, True, False]
    assert "2 videos per 1 hour" in texts[2]
    other = post(client, COMMANDS, command_body(slack_api.url, user="U2")).get_json()
    assert other["text"].startswith("Queued")
    assert len(jobs(flask_app)) == 3


def test_allow_list_holds(slack_app: Callable[..., Flask], slack_api: LocalServer) -> None:
    flask_app = slack_app(CHAT_ALLOWED="T1,g1")
    client = flask_app.test_client()
    refused = post(client, COMMANDS, command_body(slack_api.url, team="T2")).get_json()
    assert "not allowed" in refused["text"]
    assert (
        post(client, COMMANDS, command_body(slack_api.url)).get_json()["text"].startswith("Queued")
    )
    assert len(jobs(flask_app)) == 1


def test_shortcut_reads_url_private_with_the_bot_token_and_acks_on_response_url(
    slack_app: Callable[..., Flask], slack_api: LocalServer
) -> None:
    flask_app = slack_app(SLACK_BOT_TOKEN=BOT_TOKEN)
    body = interaction_body(shortcut_payload(slack_api.url, text="wave <!here>"))
    response = post(flask_app.test_client(), INTERACTIONS, body)
    assert response.status_code == 200
    assert response.get_data() == b""
    download = next(r for r in slack_api.received if r.path == "/files/cat.png")
    assert download.headers["authorization"] == f"Bearer {BOT_TOKEN}"
    [ack] = posted_to_response_url(slack_api)
    assert ack["response_type"] == "ephemeral"
    assert ack["text"].startswith("Queued, position 1: _wave &lt;!here&gt;_.")
    assert "in the thread" in ack["text"]
    [job] = jobs(flask_app)
    assert job.source == {"kind": "slack", "workspace": "T1", "channel": "C1", "user": "U1"}
    assert job.chat_reply is not None
    assert job.chat_reply["thread_ts"] == "1700000000.000100"
    assert job.chat_reply["response_url_uses"] == 1


def test_other_interactions_are_only_acknowledged(
    slack_app: Callable[..., Flask], slack_api: LocalServer
) -> None:
    flask_app = slack_app(SLACK_BOT_TOKEN=BOT_TOKEN)
    # A click on the "Open video" link button of a posted result.
    click = {
        "type": "block_actions",
        "actions": [{"action_id": "open_video", "type": "button"}],
        "response_url": f"{slack_api.url}/actions/T1/2/response-secret",
    }
    response = post(flask_app.test_client(), INTERACTIONS, interaction_body(click))
    assert response.status_code == 200
    assert slack_api.received == []
    assert jobs(flask_app) == []


@pytest.mark.parametrize(
    ("token", "change", "named"),
    [
        (None, {}, "MOTIONHOOK_SLACK_BOT_TOKEN is not set"),
        ("xoxb-wrong", {}, "image: Slack answered 403"),
        (BOT_TOKEN, {"mimetype": "video/mp4"}, "no image file"),
        (BOT_TOKEN, {"callback_id": "other"}, "not supported"),
    ],
)
def test_bad_shortcut_is_refused_on_response_url_and_makes_no_job(
    slack_app: Callable[..., Flask],
    slack_api: LocalServer,
    token: str | None,
    change: dict[str, Any],
    named: str,
) -> None:
    flask_app = slack_app(SLACK_BOT_TOKEN=token)
    body = interaction_body(shortcut_payload(slack_api.url, **change))
    response = post(flask_app.test_client(), INTERACTIONS, body)
    assert response.status_code == 200
    [refusal] = posted_to_response_url(slack_api)
    assert refusal["response_type"] == "ephemeral"
    assert refusal["text"].startswith("Sorry, I cannot animate that:")
    assert named in refusal["text"]
    assert jobs(flask_app) == []
