"""Throwaway databases for a test session: a SQLite file always, PostgreSQL when configured."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from storage.db import Database
from storage.migrate import upgrade_head
from storage.models import Base

# Seeded by migrations; cleaning between tests must not remove them.
PRESERVED_TABLES = {"alembic_version", "protocoltemplate"}


def backends() -> list[str]:
    found = ["sqlite"]
    if os.environ.get("SMA_TEST_POSTGRES_URL"):
        found.append("postgres")
    return found


class TestDatabase:
    def __init__(self, backend: str, tmp_dir: Path):
        self.backend = backend
        self._admin_url = None
        if backend == "sqlite":
            self.url = f"sqlite+aiosqlite:///{tmp_dir / 'test.db'}"
        else:
            base = make_url(os.environ["SMA_TEST_POSTGRES_URL"])
            if base.drivername == "postgresql":
                base = base.set(drivername="postgresql+asyncpg")
            self._admin_url = base
            self.name = f"sma_test_{uuid.uuid4().hex[:12]}"
            self.url = base.set(database=self.name).render_as_string(hide_password=False)

    def _asyncpg_dsn(self, database: str) -> str:
        return self._admin_url.set(drivername="postgresql", database=database).render_as_string(
            hide_password=False)

    async def create(self) -> None:
        if self.backend == "postgres":
            conn = await asyncpg.connect(self._asyncpg_dsn(self._admin_url.database or "postgres"))
            try:
                await conn.execute(f'CREATE DATABASE "{self.name}"')
            finally:
                await conn.close()
        await upgrade_head(self.url)

    async def clean(self, db: Database) -> None:
        tables = [t for t in reversed(Base.metadata.sorted_tables) if t.name not in PRESERVED_TABLES]
        async with db.engine.begin() as conn:
            if self.backend == "postgres":
                names = ", ".join(f'"{t.name}"' for t in tables)
                await conn.execute(text(f"TRUNCATE {names} CASCADE"))
            else:
                for table in tables:
                    await conn.execute(table.delete())

    async def drop(self) -> None:
        if self.backend == "postgres":
            conn = await asyncpg.connect(self._asyncpg_dsn(self._admin_url.database or "postgres"))
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            finally:
                await conn.close()
