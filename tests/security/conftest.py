"""Fixtures for the security suite: the three apps wired to local sandbox upstreams, callers of
every token kind, and a summary of how many cases were checked.

Uses `settings`, `profile_ctx`, `test_database` and `redis` from tests/conftest.py.
"""
from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr

from api.context import AppContext
from core.principal import TokenKind
from core.settings import Settings
from sandbox.server import BackgroundServer
from services import tokens as token_service
from tests.support.actors import asgi_client, make_token, make_user

APP_NAMES = ("profile", "dontdie", "epistemic")

# Counts reported at the end of the run (pytest -q prints them in the terminal summary).
SUMMARY: Counter = Counter()


def pytest_collection_modifyitems(config, items):
    """Fuzz on one database to stay within the CI budget: PostgreSQL when it is configured
    (the production database, and the stricter one), else SQLite. The auth matrix runs on
    both. SMA_FUZZ_ALL_BACKENDS=1 fuzzes both."""
    import os

    from tests.support.databases import backends
    if "postgres" not in backends() or os.environ.get("SMA_FUZZ_ALL_BACKENDS") == "1":
        return
    selected, deselected = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        is_fuzz = item.nodeid.startswith("tests/security/test_fuzz.py")
        (deselected if is_fuzz and params.get("test_database") == "sqlite" else selected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


def pytest_terminal_summary(terminalreporter):
    if not SUMMARY:
        return
    terminalreporter.section("security suite")
    for key in sorted(SUMMARY):
        terminalreporter.write_line(f"{key}: {SUMMARY[key]}")


@dataclass
class Upstreams:
    dontdie_url: str
    epistemic_url: str
    epistemic_key: str
    llm_url: str | None = None


@pytest.fixture(scope="session")
def upstreams():
    """Local stand-ins for Don't Die, Epistemic Me and the LLM, so nothing leaves loopback."""
    from sandbox import dontdie, epistemic
    key = str(uuid.uuid4())
    servers = [BackgroundServer(dontdie.create_app()).start(),
               BackgroundServer(epistemic.create_app(api_keys=[key])).start()]
    llm_url = None
    try:
        from sandbox import llm
        servers.append(BackgroundServer(llm.create_app()).start())
        llm_url = servers[-1].url + "/v1"
    except ImportError:  # pragma: no cover
        pass
    yield Upstreams(servers[0].url, servers[1].url, key, llm_url)
    for server in servers:
        server.stop()


def secured_settings(settings: Settings, upstreams: Upstreams, **extra) -> Settings:
    """The test settings pointed at the sandbox upstreams, with every dependency configured."""
    update = {
        "dontdie_base_url": upstreams.dontdie_url,
        "dontdie_timeout_seconds": 5.0,
        "dontdie_retries": 0,
        "epistemic_base_url": upstreams.epistemic_url,
        "epistemic_api_key": SecretStr(upstreams.epistemic_key),
        "epistemic_timeout_seconds": 5.0,
        "credential_key": SecretStr(Fernet.generate_key().decode()),
        "rate_limit_per_minute": 1_000_000,
        # Keep the upload route's body limit under 1 MiB too, so one oversized body fits all.
        "max_upload_bytes": 256 * 1024,
    }
    if upstreams.llm_url:
        update.update(llm_base_url=upstreams.llm_url, llm_api_key=SecretStr("sandbox-key"),
                      llm_timeout_seconds=10.0)
    update.update(extra)
    return settings.model_copy(update=update)


@pytest.fixture
def security_settings(settings, upstreams) -> Settings:
    return secured_settings(settings, upstreams)


@pytest.fixture
async def apps(profile_ctx, security_settings):
    """All three apps in-process, on the same database and Redis as `profile_ctx`."""
    from api.dontdie_app import build_dontdie_app
    from api.epistemic_app import build_epistemic_app
    from api.profile_app import build_profile_app

    profile_ctx.settings = security_settings
    contexts = {name: AppContext.from_settings(name, security_settings)
                for name in ("dontdie", "epistemic")}
    built = {"profile": build_profile_app(security_settings, ctx=profile_ctx),
             "dontdie": build_dontdie_app(security_settings, ctx=contexts["dontdie"]),
             "epistemic": build_epistemic_app(security_settings, ctx=contexts["epistemic"])}
    yield built
    for ctx in contexts.values():
        await ctx.aclose()


@dataclass
class Tokens:
    """Tokens of every kind, all valid for all three apps (they share the token table)."""
    admin: str
    service: str
    user: str
    user_id: uuid.UUID
    revoked: str
    expired: str


@pytest.fixture
async def tokens(profile_ctx, apps) -> Tokens:
    db = profile_ctx.db
    admin, _ = await make_token(db, TokenKind.admin, name="sec-admin")
    service, _ = await make_token(db, TokenKind.service, name="sec-service")
    user_id = await make_user(db)
    user, _ = await make_token(db, TokenKind.user, user_id, name="sec-user")
    # Revoked and expired tokens are admin tokens: if either slipped through it could do anything.
    revoked, revoked_id = await make_token(db, TokenKind.admin, name="sec-revoked")
    async with asgi_client(apps["profile"], revoked) as client:  # warm the Redis cache first
        assert (await client.get("/listUsers")).status_code == 200
    async with db.transaction() as session:
        await token_service.revoke_token(session, profile_ctx.redis, revoked_id)
    expired, _ = await make_token(db, TokenKind.admin, name="sec-expired",
                                  expires_in=timedelta(seconds=-60))
    return Tokens(admin, service, user, user_id, revoked, expired)


async def new_user_with_token(db) -> tuple[uuid.UUID, str]:
    user_id = await make_user(db)
    token, _ = await make_token(db, TokenKind.user, user_id, name="sec-user")
    return user_id, token
