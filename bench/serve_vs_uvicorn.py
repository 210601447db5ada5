"""Authenticated, database-backed read (`GET /profile/getUser`) through Ray Serve vs the same
FastAPI app under bare uvicorn, on this machine, in one run.

    .venv/bin/python -m bench.serve_vs_uvicorn [--seconds 15] [--concurrency 32]

Uses the embedded defaults (SQLite file, an embedded redis-server) in a temporary directory,
or SMA_DATABASE_URL / SMA_REDIS_URL when set. Loopback only; bounded in time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.loadgen import run_load, summary
from core import cluster
from core.principal import TokenKind
from sandbox.server import free_port
from storage.db import Database
from storage.migrate import upgrade_head_sync
from storage.redis import EmbeddedRedis
from tests.support.actors import make_token, make_user


async def _seed(db_url: str) -> tuple[str, str]:
    db = Database(db_url)
    user_id = await make_user(db)
    token, _ = await make_token(db, TokenKind.user, user_id)
    await db.dispose()
    return str(user_id), token


def _wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sma-bench-"))
    redis_server = None
    env = {"SMA_DATA_DIR": str(tmp), "SMA_RATE_LIMIT_PER_MINUTE": "0"}
    env["SMA_DATABASE_URL"] = os.environ.get("SMA_DATABASE_URL") or f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    if os.environ.get("SMA_REDIS_URL"):
        env["SMA_REDIS_URL"] = os.environ["SMA_REDIS_URL"]
    else:
        redis_server = EmbeddedRedis(tmp / "redis", persist=False).start()
        env["SMA_REDIS_URL"] = redis_server.url
    os.environ.update(env)
    upgrade_head_sync(env["SMA_DATABASE_URL"])
    user_id, token = asyncio.run(_seed(env["SMA_DATABASE_URL"]))
    headers = {"Authorization": f"Bearer {token}"}
    results = {}

    port = free_port()
    uvicorn_proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "api.profile_app:build_profile_app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"],
        env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health")
        results["uvicorn"] = summary(asyncio.run(run_load(
            f"http://127.0.0.1:{port}/getUser?user_id={user_id}", headers=headers,
            concurrency=args.concurrency, seconds=args.seconds)))
    finally:
        uvicorn_proc.terminate()
        uvicorn_proc.wait(timeout=10)

    http_port = free_port()
    cluster.start_local_ray(gcs_port=None, dashboard_port=free_port(), include_dashboard=False,
                            object_store_mb=150, env=env)
    try:
        cluster.deploy(cluster.load_serve_config(http_port))
        url = f"http://127.0.0.1:{http_port}/profile/getUser?user_id={user_id}"
        _wait_http(f"http://127.0.0.1:{http_port}/profile/health")
        results["serve"] = summary(asyncio.run(run_load(
            url, headers=headers, concurrency=args.concurrency, seconds=args.seconds)))
    finally:
        import ray
        from ray import serve
        serve.shutdown()
        ray.shutdown()
        if redis_server:
            redis_server.stop()

    results["serve_over_uvicorn"] = round(results["serve"]["rps"] / results["uvicorn"]["rps"], 3)
    results["settings"] = {"seconds": args.seconds, "concurrency": args.concurrency,
                           "database": env["SMA_DATABASE_URL"].split(":")[0]}
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
