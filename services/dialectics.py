"""Dialectics: stored question/answer sessions (SPEC §4.7).

Principal-free so the Epistemic Me mirroring can call them (`start_dialectic(...,
external_id=...)`, `find_by_external_id`, `append_interaction`); `owned_dialectic` is the
helper routers use to apply a caller's ownership (a foreign dialectic is a 404).
"""
from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import Conflict, NotFound, ValidationFailed
from core.principal import Principal
from services.users import get_user
from storage.models import Conversation, Dialectic, DialecticInteraction, SelfModel

INTERACTION_ROLES = ("question", "answer", "system")
MAX_CONTENT_CHARS = 32_000


async def find_by_external_id(session: AsyncSession, user_id: uuid.UUID,
                              external_id: str) -> Dialectic | None:
    return await session.scalar(select(Dialectic).where(Dialectic.user_id == user_id,
                                                        Dialectic.external_id == external_id))


async def start_dialectic(session: AsyncSession, user_id: uuid.UUID, *,
                          self_model_id: uuid.UUID | None = None,
                          learning_objective: dict[str, Any] | None = None,
                          conversation_id: uuid.UUID | None = None,
                          external_id: str | None = None) -> Dialectic:
    """Unknown user → 404; a self-model or conversation that is not this user's → 404.
    Without `self_model_id` the user's self-model is linked when there is one. With an
    `external_id` already stored for this user, that dialectic is returned (idempotent)."""
    await get_user(session, user_id)
    if external_id is not None:
        existing = await find_by_external_id(session, user_id, external_id)
        if existing is not None:
            return existing
    if self_model_id is not None:
        owner = await session.scalar(select(SelfModel.user_id).where(SelfModel.id == self_model_id))
        if owner != user_id:
            raise NotFound("Unknown self-model for this user", details={"self_model_id": str(self_model_id)})
    else:
        self_model_id = await session.scalar(select(SelfModel.id).where(SelfModel.user_id == user_id))
    if conversation_id is not None:
        owner = await session.scalar(select(Conversation.user_id).where(Conversation.id == conversation_id))
        if owner != user_id:
            raise NotFound("Unknown conversation for this user",
                           details={"conversation_id": str(conversation_id)})
    dialectic = Dialectic(user_id=user_id, self_model_id=self_model_id,
                          learning_objective=learning_objective, conversation_id=conversation_id,
                          external_id=external_id, closed=False)
    session.add(dialectic)
    try:
        async with session.begin_nested():
            await session.flush()
    except IntegrityError:
        # A concurrent mirror of the same external dialectic won the unique key.
        session.expunge(dialectic)
        existing = await find_by_external_id(session, user_id, external_id) if external_id else None
        if existing is None:
            raise
        return existing
    return dialectic


async def get_dialectic(session: AsyncSession, dialectic_id: uuid.UUID) -> Dialectic:
    dialectic = await session.get(Dialectic, dialectic_id)
    if dialectic is None:
        raise NotFound("Unknown dialectic", details={"dialectic_id": str(dialectic_id)})
    return dialectic


async def owned_dialectic(session: AsyncSession, principal: Principal, dialectic_id: uuid.UUID) -> Dialectic:
    """The dialectic if the caller may see it; a foreign one looks unknown (404)."""
    try:
        dialectic = await get_dialectic(session, dialectic_id)
    except NotFound:
        raise NotFound("Unknown dialectic") from None
    principal.ensure_owner(dialectic.user_id, "dialectic")
    return dialectic


async def _lock(session: AsyncSession, dialectic: Dialectic) -> Dialectic:
    """Serialise writers of one dialectic (row lock on PostgreSQL, write lock on SQLite)."""
    await session.execute(update(Dialectic).where(Dialectic.id == dialectic.id)
                          .values(closed=Dialectic.closed))
    await session.refresh(dialectic, ["closed"])
    return dialectic


async def append_interaction(session: AsyncSession, dialectic: Dialectic, role: str, content: str,
                             extra_json: dict[str, Any] | None = None) -> DialecticInteraction:
    """Appends with the next `seq`; a closed dialectic → 409."""
    if role not in INTERACTION_ROLES:
        raise ValidationFailed(f"Unknown role {role!r}", details=[
            {"loc": ["role"], "msg": f"must be one of {list(INTERACTION_ROLES)}"}])
    if not content or not content.strip() or len(content) > MAX_CONTENT_CHARS:
        raise ValidationFailed("Content must be 1..32000 characters and not blank",
                               details=[{"loc": ["content"], "msg": "invalid length or blank"}])
    await _lock(session, dialectic)
    if dialectic.closed:
        raise Conflict("The dialectic is closed", code="dialectic_closed",
                       details={"dialectic_id": str(dialectic.id)})
    last = await session.scalar(select(func.max(DialecticInteraction.seq))
                                .where(DialecticInteraction.dialectic_id == dialectic.id))
    interaction = DialecticInteraction(dialectic_id=dialectic.id, seq=(last or 0) + 1, role=role,
                                       content=content, extra_json=extra_json)
    session.add(interaction)
    await session.flush()
    return interaction


async def close_dialectic(session: AsyncSession, dialectic: Dialectic) -> Dialectic:
    """Idempotent."""
    await _lock(session, dialectic)
    dialectic.closed = True
    await session.flush()
    return dialectic


async def list_interactions(session: AsyncSession, dialectic_id: uuid.UUID) -> list[DialecticInteraction]:
    """Oldest first; `seq` is authoritative."""
    rows = await session.scalars(select(DialecticInteraction)
                                 .where(DialecticInteraction.dialectic_id == dialectic_id)
                                 .order_by(DialecticInteraction.seq, DialecticInteraction.created_at,
                                           DialecticInteraction.id))
    return list(rows)


async def list_dialectics(session: AsyncSession, *, user_id: uuid.UUID | None, limit: int = 50,
                          offset: int = 0, closed: bool | None = None) -> tuple[list[Dialectic], int]:
    """Newest first; `user_id=None` lists every user's dialectics."""
    conditions = []
    if user_id is not None:
        conditions.append(Dialectic.user_id == user_id)
    if closed is not None:
        conditions.append(Dialectic.closed == closed)
    total = await session.scalar(select(func.count()).select_from(Dialectic).where(*conditions))
    rows = await session.scalars(select(Dialectic).where(*conditions)
                                 .order_by(Dialectic.started_at.desc(), Dialectic.id.desc())
                                 .limit(limit).offset(offset))
    return list(rows), total or 0


async def interaction_counts(session: AsyncSession, dialectic_ids: list[uuid.UUID]) -> dict[uuid.UUID, int]:
    if not dialectic_ids:
        return {}
    rows = await session.execute(select(DialecticInteraction.dialectic_id, func.count())
                                 .where(DialecticInteraction.dialectic_id.in_(dialectic_ids))
                                 .group_by(DialecticInteraction.dialectic_id))
    return {did: count for did, count in rows}
