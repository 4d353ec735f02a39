"""ModelsLab callbacks: the URL token, the audit log, and applying the result.

ModelsLab does not sign callbacks, so the callback URL carries the proof:
``sig`` = HMAC-SHA256(secret, track_id). It is checked in constant time before
the body is even read; only then is the raw body stored and applied.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, cast

from marshmallow import ValidationError
from sqlalchemy import Table, insert
from sqlalchemy.orm import Session

from schemas.upstream import UPSTREAM_RESPONSE, UpstreamResult
from service.db import Database
from service.jobs import IGNORED, MediaUrl, apply_upstream_result
from service.models import CallbackRecord, Job, utcnow

MALFORMED, UNKNOWN_JOB, MISMATCH = "malformed", "unknown_job", "mismatch"
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
    """Parse a callback body, raising ``ValueError`` with a reason when it is malformed."""
    try:
        data: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("body is not valid JSON") from exc
    try:
        result: UpstreamResult = UPSTREAM_RESPONSE.load(data)
    except ValidationError as exc:
        raise ValueError(f"body is not a ModelsLab result: {exc.messages}") from exc
    return result


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
            "body": raw.decode("utf-8", errors="replace"),
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
) -> CallbackOutcome:
    """Store an authenticated callback verbatim and apply it, all in one transaction."""
    try:
        result = parse_callback(raw)
    except ValueError as exc:
        with db.transaction() as session:
            _record(session, job_id, raw, "callback", MALFORMED, str(exc))
        return CallbackOutcome(400, MALFORMED, str(exc))
    with db.transaction() as session:
        if result.track_id and result.track_id != job_id:
            message = "track_id in the body does not match the callback URL"
            _record(session, job_id, raw, "callback", MISMATCH, message)
            return CallbackOutcome(400, MISMATCH, message)
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            _record(session, job_id, raw, "callback", UNKNOWN_JOB, None)
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
        _record(session, job_id, raw, "callback", outcome, result.status)
    message = "late callback recorded, job unchanged" if outcome == IGNORED else "ok"
    return CallbackOutcome(200, outcome, message)


def record_fetch(
    session: Session, job_id: str, raw: bytes, outcome: str, status: str, *, source: str
) -> None:
    """Keep submit and fetch answers in the same audit log as callbacks."""
    _record(session, job_id, raw, source, outcome, status)
