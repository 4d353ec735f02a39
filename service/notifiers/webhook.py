"""Standard Webhooks channel: the envelope as compact JSON, signed with every active secret.

Receivers verify with any Standard Webhooks or Svix library: ``webhook-id`` is the
event id (the same on every retry, so they can dedupe), ``webhook-timestamp`` the
send time in Unix seconds and ``webhook-signature`` one ``v1,<base64>`` entry per
secret, space-separated while a secret rotates.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from math import floor
from secrets import token_bytes
from typing import Any

from standardwebhooks import Webhook

from service.notifiers import Message

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def generate_secret() -> str:
    """Return a fresh signing secret: ``whsec_`` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(token_bytes(SECRET_BYTES)).decode()


@functools.lru_cache(maxsize=1024)
def _signer(secret: str) -> Webhook:
    """The signer of ``secret`` (decoding the secret once, not per message)."""
    return Webhook(secret)


def _as_utc(timestamp: datetime | None) -> datetime:
    """Return ``timestamp`` (naive means UTC) or now, as an aware UTC datetime."""
    if timestamp is None:
        return datetime.now(UTC)
    if timestamp.tzinfo is None:
        return timestamp.replace(tzinfo=UTC)
    return timestamp.astimezone(UTC)


def serialize(envelope: Mapping[str, Any]) -> str:
    """Return the envelope as compact JSON text that is always encodable as UTF-8."""
    text = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode()
    except UnicodeEncodeError:
        # Lone surrogates (possible in upstream text) only survive as \u escapes.
        text = json.dumps(envelope, separators=(",", ":"))
    return text


def render(
    envelope: Mapping[str, Any],
    secrets: Sequence[str],
    timestamp: datetime | None = None,
    serialized: str | None = None,
) -> Message:
    """Return the signed Standard Webhooks message for ``envelope``.

    ``serialized`` is ``serialize(envelope)`` when the caller already has it (every
    subscription of an event gets the same body).
    """
    event_id = envelope.get("id")
    if not isinstance(event_id, str) or not event_id:
        raise ValueError("envelope needs a string id to sign")
    unique_secrets = list(dict.fromkeys(secret for secret in secrets if secret))
    if not unique_secrets:
        raise ValueError("at least one signing secret is required")
    sent_at = _as_utc(timestamp)
    payload = serialize(envelope) if serialized is None else serialized
    signature = " ".join(
        _signer(secret).sign(event_id, sent_at, payload) for secret in unique_secrets
    )
    return Message(
        body=payload.encode(),
        headers={
            "content-type": "application/json",
            "webhook-id": event_id,
            "webhook-timestamp": str(floor(sent_at.timestamp())),
            "webhook-signature": signature,
        },
    )
