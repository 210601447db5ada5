"""Fault tests: real processes on loopback (redis-server, PostgreSQL behind a TCP proxy, the
sandbox upstreams over real HTTP) in front of in-process apps.

Builds on tests/conftest.py (`test_database`, `redis_url`, `settings`, `profile_ctx`, callers).
Every wait here is bounded by a deadline; nothing sleeps a fixed time to "let things settle".
"""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from sandbox.server import BackgroundServer


def err(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The error envelope of `response`, asserting its status (and code)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == "error" and body["request_id"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


async def timed(coro) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await coro
    return response, time.monotonic() - started


async def wait_for_status(make_request, status: int, *, deadline_s: float = 30.0,
                          interval_s: float = 0.1) -> httpx.Response:
    """Repeat `make_request()` until it answers `status` or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        last = await make_request()
        if last.status_code == status:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"no {status} within {deadline_s}s; last: "
                         f"{last.status_code if last is not None else None} {last.text if last is not None else ''}")


@pytest.fixture(scope="session")
def dd_sandbox():
    from sandbox.dontdie import create_app
    with BackgroundServer(create_app()) as server:
        yield server


EM_KEY = "5d1c0f8e-3b2a-4c6d-9e7f-0a1b2c3d4e5f"  # Epistemic Me keys are UUIDs


@pytest.fixture(scope="session")
def em_sandbox():
    from sandbox.epistemic import create_app
    with BackgroundServer(create_app(api_keys=[EM_KEY])) as server:
        yield server


@pytest.fixture(autouse=True)
def _reset_sandbox_faults(request):
    """Fault knobs never leak from one test into the next."""
    servers = [request.getfixturevalue(name) for name in ("dd_sandbox", "em_sandbox")
               if name in request.fixturenames]
    for server in servers:
        httpx.delete(server.url + "/_sandbox/faults", timeout=10)
    yield
    for server in servers:
        httpx.delete(server.url + "/_sandbox/faults", timeout=10)


# Short upstream timeouts so refusing/erroring/hanging upstreams are cheap to test; a GET to
# Don't Die is tried at most 1 + DD_RETRIES times.
UPSTREAM_TIMEOUT_S = 1.0
DD_RETRIES = 1
CREDENTIAL_KEY = "Zm9vYmFyYmF6cXV4LWZhdWx0cy10ZXN0cy1rZXktMzI="  # 32 url-safe base64 bytes


@pytest.fixture
def settings(test_database, redis_url, tmp_path, dd_sandbox, em_sandbox):
    """tests/conftest.py's settings plus both sandboxes, a credential key and short timeouts."""
    from pydantic import SecretStr

    from core.settings import Settings
    return Settings(database_url=test_database.url, redis_url=redis_url, data_dir=tmp_path,
                    rate_limit_per_minute=10_000, credential_key=CREDENTIAL_KEY, llm_base_url="",
                    dontdie_base_url=dd_sandbox.url, dontdie_timeout_seconds=UPSTREAM_TIMEOUT_S,
                    dontdie_retries=DD_RETRIES, epistemic_base_url=em_sandbox.url,
                    epistemic_api_key=SecretStr(EM_KEY),
                    epistemic_timeout_seconds=UPSTREAM_TIMEOUT_S)


@pytest.fixture
async def dontdie_app(settings, profile_ctx):
    from api.context import AppContext
    from api.dontdie_app import build_dontdie_app
    ctx = AppContext.from_settings("dontdie", settings)
    yield build_dontdie_app(settings, ctx=ctx)
    facade = profile_ctx.extras.get("dd_sync")
    if facade is not None:
        await facade.drain()
    await ctx.aclose()


@pytest.fixture
async def epistemic_app(settings, profile_ctx):
    from api.context import AppContext
    from api.epistemic_app import build_epistemic_app
    ctx = AppContext.from_settings("epistemic", settings)
    yield build_epistemic_app(settings, ctx=ctx)
    await ctx.aclose()


@pytest.fixture
async def client_for():
    """client_for(app, caller_or_token_or_None) -> an httpx client; all closed at the end."""
    from tests.support.actors import asgi_client
    made: list[httpx.AsyncClient] = []

    def make(app, who=None) -> httpx.AsyncClient:
        client = asgi_client(app, getattr(who, "token", who))
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()
