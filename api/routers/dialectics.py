"""Dialectics: stored question/answer sessions (SPEC §4.7)."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, status
from pydantic import ConfigDict, Field

from api.deps import CurrentPrincipal, Session
from api.envelope import Envelope, Page
from api.routers.conversations import Content, JSONObject
from api.schemas_common import Limit, Model, Name, Offset, Request, Statement
from services import dialectics

router = APIRouter(tags=["dialectics"])


class LearningObjective(Request):
    description: Statement
    topics: list[Name] = Field(default_factory=list, max_length=50)
    target_belief_type: Name | None = None
    completion_percentage: float = Field(0.0, ge=0.0, le=100.0, allow_inf_nan=False)


class StartDialecticIn(Request):
    user_id: uuid.UUID
    self_model_id: uuid.UUID | None = None
    learning_objective: LearningObjective | None = None
    conversation_id: uuid.UUID | None = None


class AppendDialecticTurnIn(Request):
    dialectic_id: uuid.UUID
    role: Literal["question", "answer", "system"]
    content: Content
    extra_json: JSONObject | None = None


class DialecticRef(Request):
    dialectic_id: uuid.UUID


class LearningObjectiveOut(Model):
    # Lenient: mirrored dialectics (Epistemic Me) may carry extra keys.
    model_config = ConfigDict(from_attributes=True, extra="allow")
    description: str | None = None
    topics: list[str] = []
    target_belief_type: str | None = None
    completion_percentage: float = 0.0


class DialecticOut(Model):
    dialectic_id: uuid.UUID
    user_id: uuid.UUID
    self_model_id: uuid.UUID | None
    learning_objective: LearningObjectiveOut | None
    started_at: datetime
    closed: bool
    conversation_id: uuid.UUID | None
    external_id: str | None


class DialecticSummaryOut(DialecticOut):
    interaction_count: int


class InteractionOut(Model):
    id: uuid.UUID
    dialectic_id: uuid.UUID
    seq: int
    role: str
    content: str
    extra_json: JSONObject | None
    created_at: datetime


class DialecticDetailOut(DialecticOut):
    interactions: list[InteractionOut]


def _dialectic(d) -> dict[str, Any]:
    return dict(dialectic_id=d.id, user_id=d.user_id, self_model_id=d.self_model_id,
                learning_objective=d.learning_objective, started_at=d.started_at, closed=d.closed,
                conversation_id=d.conversation_id, external_id=d.external_id)


@router.post("/startDialectic", operation_id="startDialectic", status_code=status.HTTP_201_CREATED,
             response_model=Envelope[DialecticOut], summary="Start a dialectic for a user")
async def start_dialectic(body: StartDialecticIn, session: Session, principal: CurrentPrincipal):
    principal.ensure_user(body.user_id)
    dialectic = await dialectics.start_dialectic(
        session, body.user_id, self_model_id=body.self_model_id,
        learning_objective=body.learning_objective.model_dump() if body.learning_objective else None,
        conversation_id=body.conversation_id)
    return Envelope(data=DialecticOut(**_dialectic(dialectic)))


@router.post("/appendDialecticTurn", operation_id="appendDialecticTurn",
             status_code=status.HTTP_201_CREATED, response_model=Envelope[InteractionOut],
             summary="Append a question, answer or system interaction (409 once closed)")
async def append_dialectic_turn(body: AppendDialecticTurnIn, session: Session, principal: CurrentPrincipal):
    dialectic = await dialectics.owned_dialectic(session, principal, body.dialectic_id)
    interaction = await dialectics.append_interaction(session, dialectic, body.role, body.content,
                                                      body.extra_json)
    return Envelope(data=InteractionOut.model_validate(interaction))


@router.post("/closeDialectic", operation_id="closeDialectic", response_model=Envelope[DialecticOut],
             summary="Close a dialectic (idempotent)")
async def close_dialectic(body: DialecticRef, session: Session, principal: CurrentPrincipal):
    dialectic = await dialectics.owned_dialectic(session, principal, body.dialectic_id)
    await dialectics.close_dialectic(session, dialectic)
    return Envelope(data=DialecticOut(**_dialectic(dialectic)))


@router.get("/getDialectic", operation_id="getDialectic", response_model=Envelope[DialecticDetailOut],
            summary="A dialectic with its interactions, oldest first")
async def get_dialectic(dialectic_id: uuid.UUID, session: Session, principal: CurrentPrincipal):
    dialectic = await dialectics.owned_dialectic(session, principal, dialectic_id)
    interactions = await dialectics.list_interactions(session, dialectic.id)
    return Envelope(data=DialecticDetailOut(
        **_dialectic(dialectic), interactions=[InteractionOut.model_validate(i) for i in interactions]))


@router.get("/listDialectics", operation_id="listDialectics",
            response_model=Envelope[Page[DialecticSummaryOut]],
            summary="Dialectics, newest first (service/admin may omit user_id to list all)")
async def list_dialectics(session: Session, principal: CurrentPrincipal, user_id: uuid.UUID | None = None,
                          closed: bool | None = None, limit: Limit = 50, offset: Offset = 0):
    owner = None if (user_id is None and principal.is_privileged) else principal.default_user(user_id)
    rows, total = await dialectics.list_dialectics(session, user_id=owner, closed=closed,
                                                   limit=limit, offset=offset)
    counts = await dialectics.interaction_counts(session, [d.id for d in rows])
    items = [DialecticSummaryOut(**_dialectic(d), interaction_count=counts.get(d.id, 0)) for d in rows]
    return Envelope(data=Page(items=items, total=total, limit=limit, offset=offset))
