"""Shared set-up of the Don't Die benchmarks: everything local, on loopback, in a temp dir.

A SQLite file (or SMA_DATABASE_URL), an embedded redis-server (or SMA_REDIS_URL), the Don't
Die sandbox in its own uvicorn process, a fresh credential key, and optionally a local Ray
cluster with the profile and dontdie Serve apps.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import httpx
from cryptography.fernet import Fernet

from core import cluster
from core.principal import TokenKind
from sandbox.server import free_port
from storage.db import Database
from storage.migrate import upgrade_head_sync
from storage.redis import EmbeddedRedis
from tests.support.actors import make_token, make_user


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


class Sandbox:
    """The Don't Die sandbox in a separate process, so it never competes with the driver."""

    def __init__(self, stack: ExitStack):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "sandbox.dontdie:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
             "--no-access-log"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(lambda: (proc.terminate(), proc.wait(timeout=10)))
        wait_http(f"{self.url}/_sandbox/requests")

    def latency(self, ms: int, prefix: str = "/") -> None:
        httpx.post(f"{self.url}/_sandbox/faults", json={"path_prefix": prefix, "latency_ms": ms}).raise_for_status()

    def clear_requests(self) -> None:
        httpx.delete(f"{self.url}/_sandbox/requests").raise_for_status()

    def requests(self, contains: str = "") -> list[str]:
        return [r for r in httpx.get(f"{self.url}/_sandbox/requests").json()["requests"] if contains in r]


class Environment:
    """Database, Redis, sandbox and SMA_* settings for one benchmark run."""

    def __init__(self, stack: ExitStack):
        self.tmp = Path(tempfile.mkdtemp(prefix="sma-dd-bench-"))
        self.sandbox = Sandbox(stack)
        env = {"SMA_DATA_DIR": str(self.tmp), "SMA_RATE_LIMIT_PER_MINUTE": "0",
               "SMA_DONTDIE_BASE_URL": self.sandbox.url,
               "SMA_CREDENTIAL_KEY": Fernet.generate_key().decode(), "SMA_LOG_LEVEL": "WARNING"}
        env["SMA_DATABASE_URL"] = (os.environ.get("SMA_DATABASE_URL")
                                   or f"sqlite+aiosqlite:///{self.tmp / 'bench.db'}")
        if os.environ.get("SMA_REDIS_URL"):
            env["SMA_REDIS_URL"] = os.environ["SMA_REDIS_URL"]
        else:
            redis_server = EmbeddedRedis(self.tmp / "redis", persist=False).start()
            stack.callback(redis_server.stop)
            env["SMA_REDIS_URL"] = redis_server.url
        os.environ.update(env)
        from core.settings import get_settings
        get_settings.cache_clear()
        self.env = env
        upgrade_head_sync(env["SMA_DATABASE_URL"])

    @property
    def database_kind(self) -> str:
        return self.env["SMA_DATABASE_URL"].split(":")[0]

    def user_with_token(self) -> tuple[str, str]:
        async def seed() -> tuple[str, str]:
            db = Database(self.env["SMA_DATABASE_URL"])
            try:
                user_id = await make_user(db)
                token, _ = await make_token(db, TokenKind.user, user_id)
                return str(user_id), token
            finally:
                await db.dispose()
        return asyncio.run(seed())

    def start_ray(self, stack: ExitStack) -> None:
        cluster.start_local_ray(gcs_port=None, dashboard_port=free_port(), include_dashboard=False,
                                object_store_mb=100, env=self.env)
        stack.callback(_shutdown_ray)

    def deploy(self, apps: tuple[str, ...], replicas: dict[str, int]) -> str:
        """Deploy some of serve_config.yaml's apps; returns the proxy's base URL."""
        http_port = free_port()
        overrides = {name: {"num_replicas": n} for name, n in replicas.items()}
        config = cluster.load_serve_config(http_port, overrides)
        config["applications"] = [a for a in config["applications"] if a["name"] in apps]
        cluster.deploy(config)
        base = f"http://127.0.0.1:{http_port}"
        for app in apps:
            wait_http(f"{base}/{app}/health")
        return base


def link_and_sync(base: str, user_id: str, token: str, dd_token: str) -> dict:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        client.post("/profile/dd-data/link", json={
            "user_id": user_id, "dd_token": dd_token, "dd_client_id": "bench"}).raise_for_status()
        response = client.post(f"/profile/dd-data/sync/{user_id}")
        response.raise_for_status()
        return response.json()["data"]


def _shutdown_ray() -> None:
    import ray
    from ray import serve
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def start_sandbox(stack: ExitStack, factory: str, env: dict[str, str] | None = None) -> str:
    """Any sandbox app (`module:create_app`) in its own uvicorn process; returns its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", factory, "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-access-log"],
        env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(lambda: (proc.terminate(), proc.wait(timeout=10)))
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/_sandbox/faults")
    return url


def fresh_postgres(stack: ExitStack, admin_url: str) -> str:
    """A new, migrated PostgreSQL database for one run, dropped at the end; its asyncpg URL.
    `admin_url` is any database on the server (e.g. postgresql://postgres@127.0.0.1:5432/postgres)."""
    import asyncpg
    from sqlalchemy.engine import make_url

    admin = make_url(admin_url).set(drivername="postgresql")
    name = f"sma_bench_{uuid.uuid4().hex[:12]}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(admin.render_as_string(hide_password=False))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(execute(f'CREATE DATABASE "{name}"'))
    stack.callback(lambda: asyncio.run(execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')))
    url = admin.set(drivername="postgresql+asyncpg", database=name).render_as_string(hide_password=False)
    upgrade_head_sync(url)
    return url
