"""Conversations and their turns (SPEC §4.6).

Service functions are principal-free so actors and jobs can call them; `owned_conversation`
is the helper routers use to apply a caller's ownership (a foreign conversation is a 404).
"""
from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import Conflict, NotFound, ValidationFailed
from core.principal import Principal
from services import checklist
from services.users import get_user
from storage.models import Conversation, Turn

TURN_ROLES = ("user", "assistant", "system")
MAX_TURN_CHARS = 32_000


async def start_conversation(session: AsyncSession, user_id: uuid.UUID,
                             meta: dict[str, Any] | None = None) -> Conversation:
    """Unknown user → 404. A user's first conversation creates the onboarding checklist."""
    await get_user(session, user_id)
    has_any = await session.scalar(select(Conversation.id).where(Conversation.user_id == user_id).limit(1))
    conversation = Conversation(user_id=user_id, meta=meta, closed=False)
    session.add(conversation)
    await session.flush()
    if has_any is None:
        await checklist.ensure_items(session, user_id)
    return conversation


async def get_conversation(session: AsyncSession, conversation_id: uuid.UUID) -> Conversation:
    conversation = await session.get(Conversation, conversation_id)
    if conversation is None:
        raise NotFound("Unknown conversation", details={"conversation_id": str(conversation_id)})
    return conversation


async def owned_conversation(session: AsyncSession, principal: Principal,
                             conversation_id: uuid.UUID) -> Conversation:
    """The conversation if the caller may see it; a foreign one looks unknown (404)."""
    try:
        conversation = await get_conversation(session, conversation_id)
    except NotFound:
        raise NotFound("Unknown conversation") from None
    principal.ensure_owner(conversation.user_id, "conversation")
    return conversation


async def _lock(session: AsyncSession, conversation: Conversation) -> Conversation:
    """Serialise writers of one conversation: a no-op UPDATE takes the row lock on PostgreSQL
    and the write lock on SQLite, so `closed` and the next `seq` are read race-free."""
    await session.execute(update(Conversation).where(Conversation.id == conversation.id)
                          .values(closed=Conversation.closed))
    await session.refresh(conversation, ["closed"])
    return conversation


async def append_turn(session: AsyncSession, conversation: Conversation, role: str, content: str,
                      extra_json: dict[str, Any] | None = None, *,
                      close_conversation: bool = False) -> Turn:
    """Appends a turn with the next `seq`; a closed conversation → 409."""
    if role not in TURN_ROLES:
        raise ValidationFailed(f"Unknown role {role!r}",
                               details=[{"loc": ["role"], "msg": f"must be one of {list(TURN_ROLES)}"}])
    if not content or not content.strip() or len(content) > MAX_TURN_CHARS:
        raise ValidationFailed("Turn content must be 1..32000 characters and not blank",
                               details=[{"loc": ["content"], "msg": "invalid length or blank"}])
    await _lock(session, conversation)
    if conversation.closed:
        raise Conflict("The conversation is closed", code="conversation_closed",
                       details={"conversation_id": str(conversation.id)})
    last = await session.scalar(select(func.max(Turn.seq)).where(Turn.conversation_id == conversation.id))
    turn = Turn(conversation_id=conversation.id, seq=(last or 0) + 1, role=role, content=content,
                extra_json=extra_json)
    session.add(turn)
    if close_conversation:
        conversation.closed = True
    await session.flush()
    return turn


async def close_conversation(session: AsyncSession, conversation: Conversation) -> Conversation:
    """Idempotent: closing a closed conversation leaves it closed."""
    await _lock(session, conversation)
    conversation.closed = True
    await session.flush()
    return conversation


async def list_turns(session: AsyncSession, conversation_id: uuid.UUID) -> list[Turn]:
    """Oldest first; `seq` is authoritative, so equal timestamps keep their order."""
    rows = await session.scalars(select(Turn).where(Turn.conversation_id == conversation_id)
                                 .order_by(Turn.seq, Turn.created_at, Turn.id))
    return list(rows)


async def list_conversations(session: AsyncSession, *, user_id: uuid.UUID | None, limit: int = 50,
                             offset: int = 0, closed: bool | None = None
                             ) -> tuple[list[Conversation], int]:
    """Newest first; `user_id=None` lists every user's conversations."""
    conditions = []
    if user_id is not None:
        conditions.append(Conversation.user_id == user_id)
    if closed is not None:
        conditions.append(Conversation.closed == closed)
    total = await session.scalar(select(func.count()).select_from(Conversation).where(*conditions))
    rows = await session.scalars(select(Conversation).where(*conditions)
                                 .order_by(Conversation.started_at.desc(), Conversation.id.desc())
                                 .limit(limit).offset(offset))
    return list(rows), total or 0


async def turn_counts(session: AsyncSession, conversation_ids: list[uuid.UUID]) -> dict[uuid.UUID, int]:
    if not conversation_ids:
        return {}
    rows = await session.execute(select(Turn.conversation_id, func.count())
                                 .where(Turn.conversation_id.in_(conversation_ids))
                                 .group_by(Turn.conversation_id))
    return {cid: count for cid, count in rows}
