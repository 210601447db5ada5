"""Run Alembic migrations programmatically (start-up, CLI and tests share this)."""
from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(database_url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["database_url"] = database_url
    return cfg


def _run(fn, database_url: str, revision: str) -> None:
    fn(alembic_config(database_url), revision)


async def upgrade_head(database_url: str) -> None:
    await asyncio.to_thread(_run, command.upgrade, database_url, "head")


async def downgrade(database_url: str, revision: str = "base") -> None:
    await asyncio.to_thread(_run, command.downgrade, database_url, revision)


def upgrade_head_sync(database_url: str) -> None:
    _run(command.upgrade, database_url, "head")
