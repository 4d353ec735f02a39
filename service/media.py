"""Signed, expiring media URLs and the ``/media`` blueprint that serves them.

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
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, urlencode

from flask import Blueprint, current_app, jsonify, redirect, request
from werkzeug.http import parse_range_header, unquote_etag
from werkzeug.wrappers import Response

from service.storage import InvalidKey, Storage, StoredObject, validate_key

MEDIA_KEY_LABEL = b"motionhook media v1"
# Expiry times are rounded up to a step of at most an hour (and at most a tenth of the
# TTL), so rendering the same job twice yields the same URL and caches keep working.
MAX_EXPIRY_STEP = 3600
# A /media redirect to a presigned URL is followed at once; keep that URL short-lived.
REDIRECT_TTL = 300
# Uploaded inputs come from clients: never let a browser treat them as a document.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; sandbox"

media_bp = Blueprint("media", __name__)


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


def _error(code: int, status: str, message: str, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(code=code, status=status, message=message)
    response.status_code = code
    response.headers.update(headers or {})
    response.headers["Cache-Control"] = "no-store"
    return response


def _secrets(settings: Any) -> list[str]:
    previous = getattr(settings, "callback_secret_previous", None)
    return [settings.callback_secret] + ([previous] if previous else [])


def _signature_problem(settings: Any, key: str, now: float) -> str | None:
    """Return why the request's ``exp``/``sig`` do not authorise ``key``, or None."""
    exp_text = request.args.get("exp", "")
    sig = request.args.get("sig", "")
    if not exp_text or not sig:
        return "media URL is missing its exp or sig parameter"
    if not exp_text.isascii() or not exp_text.isdigit():
        return "media URL has a malformed exp parameter"
    exp = int(exp_text)
    if exp <= now:
        return "media URL has expired"
    if not any(verify_media(secret, key, exp, sig, now) for secret in _secrets(settings)):
        return "media URL signature is invalid"
    return None


class RangeNotSatisfiable(Exception):
    """The request's single byte range lies wholly outside the object."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Resolve a Range header to ``(start, end_inclusive)`` within an object of ``size`` bytes.

    Returns None to serve the whole object: no header, a malformed one, several
    ranges or another unit, all of which RFC 9110 lets a server ignore. Raises
    RangeNotSatisfiable when the one byte range cannot be met. Unlike werkzeug's
    ``Range.range_for_length``, a suffix longer than the object means all of it.
    """
    parsed = parse_range_header(header)
    if parsed is None or parsed.units != "bytes" or len(parsed.ranges) != 1:
        return None
    start, stop = parsed.ranges[0]
    if stop is None:
        if start < 0:
            start = max(size + start, 0)
        stop = size
    stop = min(stop, size)
    if start >= stop:
        raise RangeNotSatisfiable
    return start, stop - 1


def _if_range_allows(stored: StoredObject) -> bool:
    """Return True unless an If-Range names another version of the object."""
    if "If-Range" not in request.headers:
        return True
    if_range = request.if_range
    if if_range.etag is None:
        # We keep no Last-Modified, so a date validator can never be trusted.
        return False
    etag, weak = unquote_etag(stored.etag)
    return not weak and if_range.etag == etag


# merge_slashes=False: "/media//etc/passwd" must reach validate_key, not redirect.
@media_bp.get("/media/<path:key>", merge_slashes=False)
def serve_media(key: str) -> Response:
    """Serve a stored object by signed URL, with conditional and range requests."""
    state = current_app.extensions["motionhook"]
    settings, storage = state.settings, state.storage
    now = time.time()
    problem = _signature_problem(settings, key, now)
    if problem:
        return _error(403, "Forbidden", problem)
    try:
        validate_key(key)
        direct = storage.direct_url(key, REDIRECT_TTL)
        stored = None if direct else storage.stat(key)
    except InvalidKey:
        return _error(404, "Not Found", "no such media")
    if direct:
        response = redirect(direct, 302)
        response.headers["Cache-Control"] = "no-store"
        return response
    if stored is None:
        return _error(404, "Not Found", "no such media")

    max_age = max(0, int(request.args["exp"]) - int(now))
    headers = {
        "ETag": stored.etag,
        "Accept-Ranges": "bytes",
        "Cache-Control": f"private, max-age={max_age}",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    }
    etag, _ = unquote_etag(stored.etag)
    if request.if_none_match.contains_weak(etag):
        return Response(status=304, headers=headers)

    span = None
    # An If-Range naming an older version means "send it all", not a range of it.
    if _if_range_allows(stored):
        try:
            span = byte_range(request.headers.get("Range"), stored.size)
        except RangeNotSatisfiable:
            return _error(
                416,
                "Range Not Satisfiable",
                f"requested range is outside the object ({stored.size} bytes)",
                {"Content-Range": f"bytes */{stored.size}", "Accept-Ranges": "bytes"},
            )
    status = 200
    start, end = 0, stored.size - 1
    if span is not None:
        status = 206
        start, end = span
        headers["Content-Range"] = f"bytes {start}-{end}/{stored.size}"
    # Stream in chunks: the file (or S3 body) is opened only when the server iterates.
    body: Iterable[bytes] = storage.read_range(key, start, end) if end >= start else ()
    response = Response(body, status=status, headers=headers, content_type=stored.content_type)
    response.content_length = end - start + 1
    return response
