"""Users: creation, lookup, listing, export and deletion."""
from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import Conflict, NotFound
from storage.models import User


async def get_user(session: AsyncSession, user_id: uuid.UUID) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise NotFound("Unknown user", details={"user_id": str(user_id)})
    return user


async def create_user(session: AsyncSession, *, user_id: uuid.UUID | None = None,
                      dontdie_uid: str | None = None) -> User:
    if user_id is not None and await session.get(User, user_id) is not None:
        raise Conflict("A user with this id already exists", details={"user_id": str(user_id)})
    if dontdie_uid is not None:
        existing = await session.scalar(select(User).where(User.dontdie_uid == dontdie_uid))
        if existing is not None:
            raise Conflict("dontdie_uid is already linked to another user",
                           details={"existing_user_id": str(existing.id)})
    user = User(id=user_id or uuid.uuid4(), dontdie_uid=dontdie_uid)
    session.add(user)
    try:
        async with session.begin_nested():
            await session.flush()
    except IntegrityError as exc:
        raise Conflict("User already exists (concurrent create)") from exc
    return user


async def list_users(session: AsyncSession, *, limit: int, offset: int) -> tuple[list[User], int]:
    total = await session.scalar(select(func.count()).select_from(User))
    rows = await session.scalars(select(User).order_by(User.created_at.desc(), User.id)
                                 .limit(limit).offset(offset))
    return list(rows), total or 0
