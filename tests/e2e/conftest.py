"""One real local Ray cluster with the Serve apps deployed from serve_config.yaml, per session."""
from __future__ import annotations

import os
import uuid
from contextlib import ExitStack

import httpx
import pytest

from core import cluster
from core.principal import TokenKind
from sandbox.server import free_port
from storage.db import Database
from tests.support.actors import make_token, make_user
from tests.support.databases import TestDatabase
from tests.support.dd import CREDENTIAL_KEY

# Two replicas per app so that MCP and HTTP calls cross replicas.
REPLICAS = {"ProfileAPI": {"num_replicas": 2}, "DontDieAPI": {"num_replicas": 2},
            "EpistemicAPI": {"num_replicas": 2}}
# Quick heartbeats, backoff and scale-down so the simulation tests stay short.
SIMULATION_ENV = {"SMA_SIM_HEARTBEAT_SECONDS": "3", "SMA_SIM_BACKOFF_BASE_SECONDS": "0.5",
                  "SMA_SIM_MIN_ACTORS": "1", "SMA_SIM_MAX_ACTORS": "3", "SMA_SIM_JOBS_PER_ACTOR": "2",
                  "SMA_SIM_SCALE_DOWN_SECONDS": "3", "SMA_SIM_ACTOR_NUM_CPUS": "0.1",
                  "SMA_LLM_COACH_MODEL": "sandbox-coach", "SMA_LLM_USER_MODEL": "sandbox-user",
                  "SMA_LLM_JUDGE_MODEL": "sandbox-judge", "SMA_LLM_TIMEOUT_SECONDS": "20"}


@pytest.fixture(scope="session")
async def serve_cluster(redis_url, tmp_path_factory):
    backend = "postgres" if os.environ.get("SMA_TEST_POSTGRES_URL") else "sqlite"
    database = TestDatabase(backend, tmp_path_factory.mktemp("e2e-db"))
    await database.create()
    data_dir = tmp_path_factory.mktemp("e2e-data")
    env = {"SMA_DATABASE_URL": database.url, "SMA_REDIS_URL": redis_url,
           "SMA_DATA_DIR": str(data_dir), "SMA_RATE_LIMIT_PER_MINUTE": "100000",
           "SMA_CREDENTIAL_KEY": os.environ.get("SMA_CREDENTIAL_KEY") or CREDENTIAL_KEY}
    env.update(_sandbox_env(stack := ExitStack()))
    env.update(SIMULATION_ENV)
    saved = {k: os.environ.get(k) for k in env}
    http_port, metrics_port = free_port(), free_port()
    cluster.start_local_ray(gcs_port=None, dashboard_port=free_port(), include_dashboard=False,
                            object_store_mb=100, env=env, metrics_port=metrics_port)
    try:
        cluster.deploy(cluster.load_serve_config(http_port, REPLICAS))
        yield {"base_url": f"http://127.0.0.1:{http_port}", "db": Database(database.url),
               "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics",
               "database": database, "env": env}
    finally:
        import ray
        from ray import serve
        serve.shutdown()
        ray.shutdown()
        stack.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        await database.drop()


def _sandbox_env(stack: ExitStack) -> dict[str, str]:
    """Sandbox upstreams for the e2e apps, when the sandbox modules are present."""
    from sandbox.server import BackgroundServer
    env: dict[str, str] = {}
    try:
        from sandbox.dontdie import create_app as dontdie_app
        env["SMA_DONTDIE_BASE_URL"] = stack.enter_context(BackgroundServer(dontdie_app())).url
    except ImportError:
        pass
    try:
        from sandbox.epistemic import create_app as epistemic_app
        key = str(uuid.uuid4())
        env["SMA_EPISTEMIC_BASE_URL"] = stack.enter_context(BackgroundServer(epistemic_app(api_keys=[key]))).url
        env["SMA_EPISTEMIC_API_KEY"] = key
    except ImportError:
        pass
    try:
        from sandbox.llm import create_app as llm_app
        env["SMA_LLM_BASE_URL"] = stack.enter_context(BackgroundServer(llm_app())).url + "/v1"
        env["SMA_LLM_API_KEY"] = "sandbox-key"
    except ImportError:
        pass
    return env


@pytest.fixture
async def e2e_user(serve_cluster):
    db = serve_cluster["db"]
    user_id = await make_user(db)
    token, _ = await make_token(db, TokenKind.user, user_id)
    async with httpx.AsyncClient(base_url=serve_cluster["base_url"], timeout=60,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        yield {"user_id": user_id, "token": token, "client": client}


@pytest.fixture
async def e2e_admin(serve_cluster):
    token, _ = await make_token(serve_cluster["db"], TokenKind.admin)
    async with httpx.AsyncClient(base_url=serve_cluster["base_url"], timeout=60,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        yield {"token": token, "client": client}
