"""Tests for service.downloads against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import socket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import imageio_ffmpeg
import pytest
import requests
from PIL import Image

from service import downloads
from service.downloads import (
    DownloadedOutput,
    DownloadError,
    download_output,
    store_upload,
    upload_key_for,
)
from service.storage import InvalidKey, LocalStorage

MAX_BYTES = 1_000_000
HTML_PAGE = b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>"
# An EBML header whose DocType is "webm", then padding: enough for the sniffer.
WEBM = bytes.fromhex("1a45dfa3") + b"\x9f\x42\x86\x81\x01\x42\x82\x84webm" + b"\x00" * 200


@pytest.fixture(scope="session")
def mp4_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("video") / "out.mp4"
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y"]
    command += ["-f", "lavfi", "-i", "testsrc=size=64x64:rate=8", "-frames:v", "8"]
    command += ["-pix_fmt", "yuv420p", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return out.read_bytes()


def _image_bytes(fmt: str, size: tuple[int, int] = (16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 90)).save(buffer, format=fmt)
    return buffer.getvalue()


@dataclass
class Route:
    """What the test server answers for one path."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    # "full": send Content-Length and body; "close": no length, end by closing;
    # "reset": promise 100000 bytes, send the body, then reset the connection;
    # "stall": promise more, send the body, then wait until the test ends;
    # "drip": promise more, send the body, then a byte every 20 ms until cut off.
    mode: str = "full"


@dataclass
class OriginServer:
    """A real HTTP server on loopback serving the routes a test sets up."""

    base_url: str
    routes: dict[str, Route]
    hits: list[str]

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"


@pytest.fixture(scope="module")
def origin_server() -> Iterator[OriginServer]:
    routes: dict[str, Route] = {}
    hits: list[str] = []
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            route = routes.get(self.path, Route(status=404, body=b"not found"))
            self.send_response(route.status)
            for name, value in route.headers.items():
                self.send_header(name, value)
            if route.mode == "full":
                self.send_header("Content-Length", str(len(route.body)))
            elif route.mode in ("reset", "stall", "drip"):
                self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(route.body)
            self.wfile.flush()
            if route.mode == "reset":
                # SO_LINGER 0 makes close() send a RST instead of a FIN.
                linger = struct.pack("ii", 1, 0)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                self.connection.close()
            elif route.mode == "stall":
                release.wait(timeout=30)
            elif route.mode == "drip":
                try:
                    while not release.wait(timeout=0.02):
                        self.wfile.write(b"\x00")
                except OSError:
                    pass  # the client hung up, as the test wants
            self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:
            """Keep test output quiet."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield OriginServer(f"http://{host!s}:{port}", routes, hits)
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def origin(origin_server: OriginServer) -> OriginServer:
    """Give each test the shared server with no routes and no recorded hits."""
    origin_server.routes.clear()
    origin_server.hits.clear()
    return origin_server


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "media")


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as plain:
        yield plain


@pytest.fixture
def spool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point temporary files at a directory the test can inspect."""
    path = tmp_path / "spool"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


Fetch = Callable[..., DownloadedOutput]


@pytest.fixture
def fetch(origin: OriginServer, storage: LocalStorage, session: requests.Session) -> Fetch:
    def run(path: str, key: str = "outputs/job_1/0.mp4", **options: float) -> DownloadedOutput:
        max_bytes = int(options.get("max_bytes", MAX_BYTES))
        timeout = float(options.get("timeout", 10))
        return download_output(
            session, origin.url(path), storage, key, max_bytes=max_bytes, timeout=timeout
        )

    return run


def _stored_files(storage: LocalStorage) -> list[Path]:
    return [p for p in storage.root.rglob("*") if p.is_file()] if storage.root.exists() else []


def _fail(fetch: Fetch, path: str, **options: float) -> DownloadError:
    with pytest.raises(DownloadError) as caught:
        fetch(path, **options)
    return caught.value


# -- successful downloads ---------------------------------------------------


def test_mp4_is_stored_byte_for_byte(
    origin: OriginServer, fetch: Fetch, storage: LocalStorage, mp4_bytes: bytes
) -> None:
    origin.routes["/v.mp4"] = Route(body=mp4_bytes, headers={"Content-Type": "video/mp4"})

    result = fetch("/v.mp4")

    assert result == DownloadedOutput(
        key="outputs/job_1/0.mp4",
        source_url=origin.url("/v.mp4"),
        content_type="video/mp4",
        size=len(mp4_bytes),
        sha256=hashlib.sha256(mp4_bytes).hexdigest(),
    )
    with storage.open(result.key) as handle:
        assert handle.read() == mp4_bytes
    stored = storage.stat(result.key)
    assert stored is not None
    assert stored.content_type == "video/mp4"
    assert stored.etag == f'"{result.sha256}"'


def test_content_type_comes_from_the_bytes_not_the_header(
    origin: OriginServer, fetch: Fetch, storage: LocalStorage
) -> None:
    gif = _image_bytes("GIF")
    origin.routes["/out"] = Route(body=gif, headers={"Content-Type": "video/mp4"})

    result = fetch("/out", key="outputs/job_1/0.gif")

    assert result.content_type == "image/gif"
    assert result.sha256 == hashlib.sha256(gif).hexdigest()
    stored = storage.stat("outputs/job_1/0.gif")
    assert stored is not None
    assert stored.content_type == "image/gif"


def test_webm_is_recognised(origin: OriginServer, fetch: Fetch) -> None:
    origin.routes["/clip"] = Route(body=WEBM, headers={"Content-Type": "text/plain"})

    assert fetch("/clip").content_type == "video/webm"


def test_body_without_content_length_is_read_to_the_end(
    origin: OriginServer, fetch: Fetch, storage: LocalStorage, mp4_bytes: bytes
) -> None:
    origin.routes["/v"] = Route(body=mp4_bytes, mode="close")

    result = fetch("/v")

    with storage.open(result.key) as handle:
        assert handle.read() == mp4_bytes


def test_key_can_follow_the_sniffed_content_type(
    origin: OriginServer, session: requests.Session, storage: LocalStorage
) -> None:
    origin.routes["/out"] = Route(body=_image_bytes("GIF"))

    result = download_output(
        session,
        origin.url("/out"),
        storage,
        functools.partial(upload_key_for, "job_1", 0),
        max_bytes=MAX_BYTES,
        timeout=10,
    )

    assert result.key == "outputs/job_1/0.gif"
    assert storage.stat("outputs/job_1/0.gif") is not None


# -- refusals ---------------------------------------------------------------


def test_html_page_with_status_200_is_not_a_video(
    origin: OriginServer, fetch: Fetch, storage: LocalStorage
) -> None:
    origin.routes["/v.mp4"] = Route(body=HTML_PAGE, headers={"Content-Type": "video/mp4"})

    error = _fail(fetch, "/v.mp4")

    assert error.reason == "output is not a video (looks like text/html)"
    assert not error.retryable
    assert _stored_files(storage) == []


def test_json_body_is_not_a_video(origin: OriginServer, fetch: Fetch) -> None:
    origin.routes["/v"] = Route(body=b'{"status":"error","message":"nope"}')

    assert _fail(fetch, "/v").reason == "output is not a video (looks like application/json)"


def test_empty_body_is_not_a_video(origin: OriginServer, fetch: Fetch) -> None:
    origin.routes["/v"] = Route(body=b"")

    error = _fail(fetch, "/v")

    assert error.reason == "output is not a video (looks like an empty body)"
    assert not error.retryable


def test_404_means_not_ready_yet(origin: OriginServer, fetch: Fetch) -> None:
    error = _fail(fetch, "/future.mp4")

    assert error.reason == "output not ready (404)"
    assert error.retryable


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (502, True), (503, True), (429, True), (408, True), (403, False), (410, False)],
)
def test_error_statuses(origin: OriginServer, fetch: Fetch, status: int, retryable: bool) -> None:
    origin.routes["/v"] = Route(status=status, body=b"oops")

    error = _fail(fetch, "/v")

    assert error.retryable is retryable
    assert str(status) in error.reason


def test_redirects_are_not_followed(origin: OriginServer, fetch: Fetch, mp4_bytes: bytes) -> None:
    origin.routes["/v.mp4"] = Route(body=mp4_bytes)
    origin.routes["/moved"] = Route(status=302, headers={"Location": origin.url("/v.mp4")})

    error = _fail(fetch, "/moved")

    assert not error.retryable
    assert "redirect" in error.reason
    assert origin.hits == ["/moved"]


def test_declared_length_over_the_cap_is_refused_before_reading(
    origin: OriginServer, fetch: Fetch, storage: LocalStorage, mp4_bytes: bytes
) -> None:
    origin.routes["/v"] = Route(body=mp4_bytes)

    error = _fail(fetch, "/v", max_bytes=len(mp4_bytes) - 1)

    assert error.reason == f"output is larger than {len(mp4_bytes) - 1} bytes"
    assert not error.retryable
    assert _stored_files(storage) == []


def test_undeclared_body_over_the_cap_is_cut_off(
    origin: OriginServer, fetch: Fetch, storage: LocalStorage, spool_dir: Path, mp4_bytes: bytes
) -> None:
    origin.routes["/v"] = Route(body=mp4_bytes * 3, mode="close")

    error = _fail(fetch, "/v", max_bytes=len(mp4_bytes))

    assert error.reason == f"output is larger than {len(mp4_bytes)} bytes"
    assert not error.retryable
    assert _stored_files(storage) == []
    assert list(spool_dir.iterdir()) == []


def test_connection_reset_mid_body_is_retryable(
    origin: OriginServer, fetch: Fetch, storage: LocalStorage, spool_dir: Path, mp4_bytes: bytes
) -> None:
    origin.routes["/v"] = Route(body=mp4_bytes[:4000], mode="reset")

    error = _fail(fetch, "/v")

    assert error.retryable
    assert error.reason == "connection lost while downloading the output"
    assert _stored_files(storage) == []
    assert list(spool_dir.iterdir()) == []


def test_stalled_body_times_out_and_is_retryable(
    origin: OriginServer, fetch: Fetch, storage: LocalStorage, mp4_bytes: bytes
) -> None:
    origin.routes["/v"] = Route(body=mp4_bytes[:1000], mode="stall")

    error = _fail(fetch, "/v", timeout=0.3)

    assert error.retryable
    # Whichever fires first: the socket read timeout or the overall deadline.
    assert error.reason in {
        "stalled while downloading the output",
        "output download took longer than 0.3 s",
    }
    assert _stored_files(storage) == []


def test_trickling_body_is_cut_off_at_the_deadline(
    origin: OriginServer, fetch: Fetch, storage: LocalStorage, mp4_bytes: bytes
) -> None:
    origin.routes["/v"] = Route(body=mp4_bytes[:1000], mode="drip")

    error = _fail(fetch, "/v", timeout=0.4)

    assert error.retryable
    assert error.reason == "output download took longer than 0.4 s"
    assert _stored_files(storage) == []


def test_unreachable_server_is_retryable(session: requests.Session, storage: LocalStorage) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with pytest.raises(DownloadError) as caught:
        download_output(
            session, f"http://127.0.0.1:{port}/v.mp4", storage, "k.mp4", max_bytes=10, timeout=5
        )

    assert caught.value.retryable


def test_invalid_url_is_not_retryable(session: requests.Session, storage: LocalStorage) -> None:
    with pytest.raises(DownloadError) as caught:
        download_output(session, "not a url", storage, "k.mp4", max_bytes=10, timeout=5)

    assert not caught.value.retryable


# -- keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "key"),
    [
        ("video/mp4", "outputs/job_1/0.mp4"),
        ("image/gif", "outputs/job_1/0.gif"),
        ("video/webm", "outputs/job_1/0.webm"),
        ("video/quicktime", "outputs/job_1/0.mov"),
        ("application/x-what", "outputs/job_1/0.bin"),
    ],
)
def test_upload_key_for(content_type: str, key: str) -> None:
    assert upload_key_for("job_1", 0, content_type) == key


def test_upload_key_for_refuses_unsafe_job_ids() -> None:
    with pytest.raises(InvalidKey):
        upload_key_for("../job", 0, "video/mp4")


# -- client uploads ---------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "key", "content_type"),
    [
        ("PNG", "inputs/job_1.png", "image/png"),
        ("JPEG", "inputs/job_1.jpg", "image/jpeg"),
        ("WEBP", "inputs/job_1.webp", "image/webp"),
        ("GIF", "inputs/job_1.gif", "image/gif"),
    ],
)
def test_store_upload_accepts_images(
    storage: LocalStorage, fmt: str, key: str, content_type: str
) -> None:
    data = _image_bytes(fmt)

    stored = store_upload(storage, "job_1", data, max_bytes=MAX_BYTES)

    assert (stored.key, stored.content_type, stored.size) == (key, content_type, len(data))
    with storage.open(key) as handle:
        assert handle.read() == data


def test_store_upload_reads_a_stream(storage: LocalStorage) -> None:
    data = _image_bytes("PNG")

    stored = store_upload(storage, "job_1", io.BytesIO(data), max_bytes=MAX_BYTES)

    assert stored.size == len(data)


@pytest.mark.parametrize(
    "data",
    [
        HTML_PAGE,
        b"",
        _image_bytes("BMP"),
        _image_bytes("TIFF"),
        _image_bytes("PNG")[:40],
        b"GIF89a" + b"\x00" * 10,
    ],
    ids=["html", "empty", "bmp", "tiff", "truncated-png", "gif-header-only"],
)
def test_store_upload_rejects_what_is_not_an_accepted_image(
    storage: LocalStorage, data: bytes
) -> None:
    with pytest.raises(ValueError, match=r"^image: not a PNG, JPEG, WebP or GIF image$"):
        store_upload(storage, "job_1", data, max_bytes=MAX_BYTES)
    assert _stored_files(storage) == []


def test_store_upload_rejects_large_files(storage: LocalStorage) -> None:
    data = _image_bytes("PNG")

    with pytest.raises(ValueError, match=rf"^image: larger than {len(data) - 1} bytes$"):
        store_upload(storage, "job_1", io.BytesIO(data), max_bytes=len(data) - 1)
    with pytest.raises(ValueError, match="image: larger than"):
        store_upload(storage, "job_1", data, max_bytes=len(data) - 1)
    assert _stored_files(storage) == []


def test_store_upload_rejects_too_many_pixels(
    storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(downloads, "MAX_IMAGE_PIXELS", 100)

    with pytest.raises(ValueError, match=r"^image: more than 100 pixels"):
        store_upload(storage, "job_1", _image_bytes("PNG", (11, 10)), max_bytes=MAX_BYTES)
