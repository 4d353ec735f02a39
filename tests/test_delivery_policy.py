"""Delivery policy: classification of real HTTP answers and pacing."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
import standardwebhooks

from service.notifiers import Message, render_message
from service.notifiers.policy import (
    AttemptResult,
    Outcome,
    classify,
    pacing_delay,
    send,
)
from service.notifiers.webhook import generate_secret
from service.outbound import TargetRefused, make_session
from service.retry import MAX_RETRY_AFTER

NOW = datetime(2025, 5, 1, 12, 0, 0, tzinfo=UTC)
SLACK_PATH = "/services/T000/B000/XXXXSECRETXXXX"
DISCORD_PATH = "/api/webhooks/123/SECRET-TOKEN"
MESSAGE = Message(body=b'{"text":"hi"}', headers={"content-type": "application/json"})


@dataclass
class Reply:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore clients that hang up early (timeouts and short reads are tested)."""


class Receiver:
    """A real HTTP endpoint on 127.0.0.1 answering each path with a scripted reply."""

    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                path = self.path.split("?", 1)[0]
                receiver.received.append((path, dict(self.headers), body))
                reply = receiver.replies.get(path, Reply())
                if reply.hang:
                    receiver.release.wait(10)
                    return
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                """Keep test output clean."""

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def reply(self, path: str, **reply: Any) -> str:
        self.replies[path] = Reply(**reply)
        return self.url(path)

    def paths(self) -> list[str]:
        return [path for path, _, _ in self.received]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.thread.start()
    yield server
    server.release.set()
    server.server.shutdown()
    server.server.server_close()
    server.thread.join(timeout=5)


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with make_session(allow_private=True) as shared:
        yield shared


def deliver(
    session: requests.Session, url: str, kind: str = "webhook", timeout: float = 2.0
) -> AttemptResult:
    return send(session, url, MESSAGE, kind=kind, timeout=timeout, now=lambda: NOW)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- send() against real endpoints ------------------------------------------------------


def test_2xx_is_delivered(receiver: Receiver, session: requests.Session) -> None:
    url = receiver.reply("/hook", status=204, body=b"")

    result = deliver(session, url)

    assert result.outcome.result == "delivered"
    assert result.status == 204
    assert result.error is None
    assert result.latency_ms > 0
    assert receiver.received[0][2] == MESSAGE.body


def test_signed_webhook_arrives_verifiable(receiver: Receiver, session: requests.Session) -> None:
    secret = generate_secret()
    event = {"id": "evt_1", "type": "test.ping", "created_at": "2025-05-01T12:00:00Z", "data": {}}
    message = render_message("webhook", event, secrets=[secret])

    result = send(
        session, receiver.url("/hook"), message, kind="webhook", timeout=2, now=lambda: NOW
    )

    assert result.outcome.result == "delivered"
    _, headers, body = receiver.received[0]
    assert standardwebhooks.Webhook(secret).verify(body, headers) == event


def test_slack_no_service_is_permanent(receiver: Receiver, session: requests.Session) -> None:
    url = receiver.reply(SLACK_PATH, status=404, body=b"no_service")

    result = deliver(session, url, "slack")

    assert result.outcome.result == "permanent"
    assert "no_service" in result.outcome.reason
    assert result.response_excerpt == "no_service"


@pytest.mark.parametrize(
    ("status", "code"),
    [(403, "invalid_token"), (404, "channel_not_found"), (410, "channel_is_archived")],
)
def test_slack_dead_webhook_answers_are_permanent(
    receiver: Receiver, session: requests.Session, status: int, code: str
) -> None:
    url = receiver.reply(SLACK_PATH, status=status, body=code.encode())

    assert deliver(session, url, "slack").outcome.result == "permanent"


def test_slack_invalid_payload_is_failed_not_permanent(
    receiver: Receiver, session: requests.Session
) -> None:
    url = receiver.reply(SLACK_PATH, status=400, body=b"invalid_payload")

    assert deliver(session, url, "slack").outcome == Outcome("failed", "HTTP 400 Bad Request")


def test_discord_unknown_webhook_is_permanent(
    receiver: Receiver, session: requests.Session
) -> None:
    body = json.dumps({"message": "Unknown Webhook", "code": 10015}).encode()
    url = receiver.reply(DISCORD_PATH, status=404, body=body)

    result = deliver(session, url, "discord")

    assert result.outcome.result == "permanent"
    assert "10015" in result.outcome.reason


@pytest.mark.parametrize(("status", "body"), [(401, b'{"code": 50027}'), (404, b"not found")])
def test_discord_unauthorized_or_missing_webhook_is_permanent(
    receiver: Receiver, session: requests.Session, status: int, body: bytes
) -> None:
    url = receiver.reply(DISCORD_PATH, status=status, body=body)

    assert deliver(session, url, "discord").outcome.result == "permanent"


def test_redirect_is_failed_and_not_followed(receiver: Receiver, session: requests.Session) -> None:
    url = receiver.reply("/moved", status=301, body=b"", headers={"Location": "/new?token=t"})

    result = deliver(session, url)

    assert result.status == 301
    assert result.outcome.result == "failed"
    assert result.outcome.reason == "redirect to a relative location not followed"
    assert receiver.paths() == ["/moved"]


def test_redirect_reason_names_only_the_target_origin(
    receiver: Receiver, session: requests.Session
) -> None:
    location = "https://elsewhere.example:8443/api/webhooks/1/TOKEN?x=1"
    url = receiver.reply("/moved", status=307, body=b"", headers={"Location": location})

    result = deliver(session, url)

    assert result.outcome.reason == "redirect to https://elsewhere.example:8443 not followed"


def test_endpoint_that_never_answers_is_retried_after_timeout(
    receiver: Receiver, session: requests.Session
) -> None:
    url = receiver.reply(SLACK_PATH, hang=True) + "?token=abc"

    result = deliver(session, url, "slack", timeout=0.5)

    assert result.status is None
    assert result.outcome.result == "retry"
    assert result.error is not None
    assert result.error.startswith("timed out waiting for http://127.0.0.1:")
    assert result.outcome.reason == result.error
    assert "SECRET" not in result.error
    assert "token" not in result.error
    assert 400 <= result.latency_ms < 5000


def test_connection_refused_is_retried_without_leaking_the_path(session: requests.Session) -> None:
    port = closed_port()

    result = deliver(session, f"http://127.0.0.1:{port}{DISCORD_PATH}?wait=true", "discord")

    assert result.outcome.result == "retry"
    assert result.error == f"connection refused by http://127.0.0.1:{port}"


def test_refused_target_is_failed_without_retry(receiver: Receiver) -> None:
    guarded = make_session(allow_private=False)

    result = deliver(guarded, receiver.url(DISCORD_PATH), "discord")

    assert result.outcome == Outcome("failed", "url resolves to a loopback address (127.0.0.1)")
    assert result.error == result.outcome.reason
    assert receiver.received == []


def test_429_retry_after_seconds_is_honoured(receiver: Receiver, session: requests.Session) -> None:
    url = receiver.reply("/hook", status=429, body=b"slow down", headers={"Retry-After": "2"})

    result = deliver(session, url)

    assert result.outcome == Outcome("retry", "HTTP 429 Too Many Requests", retry_after=2.0)


def test_retry_after_http_date_is_relative_to_now(
    receiver: Receiver, session: requests.Session
) -> None:
    when = format_datetime(NOW + timedelta(seconds=120), usegmt=True)
    url = receiver.reply("/hook", status=503, body=b"", headers={"Retry-After": when})

    result = deliver(session, url)

    assert result.outcome.result == "retry"
    assert result.outcome.retry_after == pytest.approx(120.0)


def test_discord_429_body_retry_after_is_honoured(
    receiver: Receiver, session: requests.Session
) -> None:
    body = json.dumps({"message": "You are being rate limited.", "retry_after": 1.5}).encode()
    url = receiver.reply(DISCORD_PATH, status=429, body=body)

    result = deliver(session, url, "discord")

    assert result.outcome == Outcome("retry", "HTTP 429 Too Many Requests", retry_after=1.5)


@pytest.mark.parametrize("status", [408, 425, 500, 502, 503])
def test_server_errors_and_throttling_are_retried(
    receiver: Receiver, session: requests.Session, status: int
) -> None:
    url = receiver.reply("/hook", status=status, body=b"oops")

    result = deliver(session, url)

    assert result.outcome.result == "retry"
    assert result.outcome.retry_after is None


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_other_client_errors_fail_without_disabling(
    receiver: Receiver, session: requests.Session, status: int
) -> None:
    url = receiver.reply("/hook", status=status, body=b"nope")

    assert deliver(session, url).outcome.result == "failed"


def test_410_is_permanent_for_every_kind(receiver: Receiver, session: requests.Session) -> None:
    url = receiver.reply("/gone", status=410, body=b"")

    for kind in ("webhook", "slack", "discord"):
        assert deliver(session, url, kind).outcome.result == "permanent"


def test_only_a_short_excerpt_of_a_huge_answer_is_read(
    receiver: Receiver, session: requests.Session
) -> None:
    url = receiver.reply("/big", status=200, body=b"\xe2\x82\xac" * 2_000_000)

    result = deliver(session, url)

    assert result.outcome.result == "delivered"
    assert len(result.response_excerpt.encode()) <= 1024 + 3
    assert result.response_excerpt.startswith("€€€")


def test_discord_rate_limit_headers_set_pacing(
    receiver: Receiver, session: requests.Session
) -> None:
    headers = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset-After": "0.75"}
    url = receiver.reply(DISCORD_PATH, status=204, body=b"", headers=headers)

    result = deliver(session, url, "discord")

    assert result.outcome.result == "delivered"
    assert result.pacing == 0.75


# --- classify() and pacing (pure) -------------------------------------------------------


def test_classify_transport_errors() -> None:
    def outcome(error: BaseException) -> str:
        return classify("webhook", status=None, headers={}, body=b"", error=error, now=NOW).result

    assert outcome(requests.ReadTimeout()) == "retry"
    assert outcome(requests.ConnectionError()) == "retry"
    assert outcome(TargetRefused("url must use http or https")) == "failed"
    assert outcome(requests.exceptions.InvalidSchema()) == "failed"


def test_classify_reads_slack_json_errors_and_header_case() -> None:
    body = b'{"ok": false, "error": "team_disabled"}'
    result = classify("slack", status=403, headers={}, body=body, error=None, now=NOW)
    assert result.result == "permanent"

    result = classify(
        "webhook", status=429, headers={"retry-after": "7"}, body=b"", error=None, now=NOW
    )
    assert result.retry_after == 7.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("garbage", None),
        ("-5", None),
        ("Thu, 01 May 2025 11:00:00 GMT", 0.0),  # a date in the past: retry now
        ("999999999", MAX_RETRY_AFTER),
    ],
)
def test_retry_after_edge_cases(value: str, expected: float | None) -> None:
    result = classify(
        "webhook", status=503, headers={"Retry-After": value}, body=b"", error=None, now=NOW
    )

    assert result.retry_after == expected


def test_pacing_per_kind() -> None:
    # Slack's one message a second is reserved at claim time, not asked for by Slack.
    assert pacing_delay("slack", 200, {}) == 0.0
    assert pacing_delay("webhook", 200, {"X-RateLimit-Remaining": "0"}) == 0.0
    assert pacing_delay("discord", 204, {"X-RateLimit-Remaining": "3"}) == 0.0
    headers = {"x-ratelimit-remaining": "0", "x-ratelimit-reset-after": "2.5"}
    assert pacing_delay("discord", 204, headers) == 2.5
