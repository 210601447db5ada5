"""The ObjectStore contract, identical for the local directory and S3 (moto)."""
from __future__ import annotations

import asyncio
import io
import socket
import uuid

import httpx
import pytest

from core.errors import ValidationFailed
from storage.objects import LocalObjectStore, ObjectNotFound, ObjectStoreUnavailable, S3ObjectStore


@pytest.fixture(params=["local", "s3"])
async def objects(request, tmp_path):
    """A store of each kind, without a database or an app (overrides the app-bound fixture)."""
    if request.param == "local":
        yield LocalObjectStore(tmp_path / "objects")
        return
    o = request.getfixturevalue("moto_s3").settings_overrides()
    store = S3ObjectStore(endpoint=o["s3_endpoint"], access_key=o["s3_access_key"],
                          secret_key=o["s3_secret_key"], bucket=o["s3_bucket"], secure=False)
    yield store
    await store.aclose()


@pytest.fixture
def object_store_kind(objects) -> str:
    return objects.kind


async def test_put_get_exists_delete(objects):
    key = f"users/{uuid.uuid4()}/a.txt"
    assert not await objects.exists(key)
    await objects.put(key, b"hello\n", 6, "text/plain")
    assert await objects.exists(key)
    assert await objects.get(key) == b"hello\n"
    # Replacing is atomic and complete; file objects are read from their current position.
    stream = io.BytesIO(b"XXworld\n")
    stream.seek(2)
    await objects.put(key, stream, 6, "text/plain")
    assert await objects.get(key) == b"world\n"
    chunks = [c async for c in await objects.open(key, chunk_size=2)]
    assert chunks == [b"wo", b"rl", b"d\n"]
    await objects.delete(key)
    await objects.delete(key)  # idempotent
    assert not await objects.exists(key)
    with pytest.raises(ObjectNotFound):
        await objects.open(key)
    with pytest.raises(ObjectNotFound):
        await objects.get(key)


async def test_short_payload_stores_nothing(objects):
    key = f"users/{uuid.uuid4()}/short.bin"
    with pytest.raises(ValueError):
        await objects.put(key, io.BytesIO(b"abc"), 10)
    assert not await objects.exists(key)
    with pytest.raises(ValueError):
        await objects.put(key, b"abc", 10)
    assert not await objects.exists(key)
    if isinstance(objects, LocalObjectStore):  # no temporary files left behind
        assert [p for p in objects.root.rglob("*") if p.is_file()] == []


UNSAFE_KEYS = ["../escape.txt", "/etc/passwd", "users/../../x", "users//x", "users/.hidden",
               "users\\x", "", "users/x/", "a" * 501, "users/\x00x", "users/ x", "users/x/.."]
UNSAFE_PREFIXES = ["", "users", "/users/", "../", "users/../", "users/*/", "users/.x/"]


async def test_unsafe_keys_and_prefixes_are_refused(objects):
    for key in UNSAFE_KEYS:
        for call in (objects.put(key, b"x", 1), objects.exists(key), objects.delete(key),
                     objects.presigned_url(key)):
            with pytest.raises(ValidationFailed):
                await call
    for prefix in UNSAFE_PREFIXES:
        for call in (objects.delete_prefix(prefix), objects.list_keys(prefix)):
            with pytest.raises(ValidationFailed):
                await call
    if isinstance(objects, LocalObjectStore):
        assert not (objects.root.parent / "escape.txt").exists()


async def test_delete_prefix_removes_only_that_folder(objects):
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    keys = [f"users/{a}/1.txt", f"users/{a}/sub/2.txt", f"users/{a}x/3.txt", f"users/{b}/4.txt"]
    for key in keys:
        await objects.put(key, b"data", 4)
    assert await objects.list_keys(f"users/{a}/") == sorted(keys[:2])
    assert await objects.delete_prefix(f"users/{a}/") == 2
    assert await objects.list_keys(f"users/{a}/") == []
    for key in keys[2:]:
        assert await objects.exists(key)
    assert await objects.delete_prefix(f"users/{a}/") == 0


async def test_presigned_url(objects, object_store_kind):
    key = f"users/{uuid.uuid4()}/p.csv"
    await objects.put(key, b"a,b\n1,2\n", 8, "text/csv")
    url = await objects.presigned_url(key, content_type="text/csv",
                                      content_disposition='attachment; filename="p.csv"')
    if object_store_kind == "local":
        assert url is None
        return
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(url)
        assert r.status_code == 200 and r.content == b"a,b\n1,2\n"
        assert r.headers["content-type"] == "text/csv"
        assert r.headers["content-disposition"] == 'attachment; filename="p.csv"'
        # The signature covers the key: another key with the same signature is refused.
        forged = url.replace("p.csv", "q.csv")
        assert (await client.get(forged)).status_code == 403


async def test_s3_creates_its_bucket_and_reports_outages(moto_s3):
    overrides = moto_s3.settings_overrides()
    store = S3ObjectStore(endpoint=overrides["s3_endpoint"], access_key=overrides["s3_access_key"],
                          secret_key=overrides["s3_secret_key"], bucket=overrides["s3_bucket"],
                          secure=False)
    assert not await _bucket_exists(store)
    await store.put("users/x/a.txt", b"a", 1)
    assert await _bucket_exists(store)
    assert await store.ping() == f"s3:{overrides['s3_bucket']}"
    await store.aclose()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    dead = S3ObjectStore(endpoint=f"127.0.0.1:{dead_port}", access_key="a", secret_key="b",
                         bucket="nope", secure=False, timeout_seconds=2)
    with pytest.raises(ObjectStoreUnavailable) as info:
        await dead.put("users/x/a.txt", b"a", 1)
    assert info.value.status_code == 503 and info.value.code == "object_store_unavailable"
    await dead.aclose()


async def _bucket_exists(store: S3ObjectStore) -> bool:
    return await asyncio.to_thread(store.client.bucket_exists, store.bucket)
