"""Object storage for outputs and uploads: a local directory or an S3-compatible bucket.

Both backends speak the small :class:`Storage` protocol. Keys are relative POSIX
paths (``outputs/<job_id>/0.mp4``) checked by :func:`validate_key` before any
backend touches them, so a key can never name anything outside the storage root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mimetypes
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, cast
from urllib.parse import quote, unquote, urlsplit

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CHUNK_SIZE = 64 * 1024
MAX_KEY_LENGTH = 1024
MAX_SEGMENT_LENGTH = 255
# SigV4 presigned URLs cannot live longer than seven days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
DEFAULT_CONTENT_TYPE = "application/octet-stream"
KEY_PATTERN = re.compile(r"[A-Za-z0-9._/-]+")
SIDECAR_SUFFIX = ".meta.json"


class InvalidKey(ValueError):
    """Raised for a key that is empty, absolute, escapes the root or has odd characters."""


@dataclass(frozen=True)
class StoredObject:
    """What storage knows about one stored object."""

    key: str
    size: int
    content_type: str
    etag: str


class StorageSettings(Protocol):
    """The part of :class:`service.config.Settings` that :func:`open_storage` reads."""

    @property
    def storage_url(self) -> str: ...

    @property
    def s3_endpoint_url(self) -> str | None: ...

    @property
    def media_public_base_url(self) -> str | None: ...


class Storage(Protocol):
    """Where outputs and uploads live; every method validates its key first."""

    def put(self, key: str, data: BinaryIO, *, content_type: str) -> StoredObject:
        """Store the whole of ``data`` under ``key``, replacing any previous object."""
        ...

    def stat(self, key: str) -> StoredObject | None:
        """Return the object's metadata, or None when there is no such object."""
        ...

    def open(self, key: str) -> BinaryIO:
        """Open the object for reading; raise FileNotFoundError when it is missing."""
        ...

    def read_range(self, key: str, start: int, end_inclusive: int) -> Iterator[bytes]:
        """Yield the bytes ``start..end_inclusive`` of the object in chunks."""
        ...

    def delete(self, key: str) -> None:
        """Delete the object; a missing object is not an error."""
        ...

    def direct_url(self, key: str, ttl: float) -> str | None:
        """Return a URL clients can fetch directly, or None to use our signed /media URL."""
        ...


def validate_key(key: str) -> str:
    """Return ``key`` when it is a safe relative POSIX path, else raise InvalidKey.

    Segments may not start with a dot: that rules out ``.`` and ``..`` and keeps the
    local backend's hidden temporary and sidecar files out of reach.
    """
    if not key:
        raise InvalidKey("key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"key is longer than {MAX_KEY_LENGTH} characters")
    if "\x00" in key or "\\" in key:
        raise InvalidKey("key contains a NUL or a backslash")
    if key.startswith("/"):
        raise InvalidKey("key is absolute")
    if not KEY_PATTERN.fullmatch(key):
        raise InvalidKey("key may only contain A-Z, a-z, 0-9, '.', '_', '-' and '/'")
    for segment in key.split("/"):
        if not segment:
            raise InvalidKey("key has an empty path segment")
        if segment.startswith("."):
            raise InvalidKey("key has a path segment starting with '.'")
        if len(segment) > MAX_SEGMENT_LENGTH:
            raise InvalidKey(f"key has a path segment longer than {MAX_SEGMENT_LENGTH}")
    return key


def quote_etag(hex_digest: str) -> str:
    """Return ``hex_digest`` as a strong HTTP entity tag."""
    return f'"{hex_digest}"'


def _fsync_directory(path: Path) -> None:
    """Flush a directory entry so a rename survives a power cut (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class LocalStorage:
    """Store objects as files under ``root``, with the metadata in a hidden sidecar.

    Writes go to a temporary file in the target directory and are moved into place
    with :func:`os.replace`, so readers see either the old or the new object.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        """Return the file that holds ``key``, refusing anything that resolves outside root."""
        path = self.root / validate_key(key)
        # Defence in depth: a symlink planted inside the root must not lead out of it.
        if not path.resolve().is_relative_to(self.root):
            raise InvalidKey("key resolves outside the storage root")
        return path

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(f".{path.name}{SIDECAR_SUFFIX}")

    def put(self, key: str, data: BinaryIO, *, content_type: str) -> StoredObject:
        """Store ``data`` atomically under ``key`` and record its content type and sha256."""
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        meta_tmp: Path | None = None
        try:
            with os.fdopen(fd, "wb") as handle:
                while chunk := data.read(CHUNK_SIZE):
                    digest.update(chunk)
                    size += len(chunk)
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            stored = StoredObject(
                key=key, size=size, content_type=content_type, etag=quote_etag(digest.hexdigest())
            )
            meta = {
                "content_type": content_type,
                "size": size,
                "sha256": digest.hexdigest(),
                # Lets stat() notice a sidecar that belongs to an older file.
                "mtime_ns": tmp.stat().st_mtime_ns,
            }
            meta_fd, meta_name = tempfile.mkstemp(
                dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
            )
            meta_tmp = Path(meta_name)
            with os.fdopen(meta_fd, "w", encoding="utf-8") as handle:
                json.dump(meta, handle)
            os.replace(tmp, path)
            os.replace(meta_tmp, self._sidecar(path))
        except BaseException:
            tmp.unlink(missing_ok=True)
            if meta_tmp is not None:
                meta_tmp.unlink(missing_ok=True)
            raise
        _fsync_directory(path.parent)
        return stored

    def stat(self, key: str) -> StoredObject | None:
        """Return the object's metadata from its sidecar, or derive it when that is stale."""
        path = self.path_for(key)
        try:
            info = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        try:
            meta = json.loads(self._sidecar(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        if (
            isinstance(meta, dict)
            and meta.get("size") == info.st_size
            and meta.get("mtime_ns") == info.st_mtime_ns
        ):
            return StoredObject(
                key=key,
                size=info.st_size,
                content_type=str(meta["content_type"]),
                etag=quote_etag(str(meta["sha256"])),
            )
        guessed, _ = mimetypes.guess_type(path.name)
        return StoredObject(
            key=key,
            size=info.st_size,
            content_type=guessed or DEFAULT_CONTENT_TYPE,
            etag=quote_etag(f"{info.st_mtime_ns:x}-{info.st_size:x}"),
        )

    def open(self, key: str) -> BinaryIO:
        """Open the file for reading; raise FileNotFoundError when there is none."""
        path = self.path_for(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        return path.open("rb")

    def read_range(self, key: str, start: int, end_inclusive: int) -> Iterator[bytes]:
        """Yield the bytes ``start..end_inclusive``, opening the file only when iterated."""
        path = self.path_for(key)

        def chunks() -> Iterator[bytes]:
            if not path.is_file():
                raise FileNotFoundError(key)
            remaining = end_inclusive - start + 1
            with path.open("rb") as handle:
                handle.seek(start)
                while remaining > 0:
                    chunk = handle.read(min(CHUNK_SIZE, remaining))
                    if not chunk:
                        return
                    remaining -= len(chunk)
                    yield chunk

        return chunks()

    def delete(self, key: str) -> None:
        """Remove the file and its sidecar; a missing file is fine."""
        path = self.path_for(key)
        path.unlink(missing_ok=True)
        self._sidecar(path).unlink(missing_ok=True)

    def direct_url(self, key: str, ttl: float) -> str | None:
        """Return None: local files are only served through signed /media URLs."""
        validate_key(key)
        return None


def _import_boto3() -> Any:
    try:
        import boto3
    except ImportError as exc:
        raise RuntimeError(
            "S3 storage needs boto3; install the aws extra: pip install 'motionhook[aws]'"
        ) from exc
    return boto3


def _is_missing(error: Exception) -> bool:
    code = str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))
    return code in {"404", "NoSuchKey", "NotFound"}


class S3Storage:
    """Store objects in an S3-compatible bucket under an optional key prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        public_base_url: str | None = None,
        client: S3Client | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("S3 storage needs a bucket name")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.client: S3Client = client or self._make_client(endpoint_url)

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, prefix={self.prefix!r})"

    @staticmethod
    def _make_client(endpoint_url: str | None) -> S3Client:
        boto3 = _import_boto3()
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",
            connect_timeout=10,
            read_timeout=60,
            retries={"mode": "standard", "max_attempts": 3},
            # Custom endpoints (MinIO, R2, moto, …) rarely resolve bucket subdomains.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        return cast("S3Client", boto3.client("s3", endpoint_url=endpoint_url, config=config))

    def object_key(self, key: str) -> str:
        """Return the bucket key for ``key``: the prefix joined to the validated key."""
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: BinaryIO, *, content_type: str) -> StoredObject:
        """Upload ``data`` with its content type, then read back size and ETag."""
        name = self.object_key(key)
        self.client.upload_fileobj(data, self.bucket, name, ExtraArgs={"ContentType": content_type})
        stored = self.stat(key)
        if stored is None:
            raise FileNotFoundError(f"s3://{self.bucket}/{name} vanished right after upload")
        return stored

    def stat(self, key: str) -> StoredObject | None:
        """Return the object's metadata from HEAD, or None when it does not exist."""
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise
        return StoredObject(
            key=key,
            size=int(head["ContentLength"]),
            content_type=head.get("ContentType") or DEFAULT_CONTENT_TYPE,
            etag=head["ETag"],
        )

    def open(self, key: str) -> BinaryIO:
        """Return the object's streaming body; raise FileNotFoundError when it is missing."""
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if _is_missing(exc):
                raise FileNotFoundError(key) from exc
            raise
        return cast(BinaryIO, response["Body"])

    def read_range(self, key: str, start: int, end_inclusive: int) -> Iterator[bytes]:
        """Yield the bytes ``start..end_inclusive`` with one ranged GET, made when iterated."""
        name = self.object_key(key)

        def chunks() -> Iterator[bytes]:
            from botocore.exceptions import ClientError

            try:
                response = self.client.get_object(
                    Bucket=self.bucket, Key=name, Range=f"bytes={start}-{end_inclusive}"
                )
            except ClientError as exc:
                if _is_missing(exc):
                    raise FileNotFoundError(key) from exc
                raise
            body = response["Body"]
            try:
                yield from body.iter_chunks(CHUNK_SIZE)
            finally:
                body.close()

        return chunks()

    def delete(self, key: str) -> None:
        """Delete the object; S3 treats a missing key as success."""
        self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))

    def direct_url(self, key: str, ttl: float) -> str:
        """Return ``public_base_url/<object key>``, or a presigned GET valid for ``ttl``."""
        name = self.object_key(key)
        if self.public_base_url:
            return f"{self.public_base_url}/{quote(name)}"
        expires = int(min(max(ttl, 1), MAX_PRESIGN_SECONDS))
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": name}, ExpiresIn=expires
        )


def open_storage(
    storage_url: str | StorageSettings,
    *,
    s3_endpoint_url: str | None = None,
    media_public_base_url: str | None = None,
) -> Storage:
    """Build the backend named by a storage URL: a directory or ``s3://bucket/prefix``.

    Takes either the URL and the two S3 options, or any object with the three
    attributes of :class:`StorageSettings` (such as ``Settings``).
    """
    if not isinstance(storage_url, str):
        s3_endpoint_url = storage_url.s3_endpoint_url
        media_public_base_url = storage_url.media_public_base_url
        storage_url = storage_url.storage_url
    url = storage_url.strip()
    parts = urlsplit(url)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"MOTIONHOOK_STORAGE_URL {url!r} has no bucket (s3://bucket/prefix)")
        return S3Storage(
            parts.netloc,
            unquote(parts.path),
            endpoint_url=s3_endpoint_url,
            public_base_url=media_public_base_url,
        )
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"MOTIONHOOK_STORAGE_URL {url!r} names a remote host; use file:///absolute/path"
            )
        if not parts.path:
            raise ValueError(f"MOTIONHOOK_STORAGE_URL {url!r} has no path")
        return LocalStorage(Path(unquote(parts.path)))
    if url and not parts.scheme:
        return LocalStorage(Path(url))
    raise ValueError(
        f"MOTIONHOOK_STORAGE_URL must be file:///path, a directory or s3://bucket/prefix; "
        f"got {url!r}"
    )
