"""Race-free inserts keyed on a unique constraint, for SQLite and PostgreSQL alike."""
from __future__ import annotations

from typing import Any

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession


def dialect_insert(session: AsyncSession, model):
    insert = pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert
    return insert(model)


async def insert_ignore(session: AsyncSession, model, values: dict[str, Any] | list[dict[str, Any]],
                        keys: list[str]) -> None:
    """INSERT ... ON CONFLICT (keys) DO NOTHING: concurrent writers never collide."""
    stmt = dialect_insert(session, model).values(values)
    await session.execute(stmt.on_conflict_do_nothing(index_elements=keys))


async def upsert(session: AsyncSession, model, values: dict[str, Any], keys: list[str],
                 update: list[str]) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE SET the `update` columns from the new row."""
    stmt = dialect_insert(session, model).values(values)
    stmt = stmt.on_conflict_do_update(index_elements=keys,
                                      set_={col: stmt.excluded[col] for col in update})
    await session.execute(stmt)
