"""Self-models, belief systems and beliefs (SPEC §4.2)."""
from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, Response, status

from api.deps import CurrentPrincipal, Session
from api.envelope import Envelope
from api.schemas_common import Confidence, Model, Name, Request, Statement
from services import beliefs

router = APIRouter(tags=["self-model"])


class BeliefOut(Model):
    id: uuid.UUID
    belief_system_id: uuid.UUID
    context_uuid: uuid.UUID | None
    statement: str
    confidence: float
    belief_type: str | None
    external_id: str | None
    created_at: datetime
    updated_at: datetime


class BeliefSystemOut(Model):
    id: uuid.UUID
    self_model_id: uuid.UUID
    name: str
    beliefs: list[BeliefOut] = []


class SelfModelOut(Model):
    id: uuid.UUID
    user_id: uuid.UUID
    created_at: datetime
    belief_systems: list[BeliefSystemOut]


class UserRef(Request):
    user_id: uuid.UUID


class BeliefSystemIn(Request):
    user_id: uuid.UUID
    name: Name


class BeliefIn(Request):
    id: uuid.UUID | None = None
    belief_system_id: uuid.UUID | None = None
    user_id: uuid.UUID | None = None
    belief_system_name: Name | None = None
    statement: Statement
    confidence: Confidence
    context_uuid: uuid.UUID | None = None
    belief_type: Name | None = None


async def _tree(session, user_id: uuid.UUID) -> SelfModelOut:
    return SelfModelOut.model_validate(await beliefs.load_self_model_tree(session, user_id))


@router.post("/upsertSelfModel", operation_id="upsertSelfModel", response_model=Envelope[SelfModelOut],
             summary="Create the user's self-model (idempotent) with a `default` belief system")
async def upsert_self_model(body: UserRef, session: Session, principal: CurrentPrincipal):
    principal.ensure_user(body.user_id)
    await beliefs.ensure_self_model(session, body.user_id)
    return Envelope(data=await _tree(session, body.user_id))


@router.get("/getSelfModel", operation_id="getSelfModel", response_model=Envelope[SelfModelOut],
            summary="The self-model with its belief systems and beliefs")
async def get_self_model(user_id: uuid.UUID, session: Session, principal: CurrentPrincipal):
    principal.ensure_user(user_id)
    return Envelope(data=await _tree(session, user_id))


@router.post("/upsertBeliefSystem", operation_id="upsertBeliefSystem",
             response_model=Envelope[BeliefSystemOut], summary="Create a named belief system (idempotent)")
async def upsert_belief_system(body: BeliefSystemIn, session: Session, principal: CurrentPrincipal):
    principal.ensure_user(body.user_id)
    model = await beliefs.ensure_self_model(session, body.user_id)
    system = await beliefs.ensure_belief_system(session, model.id, body.name)
    return Envelope(data=BeliefSystemOut(id=system.id, self_model_id=system.self_model_id,
                                         name=system.name))


@router.post("/upsertBelief", operation_id="upsertBelief", response_model=Envelope[BeliefOut],
             responses={201: {"model": Envelope[BeliefOut], "description": "Created"}},
             summary="Update a belief by id (200), or create one in a belief system (201)")
async def upsert_belief(body: BeliefIn, response: Response, session: Session, principal: CurrentPrincipal):
    data = beliefs.BeliefInput(statement=body.statement, confidence=body.confidence,
                               belief_type=body.belief_type, context_uuid=body.context_uuid)
    if body.id is not None:
        belief = await beliefs.update_belief(session, principal, body.id, data)
    else:
        system = await beliefs.resolve_belief_system(
            session, principal, belief_system_id=body.belief_system_id, user_id=body.user_id,
            name=body.belief_system_name)
        belief = await beliefs.create_belief(session, system, data)
        response.status_code = status.HTTP_201_CREATED
    return Envelope(data=BeliefOut.model_validate(belief))


@router.delete("/deleteBelief", operation_id="deleteBelief", status_code=status.HTTP_204_NO_CONTENT,
               response_class=Response, summary="Delete a belief")
async def delete_belief(belief_id: uuid.UUID, session: Session, principal: CurrentPrincipal):
    await beliefs.delete_belief(session, principal, belief_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
