"""The epistemic app in-process against the Epistemic Me sandbox over real HTTP.

Builds on the shared fixtures of tests/conftest.py (database, Redis, `profile_ctx`, `alice`,
`bob`, `service`, `admin`): those callers' tokens are reused against the epistemic app, which
shares the database and Redis with the profile app.
"""
from __future__ import annotations

import uuid

import httpx
import pytest
from pydantic import SecretStr

from api.context import AppContext
from api.epistemic_app import build_epistemic_app
from sandbox.epistemic import create_app as create_sandbox
from sandbox.server import BackgroundServer
from tests.support.actors import asgi_client

EM_KEY = str(uuid.uuid4())


@pytest.fixture(scope="session")
def em_key() -> str:
    return EM_KEY


@pytest.fixture(scope="session")
def em_sandbox():
    server = BackgroundServer(create_sandbox(api_keys=[EM_KEY])).start()
    yield server
    server.stop()


@pytest.fixture
async def em_upstream(em_sandbox):
    """Fault knobs and the request log of the sandbox; both are reset around every test."""
    async with httpx.AsyncClient(base_url=em_sandbox.url, timeout=10) as client:
        await client.delete("/_sandbox/faults")
        await client.delete("/_sandbox/requests")
        yield Upstream(em_sandbox, client)
        await client.delete("/_sandbox/faults")


class Upstream:
    def __init__(self, server: BackgroundServer, client: httpx.AsyncClient):
        self.server = server
        self.url = server.url
        self.client = client

    async def fault(self, **config) -> None:
        (await self.client.post("/_sandbox/faults", json=config)).raise_for_status()

    async def clear_faults(self) -> None:
        await self.client.delete("/_sandbox/faults")

    async def requests(self) -> list[str]:
        return (await self.client.get("/_sandbox/requests")).json()["requests"]

    async def clear_requests(self) -> None:
        await self.client.delete("/_sandbox/requests")


def em_settings_for(settings, url: str, key: str | None = EM_KEY, **overrides):
    values = {"epistemic_base_url": url, "epistemic_api_key": SecretStr(key or ""),
              "epistemic_timeout_seconds": 5.0, **overrides}
    return settings.model_copy(update=values)


@pytest.fixture
def em_settings(settings, em_sandbox):
    return em_settings_for(settings, em_sandbox.url)


@pytest.fixture
async def em_ctx(em_settings, profile_ctx):
    # Depends on profile_ctx so the database is cleaned only after this context is closed.
    ctx = AppContext.from_settings("epistemic", em_settings)
    yield ctx
    await ctx.aclose()


@pytest.fixture
def em_app(em_ctx, em_upstream):
    return build_epistemic_app(em_ctx.settings, ctx=em_ctx)


@pytest.fixture
async def em_client_for(em_app):
    """`em_client_for(caller_or_token_or_None, app=em_app)` → an httpx client of that app."""
    made: list[httpx.AsyncClient] = []

    def make(who=None, app=None) -> httpx.AsyncClient:
        token = getattr(who, "token", who)
        client = asgi_client(app or em_app, token)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


@pytest.fixture
def alice_em(em_client_for, alice):
    return em_client_for(alice)


@pytest.fixture
def bob_em(em_client_for, bob):
    return em_client_for(bob)


@pytest.fixture
def service_em(em_client_for, service):
    return em_client_for(service)


@pytest.fixture
def admin_em(em_client_for, admin):
    return em_client_for(admin)


@pytest.fixture
def anon_em(em_client_for):
    return em_client_for(None)


@pytest.fixture
async def em_app_with(settings, profile_ctx, em_sandbox):
    """Builds another epistemic app (own context) with different upstream settings:
    `em_app_with(url=..., key=..., epistemic_timeout_seconds=...)`."""
    contexts: list[AppContext] = []

    def build(url: str | None = None, key: str | None = EM_KEY, **overrides):
        s = em_settings_for(settings, em_sandbox.url if url is None else url, key, **overrides)
        ctx = AppContext.from_settings("epistemic", s)
        contexts.append(ctx)
        return build_epistemic_app(s, ctx=ctx)

    yield build
    for ctx in contexts:
        await ctx.aclose()
