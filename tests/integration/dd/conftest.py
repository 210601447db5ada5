"""Don't Die tests: the sandbox upstream over real HTTP, real Redis and every configured database.

The apps here run without Ray, so the sync facade runs its coordinator in-process (the Ray
hosts are covered by tests/e2e/test_dd_sync_actor.py).
"""
from __future__ import annotations

import httpx
import pytest
from sqlalchemy import func, select

from api.context import AppContext
from core.settings import Settings
from sandbox.dontdie import create_app
from sandbox.server import BackgroundServer
from tests.support.actors import asgi_client
from tests.support.dd import (CLIENT_ID, CREDENTIAL_KEY, DD_RETRIES, DD_TIMEOUT_SECONDS,
                              SandboxControl, new_dd_token)



@pytest.fixture(scope="session")
def dd_sandbox():
    server = BackgroundServer(create_app()).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _reset_sandbox(dd_sandbox):
    httpx.delete(f"{dd_sandbox.url}/_sandbox/faults")
    httpx.delete(f"{dd_sandbox.url}/_sandbox/requests")
    yield
    httpx.delete(f"{dd_sandbox.url}/_sandbox/faults")


@pytest.fixture
def settings(test_database, redis_url, tmp_path, dd_sandbox) -> Settings:
    return Settings(database_url=test_database.url, redis_url=redis_url, data_dir=tmp_path,
                    rate_limit_per_minute=10_000, credential_key=CREDENTIAL_KEY,
                    dontdie_base_url=dd_sandbox.url, dontdie_timeout_seconds=DD_TIMEOUT_SECONDS,
                    dontdie_retries=DD_RETRIES)


@pytest.fixture(autouse=True)
async def _drain_syncs(profile_ctx):
    """Background refreshes finish before the database is cleaned."""
    yield
    facade = profile_ctx.extras.get("dd_sync")
    if facade is not None:
        await facade.drain()


@pytest.fixture
async def dontdie_ctx(settings, profile_ctx) -> AppContext:
    ctx = AppContext.from_settings("dontdie", settings)
    yield ctx
    await ctx.aclose()


@pytest.fixture
def dontdie_app(dontdie_ctx):
    from api.dontdie_app import build_dontdie_app
    return build_dontdie_app(dontdie_ctx.settings, ctx=dontdie_ctx)


@pytest.fixture
async def dd_client(dontdie_app):
    """dd_client(caller_or_None) -> an httpx client for the dontdie app with that caller's token."""
    clients = []

    def make(caller=None) -> httpx.AsyncClient:
        client = asgi_client(dontdie_app, caller.token if caller else None)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
def link():
    """link(caller, user_id=None, token=None) -> (response, token)."""
    async def _link(caller, user_id=None, token: str | None = None, client_id: str = CLIENT_ID):
        token = token or new_dd_token()
        response = await caller.client.post("/dd-data/link", json={
            "user_id": str(user_id or caller.user_id), "dd_token": token, "dd_client_id": client_id})
        return response, token
    return _link


@pytest.fixture
def sandbox_control(dd_sandbox):
    return SandboxControl(dd_sandbox.url)


@pytest.fixture
def count_rows(profile_ctx):
    async def _count(model, *conditions) -> int:
        async with profile_ctx.db.transaction() as session:
            return await session.scalar(select(func.count()).select_from(model).where(*conditions))
    return _count
