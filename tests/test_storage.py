"""Tests for service.storage: local directory and S3 (a real moto server) backends."""

from __future__ import annotations

import hashlib
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
import requests
from moto.server import ThreadedMotoServer

from service.storage import (
    InvalidKey,
    LocalStorage,
    S3Storage,
    StoredObject,
    open_storage,
    validate_key,
)

BODY = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable
BUCKET = "motionhook-test"


def _etag(data: bytes) -> str:
    return f'"{hashlib.sha256(data).hexdigest()}"'


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "media")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Storage]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    admin = boto3.client("s3", endpoint_url=s3_endpoint)
    admin.create_bucket(Bucket=BUCKET)
    yield S3Storage(BUCKET, "media/v1", endpoint_url=s3_endpoint, public_base_url=None)
    for item in admin.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        admin.delete_object(Bucket=BUCKET, Key=item["Key"])
    admin.delete_bucket(Bucket=BUCKET)


# -- keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["outputs/job_abc-1/0.mp4", "inputs/job_X.png", "a", "a/b/c.d.e", "A-Z_09.gif"],
)
def test_validate_key_accepts_relative_posix_keys(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../secret",
        "outputs/../../secret",
        "outputs/./0.mp4",
        "outputs//0.mp4",
        "outputs/",
        "outputs\\0.mp4",
        "outputs/0.mp4\x00.png",
        "outputs/0 1.mp4",
        "outputs/vidéo.mp4",
        "outputs/%2e%2e/x",
        ".hidden",
        "outputs/.0.mp4.meta.json",
        "a" * 1025,
        "a/" + "b" * 256,
    ],
)
def test_validate_key_rejects_unsafe_keys(key: str) -> None:
    with pytest.raises(InvalidKey):
        validate_key(key)


# -- local ------------------------------------------------------------------


def test_local_round_trip(local: LocalStorage) -> None:
    stored = local.put("outputs/job_1/0.mp4", io.BytesIO(BODY), content_type="video/mp4")

    assert stored == StoredObject("outputs/job_1/0.mp4", len(BODY), "video/mp4", _etag(BODY))
    assert local.stat("outputs/job_1/0.mp4") == stored
    with local.open("outputs/job_1/0.mp4") as handle:
        assert handle.read() == BODY
    assert b"".join(local.read_range("outputs/job_1/0.mp4", 100, 199)) == BODY[100:200]
    assert local.direct_url("outputs/job_1/0.mp4", 60) is None

    local.delete("outputs/job_1/0.mp4")
    assert local.stat("outputs/job_1/0.mp4") is None
    local.delete("outputs/job_1/0.mp4")  # deleting twice is fine


def test_local_put_replaces_and_leaves_only_the_file_and_its_sidecar(local: LocalStorage) -> None:
    local.put("k.gif", io.BytesIO(b"old"), content_type="image/gif")
    stored = local.put("k.gif", io.BytesIO(b"new body"), content_type="image/gif")

    assert stored.size == 8
    assert sorted(p.name for p in local.root.iterdir()) == [".k.gif.meta.json", "k.gif"]
    assert local.stat("k.gif") == stored


def test_local_read_range_stops_at_end_of_file(local: LocalStorage) -> None:
    local.put("k", io.BytesIO(BODY), content_type="application/octet-stream")

    assert b"".join(local.read_range("k", len(BODY) - 10, len(BODY) + 500)) == BODY[-10:]


def test_local_stat_of_missing_or_directory_is_none(local: LocalStorage) -> None:
    local.put("outputs/job_1/0.mp4", io.BytesIO(b"x"), content_type="video/mp4")

    assert local.stat("outputs/job_2/0.mp4") is None
    assert local.stat("outputs/job_1") is None
    assert local.stat("outputs/job_1/0.mp4/deeper") is None
    with pytest.raises(FileNotFoundError):
        local.open("outputs/job_2/0.mp4")
    with pytest.raises(FileNotFoundError):
        b"".join(local.read_range("outputs/job_2/0.mp4", 0, 9))


def test_local_stat_derives_metadata_when_the_sidecar_is_stale(local: LocalStorage) -> None:
    local.put("v.mp4", io.BytesIO(b"first"), content_type="video/mp4")
    (local.root / "v.mp4").write_bytes(b"replaced behind our back")

    stored = local.stat("v.mp4")

    assert stored is not None
    assert stored.size == len(b"replaced behind our back")
    assert stored.content_type == "video/mp4"
    assert stored.etag != _etag(b"first")


def test_local_put_failure_leaves_no_partial_file(local: LocalStorage) -> None:
    class Exploding(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            if self.tell() > 0:
                raise OSError("disk on fire")
            return super().read(10)

    local.put("v.mp4", io.BytesIO(b"previous"), content_type="video/mp4")
    with pytest.raises(OSError, match="disk on fire"):
        local.put("v.mp4", Exploding(BODY), content_type="video/mp4")

    assert sorted(p.name for p in local.root.iterdir()) == [".v.mp4.meta.json", "v.mp4"]
    with local.open("v.mp4") as handle:
        assert handle.read() == b"previous"


@pytest.mark.parametrize("key", ["../outside.txt", "/etc/passwd", "a\x00b", ".v.mp4.meta.json"])
def test_local_methods_refuse_invalid_keys(local: LocalStorage, key: str) -> None:
    local.put("v.mp4", io.BytesIO(b"x"), content_type="video/mp4")
    (local.root.parent / "outside.txt").write_text("secret")

    for call in (
        lambda: local.stat(key),
        lambda: local.open(key),
        lambda: local.read_range(key, 0, 1),
        lambda: local.delete(key),
        lambda: local.put(key, io.BytesIO(b"x"), content_type="text/plain"),
    ):
        with pytest.raises(InvalidKey):
            call()
    assert (local.root.parent / "outside.txt").read_text() == "secret"


def test_local_refuses_a_symlink_leading_out_of_the_root(local: LocalStorage) -> None:
    outside = local.root.parent / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    local.root.mkdir(parents=True)
    (local.root / "link").symlink_to(outside)

    with pytest.raises(InvalidKey):
        local.stat("link/secret.txt")


# -- open_storage -----------------------------------------------------------


def test_open_storage_file_url_and_plain_path(tmp_path: Path) -> None:
    by_url = open_storage(f"file://{tmp_path}/media")
    by_path = open_storage(str(tmp_path / "media"))

    assert isinstance(by_url, LocalStorage)
    assert isinstance(by_path, LocalStorage)
    assert by_url.root == by_path.root == (tmp_path / "media").resolve()


def test_open_storage_reads_a_settings_object(tmp_path: Path) -> None:
    settings = SimpleNamespace(
        storage_url="s3://bucket/some/prefix/",
        s3_endpoint_url="http://127.0.0.1:9",
        media_public_base_url="https://cdn.example.com/",
    )

    storage = open_storage(settings)

    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix) == ("bucket", "some/prefix")
    assert storage.endpoint_url == "http://127.0.0.1:9"
    assert storage.direct_url("outputs/j/0.mp4", 60) == (
        "https://cdn.example.com/some/prefix/outputs/j/0.mp4"
    )


@pytest.mark.parametrize(
    "url", ["http://example.com/media", "s3://", "file://otherhost/media", "", "ftp://x/y"]
)
def test_open_storage_rejects_other_urls_naming_the_variable(url: str) -> None:
    with pytest.raises(ValueError, match="MOTIONHOOK_STORAGE_URL"):
        open_storage(url)


def test_s3_without_boto3_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)

    with pytest.raises(RuntimeError, match=r"motionhook\[aws\]"):
        open_storage("s3://bucket/prefix")


# -- S3 (moto server) -------------------------------------------------------


def test_s3_round_trip(s3: S3Storage) -> None:
    stored = s3.put("outputs/job_1/0.mp4", io.BytesIO(BODY), content_type="video/mp4")

    assert (stored.key, stored.size, stored.content_type) == (
        "outputs/job_1/0.mp4",
        len(BODY),
        "video/mp4",
    )
    assert stored.etag.startswith('"')
    assert s3.stat("outputs/job_1/0.mp4") == stored
    with s3.open("outputs/job_1/0.mp4") as body:
        assert body.read() == BODY

    s3.delete("outputs/job_1/0.mp4")
    assert s3.stat("outputs/job_1/0.mp4") is None
    s3.delete("outputs/job_1/0.mp4")


def test_s3_objects_live_under_the_prefix(s3: S3Storage) -> None:
    s3.put("inputs/job_1.png", io.BytesIO(b"png"), content_type="image/png")

    listing = s3.client.list_objects_v2(Bucket=BUCKET)
    assert [item["Key"] for item in listing["Contents"]] == ["media/v1/inputs/job_1.png"]


def test_s3_read_range_returns_exact_bytes(s3: S3Storage) -> None:
    s3.put("v.mp4", io.BytesIO(BODY), content_type="video/mp4")

    assert b"".join(s3.read_range("v.mp4", 0, 99)) == BODY[:100]
    assert b"".join(s3.read_range("v.mp4", 5000, len(BODY) - 1)) == BODY[5000:]


def test_s3_missing_objects(s3: S3Storage) -> None:
    assert s3.stat("nope.mp4") is None
    with pytest.raises(FileNotFoundError):
        s3.open("nope.mp4")
    with pytest.raises(FileNotFoundError):
        b"".join(s3.read_range("nope.mp4", 0, 9))


def test_s3_presigned_url_serves_the_bytes(s3: S3Storage) -> None:
    s3.put("outputs/job_1/0.mp4", io.BytesIO(BODY), content_type="video/mp4")

    url = s3.direct_url("outputs/job_1/0.mp4", ttl=600)
    response = requests.get(url, timeout=10)

    assert "X-Amz-Signature=" in url
    assert response.status_code == 200
    assert response.content == BODY
    assert response.headers["Content-Type"] == "video/mp4"


def test_s3_refuses_invalid_keys(s3: S3Storage) -> None:
    with pytest.raises(InvalidKey):
        s3.put("../escape", io.BytesIO(b"x"), content_type="text/plain")
    with pytest.raises(InvalidKey):
        s3.direct_url("/abs", ttl=60)
