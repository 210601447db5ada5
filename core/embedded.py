"""`sma run`: the whole system on embedded defaults, on one machine, with nothing installed.

SQLite file, a local redis-server, a local-directory object store, a local Ray cluster with
the three Serve apps, and clearly labelled sandbox upstreams for whatever is not configured.
"""
from __future__ import annotations

import asyncio
import logging
import os

import signal
import threading
import uuid
from contextlib import ExitStack
from pathlib import Path

from core.settings import Settings, get_settings

log = logging.getLogger("sma.run")


def _say(text: str) -> None:
    print(text, flush=True)


def _credential_key(data_dir: Path) -> str:
    from cryptography.fernet import Fernet

    path = data_dir / "credential.key"
    if not path.exists():
        path.write_bytes(Fernet.generate_key())
        path.chmod(0o600)
    return path.read_text().strip()


def _start_sandboxes(stack: ExitStack, env: dict[str, str]) -> list[str]:
    """Start a sandbox for each upstream that is not configured; returns their labels."""
    from sandbox.server import BackgroundServer

    started = []
    if "SMA_DONTDIE_BASE_URL" not in os.environ:
        from sandbox.dontdie import create_app as dontdie_sandbox
        server = stack.enter_context(BackgroundServer(dontdie_sandbox()))
        env["SMA_DONTDIE_BASE_URL"] = server.url
        started.append(f"Don't Die SANDBOX at {server.url} (link with any token starting 'sandbox-')")
    if "SMA_EPISTEMIC_BASE_URL" not in os.environ:
        from sandbox.epistemic import create_app as epistemic_sandbox
        key = os.environ.get("SMA_EPISTEMIC_API_KEY") or str(uuid.uuid4())
        server = stack.enter_context(BackgroundServer(epistemic_sandbox(api_keys=[key])))
        env["SMA_EPISTEMIC_BASE_URL"] = server.url
        env["SMA_EPISTEMIC_API_KEY"] = key
        started.append(f"Epistemic Me SANDBOX at {server.url}")
    if "SMA_LLM_BASE_URL" not in os.environ and os.environ.get("SMA_SANDBOX_LLM") == "1":
        from sandbox.llm import create_app as llm_sandbox
        server = stack.enter_context(BackgroundServer(llm_sandbox()))
        env["SMA_LLM_BASE_URL"] = server.url + "/v1"
        env["SMA_LLM_API_KEY"] = "sandbox-key"
        started.append(f"OpenAI-compatible LLM SANDBOX at {server.url}/v1")
    if started:
        env["SMA_SANDBOX"] = "1"
    return started


async def _first_admin_token(settings: Settings) -> str | None:
    from sqlalchemy import select

    from core.principal import TokenKind
    from services import tokens
    from storage.db import Database
    from storage.models import ApiToken

    db = Database(settings.resolved_database_url())
    try:
        async with db.transaction() as session:
            if await session.scalar(select(ApiToken.id).where(ApiToken.kind == "admin").limit(1)):
                return None
            issued = await tokens.issue_token(session, TokenKind.admin, name="local admin (sma run)")
            return issued.token
    finally:
        await db.dispose()


def run() -> int:
    from core import cluster
    from storage.migrate import upgrade_head_sync
    from storage.redis import EmbeddedRedis

    settings = get_settings()
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {"SMA_DATA_DIR": str(data_dir)}

    with ExitStack() as stack:
        if "SMA_REDIS_URL" not in os.environ:
            redis_server = EmbeddedRedis(data_dir / "redis").start()
            stack.callback(redis_server.stop)
            env["SMA_REDIS_URL"] = redis_server.url
        if not settings.credential_key.get_secret_value():
            env["SMA_CREDENTIAL_KEY"] = _credential_key(data_dir)
        sandboxes = _start_sandboxes(stack, env)
        os.environ.update(env)
        get_settings.cache_clear()
        settings = get_settings()

        upgrade_head_sync(settings.resolved_database_url())
        token = asyncio.run(_first_admin_token(settings))

        _say("Starting Ray and the Serve apps (this takes a little while)...")
        cluster.start_local_ray(gcs_port=settings.ray_gcs_port, dashboard_port=settings.ray_dashboard_port,
                                env=env, metrics_port=settings.ray_metrics_port)
        stack.callback(_shutdown_ray)
        cluster.deploy(cluster.load_serve_config(settings.http_port))

        base = f"http://{settings.http_host}:{settings.http_port}"
        _say("")
        _say("Self-Management Agent is running.")
        for app in ("profile", "dontdie", "epistemic"):
            _say(f"  {app:10s} API {base}/{app}   docs {base}/{app}/docs   MCP {base}/{app}/mcp")
        _say(f"  Ray dashboard  http://127.0.0.1:{settings.ray_dashboard_port}")
        _say(f"  Metrics        http://127.0.0.1:{settings.ray_metrics_port}/metrics (Prometheus)")
        _say(f"  Database       {settings.resolved_database_url()}")
        _say(f"  Redis          {settings.redis_url}")
        for line in sandboxes:
            _say(f"  {line}")
        if not settings.llm_configured:
            _say("  Simulations use the built-in scripted generator (no LLM configured).")
        if token:
            _say("")
            _say(f"  Local admin token (shown once, store it now): {token}")
        else:
            _say("  An admin token was printed on first start; make another with "
                 "`sma token create --kind admin`.")
        _say("Press Ctrl-C to stop.")
        _wait_for_signal()
        _say("Stopping...")
    return 0


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1):
        pass


def _shutdown_ray() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


