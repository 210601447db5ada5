"""Object store for user files: a local directory (default) or S3/MinIO (SPEC §4.3).

Keys are relative, slash-separated paths such as ``users/{user_id}/{file_id}.pdf``. Every
segment must start with a letter or digit, so no key can climb out of the store (``..``),
be absolute, or collide with the local store's temporary files (which start with a dot).

The `minio` client is synchronous: its calls run in a worker thread (`asyncio.to_thread`).
"""
from __future__ import annotations

import abc
import asyncio
import io
import logging
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from core.errors import DependencyUnavailable, NotFound, ValidationFailed
from core.settings import Settings

log = logging.getLogger("sma.objects")

CHUNK_SIZE = 1024 * 1024
MAX_KEY_LENGTH = 500
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._\-]*"
_KEY_RE = re.compile(rf"^{_SEGMENT}(?:/{_SEGMENT})*$")
_PREFIX_RE = re.compile(rf"^(?:{_SEGMENT}/)+$")

Payload = bytes | BinaryIO


class ObjectNotFound(NotFound):
    """The object a row points to is not in the store."""

    def __init__(self, message: str = "The stored file content is missing", **kw):
        super().__init__(message, code="object_not_found", **kw)


class ObjectStoreUnavailable(DependencyUnavailable):
    def __init__(self, message: str = "The object store is unavailable", **kw):
        super().__init__(message, code="object_store_unavailable", **kw)


def user_prefix(user_id) -> str:
    """The folder holding every stored object of one user."""
    return f"users/{user_id}/"


def validate_key(key: str) -> str:
    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or not _KEY_RE.match(key):
        raise ValidationFailed("Invalid object key", details={"key": str(key)[:100]})
    return key


def validate_prefix(prefix: str) -> str:
    """Prefixes name a whole folder (``users/<id>/``): never empty, always ending in '/'."""
    if not isinstance(prefix, str) or len(prefix) > MAX_KEY_LENGTH or not _PREFIX_RE.match(prefix):
        raise ValidationFailed("Invalid object key prefix", details={"prefix": str(prefix)[:100]})
    return prefix


def _read_chunks(data: Payload, size: int):
    """Yield exactly `size` bytes from bytes or a binary file object (from its current position)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        if len(view) != size:
            raise ValueError(f"payload is {len(view)} bytes, expected {size}")
        for start in range(0, size, CHUNK_SIZE):
            yield bytes(view[start:start + CHUNK_SIZE])
        return
    remaining = size
    while remaining > 0:
        chunk = data.read(min(CHUNK_SIZE, remaining))
        if not chunk:
            raise ValueError(f"payload ended {remaining} bytes early")
        remaining -= len(chunk)
        yield chunk


class _ExactReader:
    """A read()-able view of exactly `size` bytes; a payload that ends early is a ValueError
    (raised before the object is completed, so nothing is stored)."""

    def __init__(self, data: Payload, size: int):
        if isinstance(data, (bytes, bytearray, memoryview)):
            if len(data) != size:
                raise ValueError(f"payload is {len(data)} bytes, expected {size}")
            data = io.BytesIO(data)
        self._data = data
        self._remaining = size

    def read(self, n: int = -1) -> bytes:
        if self._remaining <= 0:
            return b""
        want = self._remaining if n is None or n < 0 else min(n, self._remaining)
        chunk = self._data.read(want)
        if not chunk:
            raise ValueError(f"payload ended {self._remaining} bytes early")
        self._remaining -= len(chunk)
        return chunk


class ObjectStore(abc.ABC):
    kind: str = ""

    @abc.abstractmethod
    async def put(self, key: str, data: Payload, size: int,
                  content_type: str = "application/octet-stream") -> None:
        """Store exactly `size` bytes under `key` (replacing any existing object), atomically."""

    @abc.abstractmethod
    async def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
        """The object's bytes in chunks. Raises ObjectNotFound before yielding when missing."""

    async def get(self, key: str) -> bytes:
        return b"".join([chunk async for chunk in await self.open(key)])

    async def open(self, key: str, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
        """Like `iter_chunks`, but a missing object raises here, before any response starts."""
        if not await self.exists(key):
            raise ObjectNotFound()
        return self.iter_chunks(key, chunk_size)

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""

    @abc.abstractmethod
    async def delete_prefix(self, prefix: str) -> int:
        """Remove every object under the folder `prefix`; returns how many were removed."""

    @abc.abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def list_keys(self, prefix: str) -> list[str]: ...

    async def presigned_url(self, key: str, *, filename: str | None = None,
                            content_type: str | None = None,
                            content_disposition: str | None = None) -> str | None:
        """A short-lived URL the client can GET directly, or None when the store has none."""
        validate_key(key)
        return None

    async def ping(self) -> str:
        return "ok"

    async def aclose(self) -> None:
        return None


class LocalObjectStore(ObjectStore):
    kind = "local"

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        validate_key(key)
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValidationFailed("Invalid object key")
        return path

    def _put_sync(self, key: str, data: Payload, size: int) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as out:
                for chunk in _read_chunks(data, size):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    async def put(self, key, data, size, content_type="application/octet-stream") -> None:
        try:
            await asyncio.to_thread(self._put_sync, key, data, size)
        except OSError as exc:
            log.warning("local object store write failed: %s", exc)
            raise ObjectStoreUnavailable() from exc

    async def iter_chunks(self, key, chunk_size=CHUNK_SIZE) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            handle = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound() from exc
        try:
            while chunk := await asyncio.to_thread(handle.read, chunk_size):
                yield chunk
        finally:
            handle.close()

    async def open(self, key, chunk_size=CHUNK_SIZE) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            handle = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound() from exc

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await asyncio.to_thread(handle.read, chunk_size):
                    yield chunk
            finally:
                handle.close()
        return chunks()

    async def delete(self, key) -> None:
        path = self._path(key)
        await asyncio.to_thread(path.unlink, True)

    def _delete_prefix_sync(self, prefix: str) -> int:
        folder = (self.root / prefix).resolve()
        if not folder.is_relative_to(self.root) or folder == self.root or not folder.is_dir():
            return 0
        count = sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        shutil.rmtree(folder)
        return count

    async def delete_prefix(self, prefix) -> int:
        validate_prefix(prefix)
        try:
            return await asyncio.to_thread(self._delete_prefix_sync, prefix)
        except OSError as exc:
            raise ObjectStoreUnavailable() from exc

    async def exists(self, key) -> bool:
        return await asyncio.to_thread(self._path(key).is_file)

    def _list_sync(self, prefix: str) -> list[str]:
        folder = (self.root / prefix).resolve()
        if not folder.is_relative_to(self.root) or not folder.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in folder.rglob("*")
                      if p.is_file() and not p.name.startswith("."))

    async def list_keys(self, prefix) -> list[str]:
        validate_prefix(prefix)
        return await asyncio.to_thread(self._list_sync, prefix)

    async def ping(self) -> str:
        def check() -> str:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise ObjectStoreUnavailable("The object store directory is not writable")
            return f"local:{self.root}"
        return await asyncio.to_thread(check)


class S3ObjectStore(ObjectStore):
    """S3 or MinIO through the `minio` client. The bucket is created on first use."""

    kind = "s3"

    def __init__(self, *, endpoint: str, access_key: str, secret_key: str, bucket: str,
                 secure: bool = True, region: str = "us-east-1", presign_seconds: int = 300,
                 timeout_seconds: float = 30.0):
        import urllib3
        from minio import Minio

        if "://" in endpoint:  # accept http://host:port as well as host:port
            parts = urlsplit(endpoint)
            secure = parts.scheme == "https"
            endpoint = parts.netloc
        self.bucket = bucket
        self.presign_seconds = max(1, min(int(presign_seconds), 7 * 24 * 3600))
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=timeout_seconds), maxsize=16,
            retries=urllib3.Retry(total=2, backoff_factor=0.2,
                                  status_forcelist=[500, 502, 503, 504]))
        self._http = http
        self.client = Minio(endpoint, access_key=access_key or None, secret_key=secret_key or None,
                            secure=secure, region=region or None, http_client=http)
        self._bucket_ready = False
        self._bucket_lock = asyncio.Lock()

    async def _call(self, fn, *args, **kwargs):
        from minio.error import MinioException

        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (MinioException, OSError) as exc:
            from minio.error import S3Error
            if isinstance(exc, S3Error) and exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound() from exc
            log.warning("object store call %s failed: %s", getattr(fn, "__name__", fn),
                        type(exc).__name__)
            raise ObjectStoreUnavailable() from exc
        except Exception as exc:  # urllib3 MaxRetryError and friends
            import urllib3
            if isinstance(exc, urllib3.exceptions.HTTPError):
                log.warning("object store unreachable: %s", type(exc).__name__)
                raise ObjectStoreUnavailable() from exc
            raise

    async def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        async with self._bucket_lock:
            if self._bucket_ready:
                return
            if not await self._call(self.client.bucket_exists, self.bucket):
                from minio.error import S3Error
                try:
                    await asyncio.to_thread(self.client.make_bucket, self.bucket)
                except S3Error as exc:  # a concurrent creator won
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise ObjectStoreUnavailable() from exc
                except Exception as exc:
                    raise ObjectStoreUnavailable() from exc
            self._bucket_ready = True

    async def put(self, key, data, size, content_type="application/octet-stream") -> None:
        validate_key(key)
        await self._ensure_bucket()

        def upload() -> None:
            self.client.put_object(self.bucket, key, _ExactReader(data, size), length=size,
                                   content_type=content_type or "application/octet-stream")
        await self._call(upload)

    async def iter_chunks(self, key, chunk_size=CHUNK_SIZE) -> AsyncIterator[bytes]:
        validate_key(key)
        await self._ensure_bucket()
        response = await self._call(self.client.get_object, self.bucket, key)
        try:
            while chunk := await asyncio.to_thread(response.read, chunk_size):
                yield chunk
        finally:
            response.close()
            response.release_conn()

    async def delete(self, key) -> None:
        validate_key(key)
        await self._ensure_bucket()
        await self._call(self.client.remove_object, self.bucket, key)  # idempotent in S3

    async def list_keys(self, prefix) -> list[str]:
        validate_prefix(prefix)
        await self._ensure_bucket()

        def listing() -> list[str]:
            return sorted(o.object_name for o in
                          self.client.list_objects(self.bucket, prefix=prefix, recursive=True))
        return await self._call(listing)

    async def delete_prefix(self, prefix) -> int:
        keys = await self.list_keys(prefix)
        if not keys:
            return 0
        from minio.deleteobjects import DeleteObject

        def remove() -> list:
            return list(self.client.remove_objects(self.bucket, [DeleteObject(k) for k in keys]))
        errors = await self._call(remove)
        if errors:
            log.warning("object store could not delete %d objects under %s", len(errors), prefix)
            raise ObjectStoreUnavailable("The object store did not delete every object")
        return len(keys)

    async def exists(self, key) -> bool:
        validate_key(key)
        await self._ensure_bucket()
        try:
            await self._call(self.client.stat_object, self.bucket, key)
        except ObjectNotFound:
            return False
        return True

    async def presigned_url(self, key, *, filename=None, content_type=None,
                            content_disposition=None) -> str | None:
        validate_key(key)
        await self._ensure_bucket()
        headers = {}
        if content_type:
            headers["response-content-type"] = content_type
        if content_disposition:
            headers["response-content-disposition"] = content_disposition
        return await self._call(self.client.presigned_get_object, self.bucket, key,
                                expires=timedelta(seconds=self.presign_seconds),
                                response_headers=headers or None)

    async def ping(self) -> str:
        await self._ensure_bucket()
        await self._call(self.client.bucket_exists, self.bucket)
        return f"s3:{self.bucket}"

    async def aclose(self) -> None:
        self._http.clear()


def object_store_from_settings(settings: Settings) -> ObjectStore:
    kind = (settings.object_store or "local").strip().lower()
    if kind == "local":
        return LocalObjectStore(settings.resolved_object_store_dir())
    if kind in ("s3", "minio"):
        if not settings.s3_endpoint:
            raise DependencyUnavailable("SMA_OBJECT_STORE=s3 needs SMA_S3_ENDPOINT",
                                        code="object_store_not_configured")
        return S3ObjectStore(
            endpoint=settings.s3_endpoint, access_key=settings.s3_access_key.get_secret_value(),
            secret_key=settings.s3_secret_key.get_secret_value(), bucket=settings.s3_bucket,
            secure=settings.s3_secure, region=settings.s3_region,
            presign_seconds=settings.presign_seconds)
    raise ValueError(f"Unknown object store {settings.object_store!r} (use 'local' or 's3')")
