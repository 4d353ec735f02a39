"""ModelsLab callbacks: the URL token, the audit log, and applying the result.

ModelsLab does not sign callbacks, so the callback URL carries the proof:
``sig`` = HMAC-SHA256(secret, track_id). It is checked in constant time before
the body is even read; only then is the raw body stored and applied.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, cast

from marshmallow import ValidationError
from sqlalchemy import Table, func, insert, select
from sqlalchemy.orm import Session

from schemas import strict_json
from schemas.upstream import UPSTREAM_RESPONSE, UpstreamResult
from service.db import Database
from service.jobs import IGNORED, MediaUrl, apply_upstream_result
from service.models import CallbackRecord, Job, utcnow
from service.projects import job_api_key
from service.upstream import redact_api_key

MALFORMED, UNKNOWN_JOB, MISMATCH = "malformed", "unknown_job", "mismatch"
# More callbacks than MOTIONHOOK_MAX_CALLBACKS_PER_JOB for one job: answered 200, not kept.
OVER_CAP = "over_cap"
CALLBACK = "callback"
CALLBACKS = cast(Table, CallbackRecord.__table__)
INSERT_CALLBACK = insert(CALLBACKS)


def callback_token(secret: str, track_id: str) -> str:
    """Return the URL-safe token that proves a callback URL was made by us."""
    digest = hmac.new(secret.encode(), track_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def verify_callback_token(
    secrets: tuple[str | None, ...], track_id: str, token: str | None
) -> bool:
    """Check ``token`` against every active secret, in constant time."""
    if not token:
        return False
    # Compare bytes: compare_digest refuses str with non-ASCII characters (a 500, not a 401).
    given = token.encode("utf-8", "replace")
    valid = False
    for secret in secrets:
        if secret:
            valid |= hmac.compare_digest(callback_token(secret, track_id).encode(), given)
    return valid


def callback_url(public_url: str, secret: str, track_id: str) -> str:
    return f"{public_url}/v1/callbacks/modelslab/{track_id}?sig={callback_token(secret, track_id)}"


@dataclass(frozen=True)
class CallbackOutcome:
    http_status: int
    outcome: str
    message: str


def parse_callback(raw: bytes) -> UpstreamResult:
    """Parse a callback body, raising ``ValueError`` with a reason when it is malformed.

    Parsing is strict (:mod:`schemas.strict_json`): ``"id": 1e309``, ``NaN``, a NUL
    or a deeply nested body is malformed, not a crash.
    """
    try:
        data: Any = strict_json.loads(raw)
    except strict_json.JSONRejected as exc:
        raise ValueError(f"body refused: {exc.message}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("body is not valid JSON") from exc
    try:
        result: UpstreamResult = UPSTREAM_RESPONSE.load(data)
    except ValidationError as exc:
        raise ValueError(f"body is not a ModelsLab result: {exc.messages}") from exc
    return result


def storable_text(raw: bytes) -> str:
    """The body as text any database keeps: bad UTF-8 as ``\\xNN``, NUL as ``\\x00``.

    PostgreSQL ``text`` refuses NUL; the escapes keep every byte visible for forensics.
    """
    return raw.decode("utf-8", errors="backslashreplace").replace("\x00", "\\x00")


def _callbacks_stored(session: Session, job_id: str) -> int:
    query = select(func.count()).where(CALLBACKS.c.job_id == job_id, CALLBACKS.c.source == CALLBACK)
    return int(session.connection().execute(query).scalar_one())


def _record(
    session: Session, job_id: str, raw: bytes, source: str, outcome: str, detail: str | None
) -> None:
    # A plain INSERT, not an ORM object: nothing reads the row back in this transaction.
    session.connection().execute(
        INSERT_CALLBACK,
        {
            "job_id": job_id,
            "received_at": utcnow(),
            "source": source,
            "body": storable_text(raw),
            "outcome": outcome,
            "detail": detail,
        },
    )


def receive_callback(
    db: Database,
    job_id: str,
    raw: bytes,
    *,
    callback_grace: float,
    job_timeout: float,
    media_url: MediaUrl,
    api_key: str,
    max_per_job: int,
) -> CallbackOutcome:
    """Store an authenticated callback and apply it, all in one transaction.

    The body is kept verbatim except for the ModelsLab keys (the instance's and the
    job's project's own), which are cut out before anything stores or parses it (an
    error message may echo them). Beyond
    ``max_per_job`` stored callbacks of one job, further ones are answered 200 and
    neither stored nor applied: ModelsLab must not retry them, and reconciliation
    (the fetch fallback) still completes a job that is somehow still waiting.
    """
    with db.transaction() as session:
        if _callbacks_stored(session, job_id) >= max_per_job:
            return CallbackOutcome(200, OVER_CAP, f"more than {max_per_job} callbacks; ignored")
        raw = redact_api_key(raw, api_key, job_api_key(session, job_id))
        try:
            result: UpstreamResult | None = parse_callback(raw)
            problem = ""
        except ValueError as exc:
            result, problem = None, str(exc)
        if result is None:
            _record(session, job_id, raw, CALLBACK, MALFORMED, problem)
            return CallbackOutcome(400, MALFORMED, problem)
        if result.track_id and result.track_id != job_id:
            message = "track_id in the body does not match the callback URL"
            _record(session, job_id, raw, CALLBACK, MISMATCH, message)
            return CallbackOutcome(400, MISMATCH, message)
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            _record(session, job_id, raw, CALLBACK, UNKNOWN_JOB, None)
            return CallbackOutcome(200, UNKNOWN_JOB, "no such job; recorded")
        outcome = apply_upstream_result(
            session,
            db,
            job,
            result,
            callback_grace=callback_grace,
            job_timeout=job_timeout,
            media_url=media_url,
        )
        _record(session, job_id, raw, CALLBACK, outcome, result.status)
    message = "late callback recorded, job unchanged" if outcome == IGNORED else "ok"
    return CallbackOutcome(200, outcome, message)


def record_fetch(
    session: Session, job_id: str, raw: bytes, outcome: str, status: str, *, source: str
) -> None:
    """Keep submit and fetch answers in the same audit log as callbacks."""
    _record(session, job_id, raw, source, outcome, status)
