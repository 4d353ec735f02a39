"""Rate limits on the client API: one budget per project, shared by every instance.

The key is the project of a valid client token (all of a project's tokens share
its budget), a hash of the token for admin tokens, else the client address, so a
budget never depends on which instance answers and bad tokens cannot mint
themselves fresh budgets. Callbacks (ModelsLab must never be
limited away), media, probes, metrics and docs are not limited. With
``MOTIONHOOK_RATELIMIT_STORAGE_URL=redis://…`` every instance shares the counts.
"""

from __future__ import annotations

from flask import Flask, Response, request
from flask_limiter import ApplicationLimit, Limiter
from sqlalchemy.exc import SQLAlchemyError

from service.api.auth import current_principal
from service.config import Settings

LIMITED_PREFIX = "/v1/"
UNLIMITED_PREFIXES = ("/v1/callbacks/",)
DISABLED = frozenset({"", "0", "off", "none", "false"})


def rate_limit_key() -> str:
    """``project:<id>`` for a valid client token, ``token:<sha256 prefix>`` for an admin
    token, else ``addr:<remote address>``."""
    try:
        principal = current_principal()
    except SQLAlchemyError:
        # The database is down: the request fails in auth; count it by address meanwhile.
        principal = None
    if principal is None:
        return f"addr:{request.remote_addr or 'unknown'}"
    if principal.project_id is None:
        return f"token:{principal.fingerprint}"
    return f"project:{principal.project_id}"


def _exempt() -> bool:
    path = request.path
    return not path.startswith(LIMITED_PREFIX) or path.startswith(UNLIMITED_PREFIXES)


def _keep_retry_after_for_throttling(response: Response) -> Response:
    """flask-limiter stamps Retry-After on every answer; only 429 and 503 should say it."""
    if response.status_code not in (429, 503):
        response.headers.pop("Retry-After", None)
    return response


def init_limiter(app: Flask, settings: Settings) -> Limiter | None:
    """Limit ``/v1/*`` (except callbacks) to ``MOTIONHOOK_RATELIMIT`` per project."""
    if settings.ratelimit.strip().lower() in DISABLED:
        return None
    # Registered before the limiter, so it runs after the limiter's own after_request.
    app.after_request(_keep_retry_after_for_throttling)
    limit = ApplicationLimit(
        settings.ratelimit,
        key_function=rate_limit_key,
        error_message=(
            f"rate limit exceeded ({settings.ratelimit} per project); retry after the number "
            "of seconds in the Retry-After header"
        ),
    )
    limiter = Limiter(
        rate_limit_key,
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
