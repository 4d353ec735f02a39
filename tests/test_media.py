"""Tests for service.media (URL signing) and the /media blueprint over real storage."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, quote, unquote, urlsplit

import boto3
import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from moto.server import ThreadedMotoServer
from werkzeug.test import TestResponse

from service.api.media import media_bp
from service.media import expiry_for, media_url, sign_media, verify_media
from service.storage import LocalStorage, S3Storage

SECRET = "callback-secret"
PREVIOUS_SECRET = "old-callback-secret"
PUBLIC_URL = "https://hooks.example.com"
KEY = "outputs/job_abc/0.mp4"
BODY = bytes(range(256)) * 16  # 4096 bytes, every offset distinguishable
NOW = 1_800_000_000.0


def _app(storage: object) -> Flask:
    app = Flask(__name__)
    app.register_blueprint(media_bp)
    settings = SimpleNamespace(
        callback_secret=SECRET,
        callback_secret_previous=PREVIOUS_SECRET,
        public_url=PUBLIC_URL,
        media_url_ttl=3600,
    )
    app.extensions["motionhook"] = SimpleNamespace(settings=settings, storage=storage)
    return app


def _path(key: str = KEY, *, secret: str = SECRET, ttl: float = 3600) -> str:
    """Return the path and query of a freshly signed media URL."""
    url = urlsplit(media_url(public_url=PUBLIC_URL, secret=secret, key=key, ttl=ttl))
    return f"{url.path}?{url.query}"


def _raw_path(key: str, exp: int, sig: str) -> str:
    return f"/media/{key}?exp={exp}&sig={sig}"


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    local = LocalStorage(tmp_path / "media")
    local.put(KEY, io.BytesIO(BODY), content_type="video/mp4")
    (tmp_path / "secret.txt").write_text("do not serve me")
    return local


@pytest.fixture
def client(storage: LocalStorage) -> FlaskClient:
    return _app(storage).test_client()


# -- signing ----------------------------------------------------------------


def test_sign_and_verify_round_trip() -> None:
    sig = sign_media(SECRET, KEY, 2_000_000_000)

    assert verify_media(SECRET, KEY, 2_000_000_000, sig, NOW)
    assert "=" not in sig and "+" not in sig and "/" not in sig


@pytest.mark.parametrize(
    ("secret", "key", "exp"),
    [
        ("other-secret", KEY, 2_000_000_000),
        (SECRET, "outputs/job_abc/1.mp4", 2_000_000_000),
        (SECRET, KEY, 2_000_000_001),
    ],
)
def test_verify_rejects_any_change(secret: str, key: str, exp: int) -> None:
    sig = sign_media(SECRET, KEY, 2_000_000_000)

    assert not verify_media(secret, key, exp, sig, NOW)


def test_verify_rejects_expired_signatures() -> None:
    sig = sign_media(SECRET, KEY, int(NOW))

    assert not verify_media(SECRET, KEY, int(NOW), sig, NOW)
    assert verify_media(SECRET, KEY, int(NOW), sig, NOW - 1)


def test_media_signature_is_not_a_plain_hmac_of_the_secret() -> None:
    plain = hmac.new(SECRET.encode(), f"{KEY}\n2000000000".encode(), hashlib.sha256).digest()

    assert sign_media(SECRET, KEY, 2_000_000_000) != (
        base64.urlsafe_b64encode(plain).rstrip(b"=").decode()
    )


def test_media_url_is_signed_for_at_least_the_ttl() -> None:
    url = media_url(public_url=PUBLIC_URL + "/", secret=SECRET, key=KEY, ttl=7 * 86400, now=NOW)

    parts = urlsplit(url)
    query = parse_qs(parts.query)
    exp = int(query["exp"][0])
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{PUBLIC_URL}/media/{KEY}"
    assert NOW + 7 * 86400 <= exp <= NOW + 7 * 86400 + 3600
    assert verify_media(SECRET, KEY, exp, query["sig"][0], NOW)


def test_media_url_is_stable_within_an_expiry_step() -> None:
    first = media_url(public_url=PUBLIC_URL, secret=SECRET, key=KEY, ttl=86400, now=NOW + 10)
    again = media_url(public_url=PUBLIC_URL, secret=SECRET, key=KEY, ttl=86400, now=NOW + 3000)

    assert first == again


@pytest.mark.parametrize("ttl", [60, 3600, 86400, 7 * 86400])
def test_expiry_is_rounded_up_by_at_most_a_tenth_of_the_ttl(ttl: int) -> None:
    for now in (NOW, NOW + 1, NOW + 1234.5):
        exp = expiry_for(ttl, now)
        assert now + ttl <= exp <= now + ttl + min(3600, ttl / 10)


def test_media_url_prefers_the_storage_direct_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3 = S3Storage("bucket", "p", public_base_url="https://cdn.example.com")

    url = media_url(public_url=PUBLIC_URL, secret=SECRET, key=KEY, ttl=60, storage=s3)

    assert url == f"https://cdn.example.com/p/{KEY}"


def test_media_url_of_local_storage_is_our_signed_url(storage: LocalStorage) -> None:
    url = media_url(public_url=PUBLIC_URL, secret=SECRET, key=KEY, ttl=60, storage=storage)

    assert url.startswith(f"{PUBLIC_URL}/media/{KEY}?exp=")


# -- GET /media -------------------------------------------------------------


def test_get_serves_the_object_with_validators(client: FlaskClient) -> None:
    response = client.get(_path())

    assert response.status_code == 200
    assert response.data == BODY
    assert response.headers["Content-Type"] == "video/mp4"
    assert response.headers["Content-Length"] == str(len(BODY))
    assert response.headers["ETag"] == f'"{hashlib.sha256(BODY).hexdigest()}"'
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    cache_control = response.headers["Cache-Control"]
    assert cache_control.startswith("private, max-age=")
    assert 3600 <= int(cache_control.rsplit("=", 1)[1]) <= 3600 + 360


def test_head_gives_the_headers_without_a_body(client: FlaskClient) -> None:
    response = client.head(_path())

    assert response.status_code == 200
    assert response.data == b""
    assert response.headers["Content-Length"] == str(len(BODY))
    assert response.headers["ETag"] == f'"{hashlib.sha256(BODY).hexdigest()}"'


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=100-", 100, len(BODY) - 1),
        ("bytes=-500", len(BODY) - 500, len(BODY) - 1),
        ("bytes=4000-999999", 4000, len(BODY) - 1),
        ("bytes=-999999", 0, len(BODY) - 1),
    ],
)
def test_range_requests_return_exactly_the_asked_bytes(
    client: FlaskClient, header: str, start: int, end: int
) -> None:
    response = client.get(_path(), headers={"Range": header})

    assert response.status_code == 206
    assert response.data == BODY[start : end + 1]
    assert response.headers["Content-Range"] == f"bytes {start}-{end}/{len(BODY)}"
    assert response.headers["Content-Length"] == str(end - start + 1)
    assert response.headers["Content-Type"] == "video/mp4"


@pytest.mark.parametrize("header", ["bytes=4096-", "bytes=5000-6000"])
def test_unsatisfiable_range_is_416(client: FlaskClient, header: str) -> None:
    response = client.get(_path(), headers={"Range": header})

    assert response.status_code == 416
    assert response.headers["Content-Range"] == f"bytes */{len(BODY)}"
    assert response.json is not None
    assert response.json["code"] == 416


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "items=0-5", "bytes=9-3", "nonsense"])
def test_unsupported_or_malformed_ranges_serve_the_whole_object(
    client: FlaskClient, header: str
) -> None:
    response = client.get(_path(), headers={"Range": header})

    assert response.status_code == 200
    assert response.data == BODY


def test_if_range_with_another_etag_serves_the_whole_object(client: FlaskClient) -> None:
    response = client.get(_path(), headers={"Range": "bytes=0-9", "If-Range": '"stale"'})

    assert response.status_code == 200
    assert response.data == BODY


def test_if_range_with_another_etag_ignores_an_unsatisfiable_range(client: FlaskClient) -> None:
    response = client.get(_path(), headers={"Range": "bytes=9000-", "If-Range": '"stale"'})

    assert response.status_code == 200
    assert response.data == BODY


def test_if_range_with_the_current_etag_serves_the_range(client: FlaskClient) -> None:
    etag = f'"{hashlib.sha256(BODY).hexdigest()}"'

    response = client.get(_path(), headers={"Range": "bytes=0-9", "If-Range": etag})

    assert response.status_code == 206
    assert response.data == BODY[:10]


@pytest.mark.parametrize("form", ['"{}"', 'W/"{}"', '"other", "{}"', "*"])
def test_if_none_match_is_304(client: FlaskClient, form: str) -> None:
    etag = hashlib.sha256(BODY).hexdigest()

    response = client.get(_path(), headers={"If-None-Match": form.format(etag)})

    assert response.status_code == 304
    assert response.data == b""
    assert response.headers["ETag"] == f'"{etag}"'


def test_if_none_match_with_another_etag_is_200(client: FlaskClient) -> None:
    response = client.get(_path(), headers={"If-None-Match": '"other"'})

    assert response.status_code == 200


def test_url_signed_with_the_previous_secret_still_works(client: FlaskClient) -> None:
    assert client.get(_path(secret=PREVIOUS_SECRET)).status_code == 200


# -- refusals ---------------------------------------------------------------


def _assert_json_error(response: TestResponse, code: int) -> None:
    assert response.status_code == code
    body = response.json
    assert body is not None
    assert body["code"] == code
    assert set(body) == {"code", "status", "message"}


def test_missing_signature_is_403(client: FlaskClient) -> None:
    response = client.get(f"/media/{KEY}")

    _assert_json_error(response, 403)
    assert response.json is not None
    assert response.json["status"] == "Forbidden"


def test_tampered_signature_is_403(client: FlaskClient) -> None:
    exp = int(time.time()) + 600
    sig = sign_media(SECRET, KEY, exp)
    tampered = ("A" if sig[0] != "A" else "B") + sig[1:]

    _assert_json_error(client.get(_raw_path(KEY, exp, tampered)), 403)


def test_signature_for_another_key_is_403(client: FlaskClient, storage: LocalStorage) -> None:
    storage.put("outputs/job_abc/1.mp4", io.BytesIO(b"x"), content_type="video/mp4")
    exp = int(time.time()) + 600

    response = client.get(_raw_path("outputs/job_abc/1.mp4", exp, sign_media(SECRET, KEY, exp)))

    _assert_json_error(response, 403)


def test_extended_expiry_is_403(client: FlaskClient) -> None:
    exp = int(time.time()) + 600

    response = client.get(_raw_path(KEY, exp + 86400, sign_media(SECRET, KEY, exp)))

    _assert_json_error(response, 403)


def test_expired_url_is_403(client: FlaskClient) -> None:
    exp = int(time.time()) - 1

    response = client.get(_raw_path(KEY, exp, sign_media(SECRET, KEY, exp)))

    _assert_json_error(response, 403)
    assert response.json is not None
    assert "expired" in response.json["message"]


@pytest.mark.parametrize("exp", ["soon", "-5", "1e10", "١٢٣"])
def test_malformed_expiry_is_403(client: FlaskClient, exp: str) -> None:
    _assert_json_error(client.get(f"/media/{KEY}?exp={quote(exp)}&sig=abc"), 403)


def test_unknown_key_is_404(client: FlaskClient) -> None:
    _assert_json_error(client.get(_path("outputs/job_abc/9.mp4")), 404)


@pytest.mark.parametrize(
    "key",
    [
        "../secret.txt",
        "%2e%2e/secret.txt",
        "outputs/%2e%2e/%2e%2e/secret.txt",
        "..%2fsecret.txt",
        "%2fetc/passwd",
        "outputs/job_abc/0.mp4%00.png",
        ".0.mp4.meta.json",
        "outputs/job_abc/.0.mp4.meta.json",
    ],
)
def test_traversal_and_hidden_keys_are_404_even_when_signed(client: FlaskClient, key: str) -> None:
    exp = int(time.time()) + 600
    sig = sign_media(SECRET, unquote(key), exp)

    response = client.get(_raw_path(key, exp, sig))

    assert response.status_code in (403, 404)
    assert b"do not serve me" not in response.data
    assert b"content_type" not in response.data


def test_traversal_without_signature_is_refused(client: FlaskClient) -> None:
    response = client.get("/media/../secret.txt")

    assert response.status_code in (403, 404)
    assert b"do not serve me" not in response.data


# -- S3: redirect to a presigned URL ----------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_storage(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Storage]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    admin = boto3.client("s3", endpoint_url=s3_endpoint)
    admin.create_bucket(Bucket="media")
    yield S3Storage("media", "", endpoint_url=s3_endpoint)
    for item in admin.list_objects_v2(Bucket="media").get("Contents", []):
        admin.delete_object(Bucket="media", Key=item["Key"])
    admin.delete_bucket(Bucket="media")


def test_s3_media_redirects_to_a_presigned_url(s3_storage: S3Storage) -> None:
    s3_storage.put(KEY, io.BytesIO(BODY), content_type="video/mp4")
    client = _app(s3_storage).test_client()

    response = client.get(_path())

    assert response.status_code == 302
    assert response.headers["Cache-Control"] == "no-store"
    fetched = requests.get(response.headers["Location"], timeout=10)
    assert fetched.content == BODY


def test_s3_media_url_is_the_presigned_url(s3_storage: S3Storage) -> None:
    s3_storage.put(KEY, io.BytesIO(BODY), content_type="video/mp4")

    url = media_url(public_url=PUBLIC_URL, secret=SECRET, key=KEY, ttl=600, storage=s3_storage)

    assert "X-Amz-Signature=" in url
    assert requests.get(url, timeout=10).content == BODY
