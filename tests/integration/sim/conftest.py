"""Simulation tests: real Redis (db from SMA_TEST_REDIS_URL), every configured database, and
the sandbox LLM and Epistemic Me servers over real HTTP."""
from __future__ import annotations

import uuid

import httpx
import pytest
from pydantic import SecretStr

from core.principal import TokenKind
from core.settings import Settings
from sandbox.server import BackgroundServer
from storage.queue import ReliableQueue
from tests.support.actors import make_token

HEARTBEAT_SECONDS = 1
BACKOFF_SECONDS = 0.05


@pytest.fixture(scope="session")
def llm_sandbox():
    from sandbox.llm import create_app
    with BackgroundServer(create_app()) as server:
        yield server


@pytest.fixture(scope="session")
def epistemic_key() -> str:
    return str(uuid.uuid4())


@pytest.fixture(scope="session")
def epistemic_sandbox(epistemic_key):
    from sandbox.epistemic import create_app
    with BackgroundServer(create_app(api_keys=[epistemic_key])) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean_sandboxes(request):
    """Fault knobs and usage counters never leak from one test into the next."""
    servers = [request.getfixturevalue(name) for name in ("llm_sandbox", "epistemic_sandbox")
               if name in request.fixturenames]
    for server in servers:
        for path in ("/_sandbox/faults", "/_sandbox/usage", "/_sandbox/requests"):
            httpx.delete(server.url + path)
    yield
    for server in servers:
        httpx.delete(server.url + "/_sandbox/faults")


@pytest.fixture
def settings(test_database, redis_url, tmp_path) -> Settings:
    """No LLM configured (the scripted generator), quick heartbeats and backoff."""
    return Settings(database_url=test_database.url, redis_url=redis_url, data_dir=tmp_path,
                    rate_limit_per_minute=10_000, credential_key="", llm_base_url="",
                    sim_heartbeat_seconds=HEARTBEAT_SECONDS,
                    sim_backoff_base_seconds=BACKOFF_SECONDS, sim_max_attempts=3)


@pytest.fixture
def llm_settings(settings, llm_sandbox) -> Settings:
    return settings.model_copy(update={
        "llm_base_url": f"{llm_sandbox.url}/v1", "llm_api_key": SecretStr("sandbox-key"),
        "llm_coach_model": "sandbox-coach", "llm_user_model": "sandbox-user",
        "llm_judge_model": "sandbox-judge", "llm_timeout_seconds": 10.0})


@pytest.fixture
def epistemic_settings(settings, epistemic_sandbox, epistemic_key) -> Settings:
    return settings.model_copy(update={"epistemic_base_url": epistemic_sandbox.url,
                                       "epistemic_api_key": SecretStr(epistemic_key)})


@pytest.fixture
def queue(redis) -> ReliableQueue:
    return ReliableQueue(redis, heartbeat_seconds=HEARTBEAT_SECONDS,
                         backoff_base_seconds=BACKOFF_SECONDS)


@pytest.fixture
def sim_queue(profile_ctx) -> ReliableQueue:
    """The queue the profile app under test pushes to."""
    return ReliableQueue.from_settings(profile_ctx.redis, profile_ctx.settings)


@pytest.fixture
async def user_token_for(profile_ctx):
    async def make(user_id: uuid.UUID) -> str:
        token, _ = await make_token(profile_ctx.db, TokenKind.user, user_id)
        return token
    return make
