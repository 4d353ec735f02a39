"""``GET /media/<key>``: serves stored objects behind signed, expiring URLs.

The URLs are made and checked by :mod:`service.media`; this blueprint adds
ranges, ETags and conditional requests, or redirects to the storage's own URL.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flask import Blueprint, current_app, jsonify, redirect, request
from werkzeug.http import parse_range_header, unquote_etag
from werkzeug.wrappers import Response

from service.media import verify_media
from service.storage import InvalidKey, StoredObject, validate_key

# A /media redirect to a presigned URL is followed at once; keep that URL short-lived.
REDIRECT_TTL = 300
# Uploaded inputs come from clients: never let a browser treat them as a document.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; sandbox"

media_bp = Blueprint("media", __name__)


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
