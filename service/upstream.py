"""The one place motionhook talks to ModelsLab (submit and fetch).

Every answer becomes an :class:`UpstreamAnswer`: a parsed result, a permanent
rejection (400/401/402 or ``status: error``: the job fails, no retry) or a
transient problem (429, 5xx, timeouts: the job stays queued and is retried).
The API key (the instance's, or the project's own) is sent upstream and nowhere
else: both are scrubbed from any message.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import requests
from marshmallow import ValidationError

from schemas.upstream import UPSTREAM_RESPONSE, UpstreamResult, UpstreamStatus
from service.config import SIMULATOR_API_KEY
from service.metrics import record_upstream
from service.retry import retry_after_field, retry_after_header

RESULT, REJECTED, RETRY = "result", "rejected", "retry"
PERMANENT_HTTP = frozenset({400, 401, 402, 403, 404, 405, 413, 422})
REDACTED = b"[redacted]"


def redact_api_key(data: bytes, *api_keys: str | None) -> bytes:
    """Remove ModelsLab keys from bytes that came from upstream, before anything keeps them.

    Submit and fetch answers and callbacks may echo the key (in an error message,
    say); they are stored in the audit log, shown in jobs and fanned out in events.
    """
    for api_key in sorted({key for key in api_keys if key}, key=len, reverse=True):
        if api_key != SIMULATOR_API_KEY:
            data = data.replace(api_key.encode(), REDACTED)
    return data


@dataclass(frozen=True)
class UpstreamAnswer:
    kind: str
    result: UpstreamResult | None = None
    message: str = ""
    retry_after: float | None = None
    http_status: int | None = None
    raw: bytes = b""
    latency: float = 0.0


class UpstreamClient:
    """ModelsLab's img2video and fetch endpoints over one pooled session."""

    def __init__(
        self, base_url: str, api_key: str, *, timeout: float, session: requests.Session
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.session = session

    def submit(self, params: dict[str, Any], api_key: str | None = None) -> UpstreamAnswer:
        """POST an img2video request with ``api_key`` (else the instance's key);
        ``params`` must not contain the key."""
        key = api_key or self.api_key
        answer = self._post("/video/img2video", {**params, "key": key}, key)
        record_upstream("submit", answer)
        return answer

    def fetch(self, upstream_id: str, api_key: str | None = None) -> UpstreamAnswer:
        """POST to the fetch endpoint for a job ModelsLab knows as ``upstream_id``."""
        key = api_key or self.api_key
        answer = self._post(f"/video/fetch/{upstream_id}", {"key": key}, key)
        record_upstream("fetch", answer)
        return answer

    def _post(self, path: str, body: dict[str, Any], api_key: str) -> UpstreamAnswer:
        def scrub(text: str) -> str:
            return redact_api_key(text.encode(), api_key, self.api_key).decode()

        started = time.perf_counter()
        try:
            response = self.session.post(
                self.base_url + path, json=body, timeout=self.timeout, allow_redirects=False
            )
        except requests.Timeout:
            return UpstreamAnswer(
                RETRY,
                message="ModelsLab did not answer in time",
                latency=time.perf_counter() - started,
            )
        except requests.RequestException as exc:
            return UpstreamAnswer(
                RETRY,
                message=scrub(f"could not reach ModelsLab: {type(exc).__name__}"),
                latency=time.perf_counter() - started,
            )
        latency = time.perf_counter() - started
        raw = redact_api_key(response.content, api_key, self.api_key)
        status = response.status_code
        payload: Any = None
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        message = ""
        if isinstance(payload, dict):
            message = str(payload.get("message") or payload.get("messege") or "")
        message = scrub(message)[:1000]

        def answer(kind: str, **extra: Any) -> UpstreamAnswer:
            return UpstreamAnswer(kind, http_status=status, raw=raw, latency=latency, **extra)

        if status == 429:
            retry_after = retry_after_field(
                payload if isinstance(payload, dict) else None
            ) or retry_after_header(response.headers.get("Retry-After"))
            return answer(
                RETRY, message=message or "rate limited by ModelsLab", retry_after=retry_after
            )
        if status >= 500 or status == 408:
            return answer(RETRY, message=f"ModelsLab answered HTTP {status}")
        if 300 <= status < 400:
            return answer(RETRY, message=f"ModelsLab answered a redirect (HTTP {status})")
        if status in PERMANENT_HTTP or 400 <= status < 500:
            return answer(
                REJECTED, message=message or f"ModelsLab refused the request (HTTP {status})"
            )
        if not isinstance(payload, dict):
            return answer(RETRY, message="ModelsLab answered with a body that is not JSON")
        try:
            result: UpstreamResult = UPSTREAM_RESPONSE.load(payload)
        except ValidationError:
            return answer(RETRY, message="ModelsLab answered without a status")
        if result.status == UpstreamStatus.FAILED:
            return answer(
                REJECTED,
                result=result,
                message=scrub(result.message or "ModelsLab reported an error"),
            )
        return answer(RESULT, result=result)
