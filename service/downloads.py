"""Durable copies: download upstream outputs into storage and store client image uploads.

ModelsLab's output links are not durable (``temp`` files are wiped daily and
``future_links`` 404 for a while), so the worker copies each output into our
storage. What lands there is checked by its bytes, never by the server's word:
an HTML error page served with status 200 is an error, not a video.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import requests

from service.storage import Storage, StoredObject, validate_key

CHUNK_SIZE = 64 * 1024
# Enough bytes to tell every container we accept (and the usual impostors) apart.
SNIFF_BYTES = 64
# Each socket operation of a download times out after this, within the overall deadline.
MAX_SOCKET_TIMEOUT = 30.0
RETRYABLE_STATUSES = frozenset({408, 425, 429})
OUTPUT_EXTENSIONS = {
    "video/mp4": "mp4",
    "video/quicktime": "mov",
    "video/webm": "webm",
    "video/x-matroska": "mkv",
    "image/gif": "gif",
}
IMAGE_FORMATS = {
    "PNG": ("png", "image/png"),
    "JPEG": ("jpg", "image/jpeg"),
    "WEBP": ("webp", "image/webp"),
    "GIF": ("gif", "image/gif"),
}
# Far above anything an image-to-video model takes, far below a decompression bomb.
MAX_IMAGE_PIXELS = 40_000_000
NOT_AN_IMAGE = "image: not a PNG, JPEG, WebP or GIF image"


class DownloadError(Exception):
    """A download that failed; ``reason`` is safe to show users, ``retryable`` says try later."""

    def __init__(self, reason: str, *, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class DownloadedOutput:
    """One upstream output, copied into storage."""

    key: str
    source_url: str
    content_type: str
    size: int
    sha256: str


def upload_key_for(job_id: str, index: int, content_type: str) -> str:
    """Return the storage key of output ``index`` of a job, e.g. ``outputs/<job>/0.mp4``."""
    extension = OUTPUT_EXTENSIONS.get(content_type, "bin")
    return validate_key(f"outputs/{job_id}/{index}.{extension}")


def sniff_video(head: bytes) -> str | None:
    """Return the content type of a video or GIF from its first bytes, or None."""
    if head[4:8] == b"ftyp":
        return "video/quicktime" if head[8:12] == b"qt  " else "video/mp4"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "video/x-matroska" if b"matroska" in head[:SNIFF_BYTES] else "video/webm"
    return None


def describe_bytes(head: bytes, declared: str | None) -> str:
    """Name what a non-video body looks like, for an error message."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "text/html"
    if text.startswith(b"<"):
        return "text/html" if b"<html" in text else "application/xml"
    if text.startswith((b"{", b"[")):
        return "application/json"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if not head:
        return "an empty body"
    if declared:
        return f"unknown data served as {declared.split(';')[0].strip()[:60]}"
    return "unknown data"


def _status_error(status: int) -> DownloadError:
    if status == 404:
        return DownloadError("output not ready (404)", retryable=True)
    if 300 <= status < 400:
        return DownloadError(
            f"output URL redirects (HTTP {status}); redirects are not followed", retryable=False
        )
    retryable = status >= 500 or status in RETRYABLE_STATUSES
    return DownloadError(f"output server answered HTTP {status}", retryable=retryable)


def download_output(
    session: requests.Session,
    url: str,
    storage: Storage,
    key: str | Callable[[str], str],
    *,
    max_bytes: int,
    timeout: float,
) -> DownloadedOutput:
    """Copy the video at ``url`` into ``storage`` under ``key``, checking it really is one.

    ``key`` may be a function of the sniffed content type (for instance
    ``functools.partial(upload_key_for, job_id, index)``) so the extension matches
    the bytes. ``timeout`` bounds the whole download; each socket operation also
    times out after at most 30 s. Storage errors propagate unchanged.
    """
    deadline = time.monotonic() + timeout
    socket_timeout = min(timeout, MAX_SOCKET_TIMEOUT)
    try:
        response = session.get(
            url,
            stream=True,
            allow_redirects=False,
            timeout=(socket_timeout, socket_timeout),
            headers={"Accept": "video/*, image/gif", "Accept-Encoding": "identity"},
        )
    except requests.Timeout as exc:
        raise DownloadError("timed out connecting to the output server", retryable=True) from exc
    except requests.ConnectionError as exc:
        raise DownloadError("could not connect to the output server", retryable=True) from exc
    except requests.RequestException as exc:
        raise DownloadError(f"cannot fetch output URL: {exc}", retryable=False) from exc

    with response, tempfile.TemporaryFile() as spool:
        if not 200 <= response.status_code < 300:
            raise _status_error(response.status_code)
        declared_length = response.headers.get("Content-Length", "")
        expected = int(declared_length) if declared_length.isdigit() else None
        if expected is not None and expected > max_bytes:
            raise DownloadError(f"output is larger than {max_bytes} bytes", retryable=False)

        watchdog = _Watchdog(response, deadline - time.monotonic())
        try:
            size, sha256, content_type = _copy_body(response, spool, max_bytes)
        except requests.RequestException as exc:
            if watchdog.fired.is_set():
                raise watchdog.error(timeout) from exc
            problem = "stalled" if "timed out" in str(exc) else "connection lost"
            raise DownloadError(f"{problem} while downloading the output", retryable=True) from exc
        finally:
            watchdog.cancel()
        if watchdog.fired.is_set():
            # A body without Content-Length just looks complete when we cut it off.
            raise watchdog.error(timeout)
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if expected is not None and encoding == "identity" and size != expected:
            raise DownloadError(f"output ended after {size} of {expected} bytes", retryable=True)

        final_key = key(content_type) if callable(key) else key
        spool.seek(0)
        storage.put(final_key, spool, content_type=content_type)
    return DownloadedOutput(
        key=final_key, source_url=url, content_type=content_type, size=size, sha256=sha256
    )


class _Watchdog:
    """Cut a download off at its deadline, even when bytes keep trickling in.

    Socket timeouts only bound each read; a server sending a byte every few
    seconds would otherwise hold the worker (and its lease) for ever. Shutting
    the socket down wakes the blocked read at once.
    """

    def __init__(self, response: requests.Response, seconds: float) -> None:
        self.response = response
        self.fired = threading.Event()
        self._lock = threading.Lock()
        self._done = False
        self._timer = threading.Timer(max(seconds, 0.0), self._abort)
        self._timer.daemon = True
        self._timer.start()

    def _abort(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired.set()
            with contextlib.suppress(OSError, ValueError):
                # A duplicate of the descriptor: shutdown() acts on the shared connection.
                sock = socket.socket(fileno=os.dup(self.response.raw.fileno()))
                with sock:
                    sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        """Stop the timer; once this returns the socket is never touched again."""
        with self._lock:
            self._done = True
        self._timer.cancel()

    @staticmethod
    def error(timeout: float) -> DownloadError:
        return DownloadError(f"output download took longer than {timeout:g} s", retryable=True)


def _copy_body(
    response: requests.Response, spool: BinaryIO, max_bytes: int
) -> tuple[int, str, str]:
    """Stream the body into ``spool``; return its size, sha256 and sniffed content type."""
    digest = hashlib.sha256()
    size = 0
    head = b""
    content_type: str | None = None
    for chunk in response.iter_content(CHUNK_SIZE):
        size += len(chunk)
        if size > max_bytes:
            raise DownloadError(f"output is larger than {max_bytes} bytes", retryable=False)
        if content_type is None:
            head += chunk[: SNIFF_BYTES - len(head)]
            if len(head) >= SNIFF_BYTES:
                # Decide early: an HTML error page is refused without reading all of it.
                content_type = _sniff_or_fail(head, response)
        digest.update(chunk)
        spool.write(chunk)
    if content_type is None:
        content_type = _sniff_or_fail(head, response)
    return size, digest.hexdigest(), content_type


def _sniff_or_fail(head: bytes, response: requests.Response) -> str:
    content_type = sniff_video(head)
    if content_type is None:
        looks_like = describe_bytes(head, response.headers.get("Content-Type"))
        raise DownloadError(f"output is not a video (looks like {looks_like})", retryable=False)
    return content_type


def _read_limited(data: bytes | BinaryIO, max_bytes: int) -> bytes:
    if isinstance(data, bytes | bytearray | memoryview):
        body = bytes(data)
    else:
        body = data.read(max_bytes + 1)
    if len(body) > max_bytes:
        raise ValueError(f"image: larger than {max_bytes} bytes")
    return body


def store_upload(
    storage: Storage, job_id: str, data: bytes | BinaryIO, max_bytes: int
) -> StoredObject:
    """Check that a client upload is a PNG, JPEG, WebP or GIF image and store it as an input.

    Raises ValueError naming the ``image`` field when it is too large or not such an image.
    """
    # Imported here: only web stores uploads, and Pillow would cost the worker ~2 MB.
    from PIL import Image, UnidentifiedImageError

    body = _read_limited(data, max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(body), formats=list(IMAGE_FORMATS)) as image:
                image_format = image.format or ""
                width, height = image.size
                image.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"image: more than {MAX_IMAGE_PIXELS} pixels") from exc
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
    ) as exc:
        raise ValueError(NOT_AN_IMAGE) from exc
    if image_format not in IMAGE_FORMATS:
        raise ValueError(NOT_AN_IMAGE)
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"image: more than {MAX_IMAGE_PIXELS} pixels ({width}x{height})")
    extension, content_type = IMAGE_FORMATS[image_format]
    key = validate_key(f"inputs/{job_id}.{extension}")
    return storage.put(key, io.BytesIO(body), content_type=content_type)
