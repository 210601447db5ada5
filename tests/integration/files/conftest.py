"""Every test in this folder runs against both object stores: the local directory and S3
(a real moto server in its own process), on every configured database."""
from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from core.settings import Settings
from storage.models import UserFile
from tests.support.s3 import MotoS3Server

# Small, so that the over-limit cases are cheap; the body limit of the upload route follows it.
MAX_UPLOAD = 64 * 1024


@pytest.fixture(scope="session")
def moto_s3():
    server = MotoS3Server().start()
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def object_store_kind(request) -> str:
    return request.param


@pytest.fixture
def settings(test_database, redis_url, tmp_path, object_store_kind, request) -> Settings:
    extra = {}
    if object_store_kind == "s3":
        extra = request.getfixturevalue("moto_s3").settings_overrides()
    return Settings(database_url=test_database.url, redis_url=redis_url, data_dir=tmp_path,
                    rate_limit_per_minute=10_000, credential_key="", max_upload_bytes=MAX_UPLOAD,
                    **extra)


@pytest.fixture
def objects(profile_ctx):
    return profile_ctx.objects


@pytest.fixture
def upload():
    """upload(caller, user_id, content, filename, content_type) -> response."""
    async def _upload(caller, user_id, content: bytes, filename: str = "file.bin",
                      content_type: str = "application/octet-stream"):
        return await caller.client.post("/uploadUserFile", params={"user_id": str(user_id)},
                                        files={"upload": (filename, content, content_type)})
    return _upload


@pytest.fixture
def count_rows(profile_ctx):
    """count_rows(Model, *conditions) -> number of matching rows."""
    async def _count(model, *conditions) -> int:
        async with profile_ctx.db.transaction() as session:
            return await session.scalar(select(func.count()).select_from(model).where(*conditions))
    return _count


@pytest.fixture
def file_row(profile_ctx):
    """file_row(file_id) -> the userfile row (or None)."""
    async def _row(file_id) -> UserFile | None:
        async with profile_ctx.db.transaction() as session:
            return await session.get(UserFile, uuid.UUID(str(file_id)))
    return _row
