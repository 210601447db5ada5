"""One linear Alembic history that upgrades and downgrades on SQLite and PostgreSQL and
produces exactly the schema the models describe."""
from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from storage.migrate import alembic_config, downgrade, upgrade_head
from storage.models import Base


def test_history_is_linear():
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1
    assert len(script.get_bases()) == 1


async def _schema_diff(url: str) -> list:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata))
    finally:
        await engine.dispose()


async def _tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
    finally:
        await engine.dispose()


async def test_upgrade_matches_models_then_downgrade_and_upgrade_again(test_database):
    url = test_database.url
    assert await _schema_diff(url) == []
    assert {t.name for t in Base.metadata.sorted_tables} <= await _tables(url)
    await downgrade(url, "base")
    assert await _tables(url) <= {"alembic_version"}
    await upgrade_head(url)
    assert await _schema_diff(url) == []
