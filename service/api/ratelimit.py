"""Rate limits on the client API: one budget per bearer token, shared by every instance.

The key is a hash of the presented token when it is a valid one, else the client
address, so a token's budget never depends on which instance answers and bad
tokens cannot mint themselves fresh budgets. Callbacks (ModelsLab must never be
limited away), media, probes, metrics and docs are not limited. With
``MOTIONHOOK_RATELIMIT_STORAGE_URL=redis://…`` every instance shares the counts.
"""

from __future__ import annotations

import hashlib
import hmac

from flask import Flask, Response, request
from flask_limiter import ApplicationLimit, Limiter

from service.config import Settings

LIMITED_PREFIX = "/v1/"
UNLIMITED_PREFIXES = ("/v1/callbacks/",)
DISABLED = frozenset({"", "0", "off", "none", "false"})


def _presented_token() -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def rate_limit_key(tokens: tuple[str, ...]) -> str:
    """``token:<sha256 prefix>`` for a valid bearer token, else ``addr:<remote address>``."""
    token = _presented_token()
    if token:
        valid = False
        for candidate in tokens:
            valid |= hmac.compare_digest(candidate.encode(), token.encode())
        if valid:
            return "token:" + hashlib.sha256(token.encode()).hexdigest()[:32]
    return f"addr:{request.remote_addr or 'unknown'}"


def _exempt() -> bool:
    path = request.path
    return not path.startswith(LIMITED_PREFIX) or path.startswith(UNLIMITED_PREFIXES)


def _keep_retry_after_for_throttling(response: Response) -> Response:
    """flask-limiter stamps Retry-After on every answer; only 429 and 503 should say it."""
    if response.status_code not in (429, 503):
        response.headers.pop("Retry-After", None)
    return response


def init_limiter(app: Flask, settings: Settings) -> Limiter | None:
    """Limit ``/v1/*`` (except callbacks) to ``MOTIONHOOK_RATELIMIT`` per token."""
    if settings.ratelimit.strip().lower() in DISABLED:
        return None
    tokens = settings.api_tokens
    # Registered before the limiter, so it runs after the limiter's own after_request.
    app.after_request(_keep_retry_after_for_throttling)
    limit = ApplicationLimit(
        settings.ratelimit,
        key_function=lambda: rate_limit_key(tokens),
        error_message=(
            f"rate limit exceeded ({settings.ratelimit} per token); retry after the number "
            "of seconds in the Retry-After header"
        ),
    )
    limiter = Limiter(
        lambda: rate_limit_key(tokens),
        app=app,
        application_limits=[limit],
        storage_uri=settings.ratelimit_storage_url,
        headers_enabled=True,
        key_prefix=str(app.config.get("RATELIMIT_KEY_PREFIX") or "motionhook"),
        # A rate-limit store that is down must not take the API down with it: count in
        # this process until it is back (flask-limiter probes it with backoff).
        in_memory_fallback_enabled=True,
        swallow_errors=True,
    )
    limiter.request_filter(_exempt)
    return limiter
