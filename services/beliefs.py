"""Self-models, belief systems and beliefs."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from core.errors import NotFound
from core.principal import Principal
from services.users import get_user
from storage.models import Belief, BeliefSystem, SelfModel
from storage.types import utcnow
from storage.upsert import insert_ignore

DEFAULT_SYSTEM = "default"


async def ensure_self_model(session: AsyncSession, user_id: uuid.UUID) -> SelfModel:
    await get_user(session, user_id)
    await insert_ignore(session, SelfModel, {"id": uuid.uuid4(), "user_id": user_id,
                                             "created_at": utcnow()}, ["user_id"])
    model = await session.scalar(select(SelfModel).where(SelfModel.user_id == user_id))
    await ensure_belief_system(session, model.id, DEFAULT_SYSTEM)
    return model


async def ensure_belief_system(session: AsyncSession, self_model_id: uuid.UUID, name: str) -> BeliefSystem:
    await insert_ignore(session, BeliefSystem,
                        {"id": uuid.uuid4(), "self_model_id": self_model_id, "name": name},
                        ["self_model_id", "name"])
    return await session.scalar(select(BeliefSystem).where(
        BeliefSystem.self_model_id == self_model_id, BeliefSystem.name == name))


async def load_self_model_tree(session: AsyncSession, user_id: uuid.UUID) -> SelfModel:
    model = await session.scalar(
        select(SelfModel).where(SelfModel.user_id == user_id)
        .options(selectinload(SelfModel.belief_systems).selectinload(BeliefSystem.beliefs))
        .execution_options(populate_existing=True))
    if model is None:
        raise NotFound("This user has no self-model yet", details={"user_id": str(user_id)})
    return model


async def belief_system_owner(session: AsyncSession, belief_system_id: uuid.UUID) -> tuple[BeliefSystem, uuid.UUID]:
    row = (await session.execute(
        select(BeliefSystem, SelfModel.user_id).join(SelfModel)
        .where(BeliefSystem.id == belief_system_id))).first()
    if row is None:
        raise NotFound("Unknown belief system")
    return row[0], row[1]


@dataclass
class BeliefInput:
    statement: str
    confidence: float
    belief_type: str | None = None
    context_uuid: uuid.UUID | None = None
    external_id: str | None = None


async def _belief_with_owner(session: AsyncSession, belief_id: uuid.UUID) -> tuple[Belief, uuid.UUID]:
    row = (await session.execute(
        select(Belief, SelfModel.user_id).join(BeliefSystem, Belief.belief_system_id == BeliefSystem.id)
        .join(SelfModel, BeliefSystem.self_model_id == SelfModel.id).where(Belief.id == belief_id))).first()
    if row is None:
        raise NotFound("Unknown belief")
    return row[0], row[1]


async def update_belief(session: AsyncSession, principal: Principal, belief_id: uuid.UUID,
                        data: BeliefInput) -> Belief:
    belief, owner = await _belief_with_owner(session, belief_id)
    principal.ensure_owner(owner, "belief")
    belief.statement = data.statement
    belief.confidence = data.confidence
    if data.belief_type is not None:
        belief.belief_type = data.belief_type
    if data.context_uuid is not None:
        belief.context_uuid = data.context_uuid
    await session.flush()
    return belief


async def create_belief(session: AsyncSession, system: BeliefSystem, data: BeliefInput) -> Belief:
    if data.external_id is not None:
        existing = await session.scalar(select(Belief).where(
            Belief.belief_system_id == system.id, Belief.external_id == data.external_id))
        if existing is not None:
            existing.statement, existing.confidence = data.statement, data.confidence
            existing.belief_type = data.belief_type or existing.belief_type
            await session.flush()
            return existing
    belief = Belief(belief_system_id=system.id, statement=data.statement, confidence=data.confidence,
                    belief_type=data.belief_type, context_uuid=data.context_uuid,
                    external_id=data.external_id)
    session.add(belief)
    await session.flush()
    return belief


async def resolve_belief_system(session: AsyncSession, principal: Principal, *,
                                belief_system_id: uuid.UUID | None, user_id: uuid.UUID | None,
                                name: str | None) -> BeliefSystem:
    if belief_system_id is not None:
        system, owner = await belief_system_owner(session, belief_system_id)
        principal.ensure_owner(owner, "belief system")
        return system
    owner = principal.default_user(user_id)
    model = await ensure_self_model(session, owner)
    return await ensure_belief_system(session, model.id, name or DEFAULT_SYSTEM)


async def delete_belief(session: AsyncSession, principal: Principal, belief_id: uuid.UUID) -> None:
    belief, owner = await _belief_with_owner(session, belief_id)
    principal.ensure_owner(owner, "belief")
    await session.delete(belief)
