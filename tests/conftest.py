"""Shared fixtures: databases (SQLite, and PostgreSQL when SMA_TEST_POSTGRES_URL is set),
Redis (SMA_TEST_REDIS_URL, else an embedded server), apps and authenticated callers."""
from __future__ import annotations

import os

os.environ.setdefault("DEEPEVAL_TELEMETRY_OPT_OUT", "1")
os.environ.setdefault("DEEPEVAL_DISABLE_DOTENV", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from api.context import AppContext  # noqa: E402
from core.principal import TokenKind  # noqa: E402
from core.settings import Settings  # noqa: E402
from storage.redis import EmbeddedRedis, make_redis  # noqa: E402
from tests.support.actors import make_caller  # noqa: E402
from tests.support.databases import TestDatabase, backends  # noqa: E402


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> str:
    configured = os.environ.get("SMA_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persist=False).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session", params=backends())
async def test_database(request, tmp_path_factory) -> TestDatabase:
    database = TestDatabase(request.param, tmp_path_factory.mktemp(f"db-{request.param}"))
    await database.create()
    yield database
    await database.drop()


@pytest.fixture
def settings(test_database, redis_url, tmp_path) -> Settings:
    return Settings(database_url=test_database.url, redis_url=redis_url, data_dir=tmp_path,
                    rate_limit_per_minute=10_000, credential_key="")


@pytest.fixture
async def redis(redis_url) -> aioredis.Redis:
    client = make_redis(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


def _make_ctx(name: str, settings: Settings) -> AppContext:
    return AppContext.from_settings(name, settings)


@pytest.fixture
async def profile_ctx(settings, test_database, redis) -> AppContext:
    ctx = _make_ctx("profile", settings)
    yield ctx
    await test_database.clean(ctx.db)
    await ctx.aclose()


@pytest.fixture
def profile_app(profile_ctx):
    from api.profile_app import build_profile_app
    return build_profile_app(profile_ctx.settings, ctx=profile_ctx)


@pytest.fixture
async def admin(profile_ctx, profile_app):
    caller = await make_caller(profile_ctx.db, profile_app, TokenKind.admin)
    yield caller
    await caller.client.aclose()


@pytest.fixture
async def service(profile_ctx, profile_app):
    caller = await make_caller(profile_ctx.db, profile_app, TokenKind.service)
    yield caller
    await caller.client.aclose()


@pytest.fixture
async def alice(profile_ctx, profile_app):
    caller = await make_caller(profile_ctx.db, profile_app, TokenKind.user)
    yield caller
    await caller.client.aclose()


@pytest.fixture
async def bob(profile_ctx, profile_app):
    caller = await make_caller(profile_ctx.db, profile_app, TokenKind.user)
    yield caller
    await caller.client.aclose()


@pytest.fixture
async def anonymous(profile_app):
    from tests.support.actors import asgi_client
    client = asgi_client(profile_app)
    yield client
    await client.aclose()


def pytest_collection_modifyitems(config, items):
    """End-to-end tests run last: their Ray cluster (and its simulator pool, which consumes the
    shared Redis queue) lives until the session ends, so nothing may run after it."""
    items.sort(key=lambda item: "/tests/e2e/" in str(item.path).replace("\\", "/"))
