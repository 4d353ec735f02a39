"""Delivery policy: send one message, and decide what the answer means.

:func:`classify` maps an HTTP answer (or a transport error) to an :class:`Outcome`:

- ``delivered``: any 2xx.
- ``retry``: timeouts, connection errors, 408, 425, 429 and 5xx; ``Retry-After``
  (seconds or HTTP date) and Discord's JSON ``retry_after`` are honoured.
- ``permanent``: stop now and disable the subscription: 410; Slack ``no_service``,
  ``channel_not_found``, ``channel_is_archived``, ``action_prohibited``,
  ``invalid_token``, ``team_disabled``; Discord 401 and 404 (unknown webhook).
- ``failed``: any other 4xx, redirects (never followed) and refused targets.

:func:`pacing_delay` tells how long a receiver asks us to wait before the next
message to the same subscription. Retry timing itself is ``service.retry``.
"""

from __future__ import annotations

import functools
import http.client
import json
import math
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from http import HTTPStatus
from typing import Any, Literal
from urllib.parse import urlsplit

import requests
from requests_hardened.ip_filter import InvalidIPAddress
from urllib3.exceptions import NameResolutionError

from service.notifiers import Message
from service.outbound import TargetRefused
from service.retry import retry_after_field, retry_after_header

EXCERPT_BYTES = 1024

RETRYABLE_STATUSES = frozenset({408, 425, 429})
SLACK_PERMANENT_ERRORS = frozenset(
    {
        "no_service",
        "channel_not_found",
        "channel_is_archived",
        "action_prohibited",
        "invalid_token",
        "team_disabled",
    }
)
DISCORD_UNKNOWN_WEBHOOK = 10015
_INVALID_REQUEST_ERRORS = (
    requests.exceptions.InvalidURL,
    requests.exceptions.InvalidSchema,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidHeader,
    requests.exceptions.URLRequired,
)

Result = Literal["delivered", "retry", "failed", "permanent"]


@dataclass(frozen=True)
class Outcome:
    """What one attempt means for the delivery (and, if permanent, the subscription)."""

    result: Result
    reason: str
    retry_after: float | None = None


@dataclass
class AttemptResult:
    """One delivery attempt, as recorded: status, latency, error, excerpt and outcome."""

    status: int | None
    latency_ms: float
    error: str | None
    response_excerpt: str
    outcome: Outcome
    pacing: float


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    """Return ``headers`` with lower-case names."""
    return {key.lower(): value for key, value in headers.items()}


def _float(text: str | None) -> float | None:
    """Return ``text`` as a finite non-negative float, or None."""
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _json_object(body: bytes) -> dict[str, Any] | None:
    """Return ``body`` parsed as a JSON object, or None."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _retry_after(
    kind: str, status: int, headers: Mapping[str, str], body: bytes, now: datetime
) -> float | None:
    """Return the seconds a retryable answer asks us to wait (capped by service.retry)."""
    seconds = retry_after_header(headers.get("retry-after"), now)
    if seconds is None and kind == "discord" and status == 429:
        seconds = retry_after_field(_json_object(body)) or retry_after_header(
            headers.get("x-ratelimit-reset-after")
        )
    return seconds


def _slack_error(body: bytes) -> str:
    """Return the error code of a Slack answer (plain text, or JSON ``{"error": …}``)."""
    text = body.decode("utf-8", errors="replace").strip()
    if text.startswith("{"):
        payload = _json_object(body) or {}
        return str(payload.get("error") or "")
    return text


def _redact(url: str) -> str:
    """Return ``url`` as ``scheme://host[:port]`` only: paths and queries may hold tokens."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "the target"
    if not parts.scheme or not host:
        return "a relative location" if url.startswith("/") else "the target"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


def _status_phrase(status: int) -> str:
    """Return ``HTTP 404 Not Found`` style text for ``status``."""
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _classify_error(error: BaseException) -> Outcome:
    """Map a transport error to an outcome; the reason never includes the URL."""
    if isinstance(error, TargetRefused):
        return Outcome("failed", str(error))
    if isinstance(error, InvalidIPAddress):
        return Outcome("failed", f"url resolves to a forbidden address ({error})")
    if isinstance(error, requests.Timeout | TimeoutError):
        return Outcome("retry", "timed out")
    if isinstance(error, _INVALID_REQUEST_ERRORS):
        return Outcome("failed", f"invalid request ({type(error).__name__})")
    if isinstance(error, requests.ConnectionError):
        return Outcome("retry", "connection error")
    if isinstance(error, requests.RequestException | OSError):
        return Outcome("retry", f"network error ({type(error).__name__})")
    return Outcome("failed", f"unexpected error ({type(error).__name__})")


def classify(
    kind: str,
    *,
    status: int | None,
    headers: Mapping[str, str],
    body: bytes,
    error: BaseException | None,
    now: datetime,
) -> Outcome:
    """Decide what one answer (or transport error) from a ``kind`` endpoint means."""
    if error is not None:
        return _classify_error(error)
    if status is None:
        return Outcome("failed", "no response")
    lowered = _lower(headers)
    if 200 <= status < 300:
        return Outcome("delivered", _status_phrase(status))
    if 300 <= status < 400:
        location = lowered.get("location")
        if location:
            return Outcome("failed", f"redirect to {_redact(location)} not followed")
        return Outcome("failed", f"redirect ({_status_phrase(status)}) not followed")
    if status == 410:
        return Outcome("permanent", f"endpoint is gone ({_status_phrase(status)})")
    if kind == "slack" and status >= 400:
        code = _slack_error(body)
        if code in SLACK_PERMANENT_ERRORS:
            return Outcome("permanent", f"slack answered {code} ({_status_phrase(status)})")
    if kind == "discord" and status == 401:
        return Outcome("permanent", f"discord rejected the webhook ({_status_phrase(status)})")
    if kind == "discord" and status == 404:
        if (_json_object(body) or {}).get("code") == DISCORD_UNKNOWN_WEBHOOK:
            return Outcome(
                "permanent", f"discord: unknown webhook (code {DISCORD_UNKNOWN_WEBHOOK})"
            )
        return Outcome("permanent", f"discord webhook not found ({_status_phrase(status)})")
    if status in RETRYABLE_STATUSES or 500 <= status < 600:
        return Outcome(
            "retry", _status_phrase(status), _retry_after(kind, status, lowered, body, now)
        )
    if 400 <= status < 500:
        return Outcome("failed", _status_phrase(status))
    return Outcome("failed", f"unexpected status ({_status_phrase(status)})")


def pacing_delay(kind: str, status: int | None, headers: Mapping[str, str]) -> float:
    """Return the seconds a receiver asks us to wait before its next message.

    Only Discord says so (rate-limit headers). Slack's one message a second per
    webhook is a fixed pace that the claim reserves (``service.delivery``).
    """
    if kind == "discord":
        lowered = _lower(headers)
        remaining = _float(lowered.get("x-ratelimit-remaining"))
        if remaining == 0:
            return retry_after_header(lowered.get("x-ratelimit-reset-after")) or 0.0
    return 0.0


def _causes(error: BaseException) -> list[BaseException]:
    """Return ``error`` and what it wraps (args, urllib3 ``reason``, cause, context)."""
    found: list[BaseException] = []
    pending = [error]
    while pending and len(found) < 20:
        current = pending.pop(0)
        if any(current is seen for seen in found):
            continue
        found.append(current)
        linked = [*current.args, getattr(current, "reason", None)]
        linked += [current.__cause__, current.__context__]
        pending.extend(item for item in linked if isinstance(item, BaseException))
    return found


def describe_error(error: BaseException, url: str, timeout: float) -> str:
    """Return a short, user-facing description of a transport error, without URL tokens."""
    if isinstance(error, TargetRefused):
        return str(error)
    origin = _redact(url)
    if isinstance(error, requests.ConnectTimeout):
        return f"timed out connecting to {origin} after {timeout:g} s"
    if isinstance(error, requests.Timeout | TimeoutError):
        return f"timed out waiting for {origin} after {timeout:g} s"
    causes = _causes(error)
    descriptions: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
        ((NameResolutionError, socket.gaierror), f"could not resolve the host of {origin}"),
        (ConnectionRefusedError, f"connection refused by {origin}"),
        (ConnectionResetError, f"connection reset by {origin}"),
        (http.client.RemoteDisconnected, f"{origin} closed the connection without answering"),
        (ssl.SSLCertVerificationError, f"TLS certificate of {origin} did not verify"),
        ((ssl.SSLError, requests.exceptions.SSLError), f"TLS error with {origin}"),
        (InvalidIPAddress, f"{origin} resolves to a forbidden address"),
    )
    for types, text in descriptions:
        if any(isinstance(cause, types) for cause in causes):
            return text
    if isinstance(error, requests.ConnectionError):
        return f"could not connect to {origin}"
    return f"{type(error).__name__} while sending to {origin}"


def _read_excerpt(response: requests.Response, deadline: float) -> bytes:
    """Read at most EXCERPT_BYTES of the body, giving up at ``deadline``."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(chunk_size=EXCERPT_BYTES):
        chunks.append(chunk)
        size += len(chunk)
        if size >= EXCERPT_BYTES or time.monotonic() >= deadline:
            break
    return b"".join(chunks)[:EXCERPT_BYTES]


@functools.lru_cache(maxsize=4096)
def _prepared_url(url: str) -> str:
    """``url`` as requests sends it (IDNA host, quoted path); cached, as targets repeat."""
    prepared = requests.PreparedRequest()
    prepared.prepare_url(url, None)
    assert prepared.url is not None
    return prepared.url


def _post(
    session: requests.Session, url: str, message: Message, timeout: float
) -> requests.Response:
    """POST through the session's adapter: its pooled connections and its SSRF guard.

    ``session.post`` would also merge cookies, hooks and environment settings and
    handle redirects, none of which a delivery uses (it never follows redirects and
    must not carry cookies from one delivery to the next), and that merging costs
    more CPU than the request itself when a worker sends a thousand a second.
    """
    prepared = requests.PreparedRequest()
    # PreparedRequest.prepare without cookies and hooks (a delivery carries neither).
    prepared.prepare_method("POST")
    prepared.url = _prepared_url(url)
    prepared.prepare_headers({**session.headers, **message.headers})
    prepared.prepare_body(message.body, None)
    prepared.prepare_auth(None, url)  # credentials in the URL's userinfo, as requests does
    return session.get_adapter(url).send(
        prepared,
        stream=True,
        timeout=timeout,
        verify=True if session.verify is None else session.verify,
        cert=session.cert,
        proxies=session.proxies,
    )


def send(
    session: requests.Session,
    url: str,
    message: Message,
    *,
    kind: str,
    timeout: float,
    now: Callable[[], datetime],
) -> AttemptResult:
    """POST ``message`` to ``url`` once and classify the answer; network errors never raise.

    ``error`` is set when no HTTP answer was received (or its body could not be
    read); it names only ``scheme://host``, never the path or query of ``url``.
    """
    started = time.monotonic()
    try:
        response = _post(session, url, message, timeout)
    except (requests.RequestException, OSError) as exc:
        latency_ms = (time.monotonic() - started) * 1000
        error = describe_error(exc, url, timeout)
        outcome = classify(kind, status=None, headers={}, body=b"", error=exc, now=now())
        return AttemptResult(
            status=None,
            latency_ms=latency_ms,
            error=error,
            response_excerpt="",
            outcome=replace(outcome, reason=error),
            pacing=pacing_delay(kind, None, {}),
        )
    error_text = None
    with response:
        try:
            body = _read_excerpt(response, started + timeout)
        except (requests.RequestException, OSError) as exc:
            body = b""
            error_text = "reading the answer failed: " + describe_error(exc, url, timeout)
    latency_ms = (time.monotonic() - started) * 1000
    status = response.status_code
    outcome = classify(
        kind, status=status, headers=response.headers, body=body, error=None, now=now()
    )
    return AttemptResult(
        status=status,
        latency_ms=latency_ms,
        error=error_text,
        response_excerpt=body.decode("utf-8", errors="replace"),
        outcome=outcome,
        pacing=pacing_delay(kind, status, response.headers),
    )
