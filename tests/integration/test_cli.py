"""The `sma` command-line tool: migrate and token create/list/revoke against a real database."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from api.profile_app import build_profile_app
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def sma(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


async def test_token_lifecycle_from_the_command_line(tmp_path, redis_url, redis):
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    env = {"SMA_DATABASE_URL": db_url, "SMA_REDIS_URL": redis_url, "SMA_DATA_DIR": str(tmp_path)}
    migrated = sma("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr

    created = sma("token", "create", "--kind", "service", "--name", "ui-backend", env=env)
    assert created.returncode == 0, created.stderr
    issued = json.loads(created.stdout)
    assert issued["token"].startswith("sma_") and issued["kind"] == "service"

    listed = sma("token", "list", env=env)
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["id"] for r in rows] == [issued["id"]]
    assert issued["token"] not in listed.stdout

    app = build_profile_app(Settings(database_url=db_url, redis_url=redis_url, data_dir=tmp_path))
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {issued['token']}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers) as client:
        assert (await client.get("/listUsers")).status_code == 200
        revoked = sma("token", "revoke", issued["id"], env=env)
        assert revoked.returncode == 0, revoked.stderr
        assert (await client.get("/listUsers")).status_code == 401
    await app.state.ctx.aclose()

    bad = sma("token", "create", "--kind", "user", env=env)
    assert bad.returncode != 0
