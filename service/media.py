"""Signed, expiring media URLs (``service.api.media`` serves them).

A media URL is ``{public_url}/media/{key}?exp={unix time}&sig={signature}``. The
signature is an HMAC-SHA256 over ``key`` and ``exp`` under a key derived from the
callback secret with a "media" label, so a media signature can never double as a
callback token. When the storage can hand out its own URLs (S3 presigned GETs or
a public bucket URL) those are used instead and ``/media`` merely redirects.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time
from urllib.parse import quote, urlencode

from service.storage import Storage, validate_key

MEDIA_KEY_LABEL = b"motionhook media v1"
# Expiry times are rounded up to a step of at most an hour (and at most a tenth of the
# TTL), so rendering the same job twice yields the same URL and caches keep working.
MAX_EXPIRY_STEP = 3600


def _media_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), MEDIA_KEY_LABEL, hashlib.sha256).digest()


def sign_media(secret: str, key: str, exp: int) -> str:
    """Return the URL-safe signature of ``key`` valid until ``exp`` (unix seconds)."""
    message = f"{key}\n{exp}".encode()
    digest = hmac.new(_media_key(secret), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verify_media(secret: str, key: str, exp: int, sig: str, now: float) -> bool:
    """Return True when ``sig`` signs ``key`` and ``exp`` under ``secret`` and has not expired."""
    if exp <= now:
        return False
    expected = sign_media(secret, key, exp)
    return hmac.compare_digest(expected.encode("ascii"), sig.encode("ascii", "replace"))


def expiry_for(ttl: float, now: float) -> int:
    """Return the unix time a URL made at ``now`` for ``ttl`` seconds expires, rounded up."""
    step = max(1, min(MAX_EXPIRY_STEP, int(ttl // 10)))
    return math.ceil((now + ttl) / step) * step


def media_url(
    *,
    public_url: str,
    secret: str,
    key: str,
    ttl: float,
    now: float | None = None,
    storage: Storage | None = None,
) -> str:
    """Return a URL that serves ``key`` for at least ``ttl`` seconds."""
    validate_key(key)
    if storage is not None:
        direct = storage.direct_url(key, ttl)
        if direct:
            return direct
    exp = expiry_for(ttl, time.time() if now is None else now)
    query = urlencode({"exp": exp, "sig": sign_media(secret, key, exp)})
    return f"{public_url.rstrip('/')}/media/{quote(key, safe='/')}?{query}"
