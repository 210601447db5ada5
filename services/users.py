"""Users: creation, lookup, listing, export and deletion."""
from __future__ import annotations

import uuid
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import delete, func, inspect, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from core.errors import Conflict, NotFound
from services import tokens
from storage.models import (ApiToken, BeliefSystem, ChecklistItem, Conversation, DDCredential,
                            DDSyncLog, DDUserData, Dialectic, Measurement, SelfModel,
                            SimulationJob, User, UserFile)
from storage.objects import ObjectStore, user_prefix
from storage.types import utcnow

# Redis keys holding cached data of one user; every per-user cache must live under one of
# these so that deleting the user can find it ({user_id} is filled in).
USER_CACHE_PATTERNS = ("sma:trend:{user_id}:*", "sma:dd:{user_id}:*")
EXPORT_FORMAT_VERSION = 1


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


# ----------------------------------------------------------------------------- deletion

async def purge_user_cache(redis: Redis, user_id: uuid.UUID, token_hashes: list[str]) -> int:
    """Drop the user's cached data and their tokens' cached principals; returns keys removed."""
    removed = 0
    for pattern in USER_CACHE_PATTERNS:
        batch: list[str] = []
        async for key in redis.scan_iter(match=pattern.format(user_id=user_id), count=500):
            batch.append(key)
            if len(batch) >= 500:
                removed += await redis.delete(*batch)
                batch = []
        if batch:
            removed += await redis.delete(*batch)
    await tokens.evict(redis, token_hashes)
    return removed


async def delete_user(session: AsyncSession, objects: ObjectStore, redis: Redis,
                      user_id: uuid.UUID) -> None:
    """Delete the user and everything of theirs: rows (foreign keys cascade), stored objects,
    cached data and cached token principals. Commits the session.

    Order: caches are evicted first (a Redis outage stops the deletion before anything is
    gone); the rows are deleted but not yet committed; then the objects, so an object store
    failure rolls the rows back and the call can simply be retried; then the commit; then the
    caches once more, so nothing re-cached from the old rows in between survives.
    """
    await get_user(session, user_id)
    token_hashes = list(await session.scalars(
        select(ApiToken.token_hash).where(ApiToken.user_id == user_id)))
    await purge_user_cache(redis, user_id, token_hashes)
    await session.execute(delete(User).where(User.id == user_id))
    await objects.delete_prefix(user_prefix(user_id))
    await session.commit()
    await purge_user_cache(redis, user_id, token_hashes)


# ------------------------------------------------------------------------------- export

def _row(obj, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    return {attr.key: getattr(obj, attr.key) for attr in inspect(obj).mapper.column_attrs
            if attr.key not in exclude}


async def export_user_data(session: AsyncSession, user_id: uuid.UUID) -> dict[str, Any]:
    """Everything stored about one user, as one JSON-ready document (oldest first)."""
    user = await get_user(session, user_id)

    async def rows(model, *order, options=()) -> list:
        stmt = select(model).where(model.user_id == user_id).order_by(*order, model.id)
        return list(await session.scalars(stmt.options(*options)))

    self_model = await session.scalar(
        select(SelfModel).where(SelfModel.user_id == user_id)
        .options(selectinload(SelfModel.belief_systems).selectinload(BeliefSystem.beliefs)))
    model_doc = None
    if self_model is not None:
        model_doc = {**_row(self_model), "belief_systems": [
            {**_row(system), "beliefs": [_row(b) for b in system.beliefs]}
            for system in self_model.belief_systems]}

    conversations = await rows(Conversation, Conversation.started_at,
                               options=[selectinload(Conversation.turns)])
    dialectics = await rows(Dialectic, Dialectic.started_at,
                            options=[selectinload(Dialectic.interactions)])
    dd_data = await session.scalar(select(DDUserData).where(DDUserData.user_id == user_id))
    credential = await session.scalar(select(DDCredential).where(DDCredential.user_id == user_id))
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "exported_at": utcnow(),
        "user": _row(user),
        "self_model": model_doc,
        "measurements": [_row(m) for m in await rows(Measurement, Measurement.captured_at)],
        "files": [_row(f, exclude=("s3_key",)) for f in await rows(UserFile, UserFile.uploaded_at)],
        "checklist_items": [_row(c) for c in await rows(ChecklistItem, ChecklistItem.bucket_code)],
        "conversations": [{**_row(c), "turns": [_row(t) for t in c.turns]} for c in conversations],
        "dialectics": [{**_row(d), "interactions": [_row(i) for i in d.interactions]}
                       for d in dialectics],
        "simulation_jobs": [_row(j) for j in await rows(SimulationJob, SimulationJob.created_at)],
        "dd_user_data": _row(dd_data) if dd_data is not None else None,
        "dd_sync_log": [_row(e) for e in await rows(DDSyncLog, DDSyncLog.created_at)],
        # The Don't Die link without the encrypted token; API tokens without their hashes.
        "dd_credential": (_row(credential, exclude=("token_ciphertext",))
                          if credential is not None else None),
        "api_tokens": [_row(t, exclude=("token_hash",))
                       for t in await rows(ApiToken, ApiToken.created_at)],
    }
