"""The Epistemic Me proxy routes (SPEC §6).

Paths keep the spec's names; operation ids (= MCP tool names) carry an `em` prefix so they
stay unique next to the profile app's tools (`getSelfModel`, `deleteBelief`, ...).
The self-model id upstream is the profile user id. Responses are our snake_case shapes, not
the platform's camelCase ones.
"""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Response, status
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, StringConstraints, model_validator

from api.context import AppContext
from api.deps import CurrentPrincipal, Ctx, Session
from api.envelope import Envelope, ErrorEnvelope, Page
from api.routers.beliefs import BeliefOut
from api.schemas_common import Confidence, Limit, Name, Offset, Request, Statement, TurnContent
from clients import epistemic as em
from core.errors import NotSupported
from services import epistemic as service
from services.epistemic_mirror import (EM_SYSTEM, belief_summary, enum_name,
                                       learning_objective_dict, millis_to_datetime)

EXTRAS_KEY = "epistemic_client"

router = APIRouter(tags=["epistemic"], responses={
    code: {"model": ErrorEnvelope, "description": text} for code, text in {
        501: "The platform cannot do this",
        502: "Epistemic Me failed or rejected the configured API key",
        503: "Epistemic Me is unreachable or not configured",
        504: "Epistemic Me did not answer in time",
    }.items()})


def epistemic_client(ctx: AppContext) -> em.EpistemicClient:
    """One client per app context, created on first use and closed by `AppContext.aclose`."""
    client = ctx.extras.get(EXTRAS_KEY)
    if client is None:
        client = ctx.extras[EXTRAS_KEY] = em.EpistemicClient.from_settings(ctx.settings)
    return client


async def _client(ctx: Ctx) -> em.EpistemicClient:
    return epistemic_client(ctx)


EMClient = Annotated[em.EpistemicClient, Depends(_client)]


# --- request schemas ---------------------------------------------------------------------

def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _reject_nul(value: Any, path: str) -> None:
    if isinstance(value, str) and "\x00" in value:
        raise ValueError(f"{path} must not contain NUL characters")
    if isinstance(value, (list, tuple)):
        for item in value:
            _reject_nul(item, path)
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _reject_nul(getattr(value, name), f"{path}.{name}" if path else name)


class EMRequest(Request):
    """Text sent upstream is mirrored into the database, which cannot store NUL."""

    @model_validator(mode="after")
    def _no_nul(self):
        _reject_nul(self, "")
        return self


BeliefTypeName = Annotated[Literal["STATEMENT", "FALSIFIABLE", "CAUSAL"], BeforeValidator(_upper)]
DialecticTypeName = Annotated[Literal["DEFAULT", "HEGELIAN", "SLEEP_DIET_EXERCISE"],
                              BeforeValidator(_upper)]
ExternalId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Answer = Annotated[TurnContent, AfterValidator(_not_blank)]
Description = Annotated[str, StringConstraints(strip_whitespace=True, max_length=2000)]


class CreateSelfModelIn(EMRequest):
    user_id: uuid.UUID
    philosophies: list[Name] = Field(default_factory=list, max_length=50)


class UserIn(EMRequest):
    user_id: uuid.UUID


class UpdateBeliefIn(EMRequest):
    user_id: uuid.UUID
    statement: Statement
    confidence: Confidence | None = Field(
        None, description="0..1, kept on the mirrored profile belief (default 0.5)")
    belief_type: BeliefTypeName = "STATEMENT"


class LearningObjectiveIn(EMRequest):
    description: Description = ""
    topics: list[Name] = Field(default_factory=list, max_length=20)
    target_belief_type: BeliefTypeName | None = None
    completion_percentage: float = Field(0.0, ge=0, le=100, allow_inf_nan=False)


class CreateDialecticIn(EMRequest):
    user_id: uuid.UUID
    dialectic_type: DialecticTypeName = "DEFAULT"
    learning_objective: LearningObjectiveIn | None = None


class UpdateDialecticIn(EMRequest):
    dialectic_id: ExternalId = Field(description="The Epistemic Me dialectic id")
    user_id: uuid.UUID
    answer: Answer
    dry_run: bool = False


# --- response schemas --------------------------------------------------------------------

class EMBeliefOut(BaseModel):
    id: str
    belief_type: str | None
    statement: str
    version: int


class EMBeliefSystemOut(BaseModel):
    self_model_id: str
    belief_count: int
    beliefs: list[EMBeliefOut]


class LearningObjectiveOut(BaseModel):
    description: str
    topics: list[str]
    target_belief_type: str | None
    completion_percentage: float


class EMInteractionOut(BaseModel):
    id: str
    status: str | None
    type: str | None
    question: str | None
    answer: str | None
    extracted_beliefs: list[EMBeliefOut]
    asked_at: datetime | None
    answered_at: datetime | None
    updated_at: datetime | None


class EMDialecticOut(BaseModel):
    id: str
    self_model_id: str
    dialectic_type: str | None
    agent_type: str | None
    learning_objective: LearningObjectiveOut | None
    interactions: list[EMInteractionOut] = Field(description="Oldest first")
    pending_question: str | None
    answered_count: int
    profile_dialectic_id: uuid.UUID | None = Field(
        None, description="The mirrored profile dialectic, if there is one")


class EMSelfModelOut(BaseModel):
    id: str
    user_id: uuid.UUID
    philosophies: list[str]
    belief_system: EMBeliefSystemOut
    dialectics: list[EMDialecticOut]


class CreateSelfModelOut(EMSelfModelOut):
    created: bool = Field(description="False when the self-model already existed upstream")
    profile_self_model_id: uuid.UUID


class UpdateBeliefOut(BaseModel):
    belief: EMBeliefOut
    profile_belief: BeliefOut


class BeliefSyncCounts(BaseModel):
    seen: int
    created: int
    updated: int
    unchanged: int
    skipped: int


class DialecticSyncCounts(BaseModel):
    seen: int
    created: int
    updated: int
    interactions_created: int


class SyncOut(BaseModel):
    user_id: uuid.UUID
    profile_self_model_id: uuid.UUID
    belief_system_id: uuid.UUID
    belief_system_name: str = EM_SYSTEM
    beliefs: BeliefSyncCounts
    dialectics: DialecticSyncCounts


# --- conversions -------------------------------------------------------------------------

def _belief(belief: em.Belief) -> EMBeliefOut:
    return EMBeliefOut(**belief_summary(belief))


def _belief_system(self_model_id: str, system: em.BeliefSystem) -> EMBeliefSystemOut:
    return EMBeliefSystemOut(self_model_id=self_model_id, belief_count=len(system.beliefs),
                             beliefs=[_belief(b) for b in system.beliefs])


def _interaction(interaction: em.DialecticalInteraction) -> EMInteractionOut:
    qa = interaction.question_answer
    answer = qa.answer if qa else None
    return EMInteractionOut(
        id=interaction.id, status=enum_name(interaction.status), type=enum_name(interaction.type),
        question=(qa.question.question or None) if qa else None,
        answer=(answer.user_answer or None) if answer else None,
        extracted_beliefs=[_belief(b) for b in qa.extracted_beliefs] if qa else [],
        asked_at=millis_to_datetime(qa.question.created_at_millis_utc) if qa else None,
        answered_at=millis_to_datetime(answer.created_at_millis_utc) if answer else None,
        updated_at=millis_to_datetime(interaction.updated_at_millis_utc))


def _dialectic(dialectic: em.Dialectic, profile_id: uuid.UUID | None = None) -> EMDialecticOut:
    objective = learning_objective_dict(dialectic.learning_objective)
    pending = dialectic.pending_interaction
    return EMDialecticOut(
        id=dialectic.id, self_model_id=dialectic.self_model_id,
        dialectic_type=enum_name(dialectic.dialectic_type),
        agent_type=enum_name(dialectic.agent.agent_type),
        learning_objective=LearningObjectiveOut(**objective) if objective else None,
        interactions=[_interaction(i) for i in dialectic.user_interactions],
        pending_question=(pending.question or None) if pending else None,
        answered_count=sum(1 for i in dialectic.user_interactions
                           if enum_name(i.status) in ("ANSWERED", "BELIEFS_UPDATED")),
        profile_dialectic_id=profile_id)


def _self_model_fields(self_model: em.SelfModel, user_id: uuid.UUID,
                       mirrored: dict[str, uuid.UUID]) -> dict[str, Any]:
    return {"id": self_model.id or str(user_id), "user_id": user_id,
            "philosophies": list(self_model.philosophies),
            "belief_system": _belief_system(self_model.id or str(user_id), self_model.belief_system),
            "dialectics": [_dialectic(d, mirrored.get(d.id)) for d in self_model.dialectics]}


def _page(items: list, limit: int, offset: int) -> Page:
    return Page(items=items[offset:offset + limit], total=len(items), limit=limit, offset=offset)


# --- routes ------------------------------------------------------------------------------

@router.post("/createSelfModel", operation_id="emCreateSelfModel", status_code=status.HTTP_201_CREATED,
             response_model=Envelope[CreateSelfModelOut],
             responses={200: {"model": Envelope[CreateSelfModelOut],
                              "description": "The self-model already existed; returned unchanged"}},
             summary="Create the user's Epistemic Me self-model and mirror a profile self-model. "
                     "Idempotent: an existing one is returned unchanged with 200 (philosophies "
                     "apply only on creation)")
async def create_self_model(body: CreateSelfModelIn, response: Response, session: Session,
                            principal: CurrentPrincipal, client: EMClient):
    principal.ensure_user(body.user_id)
    result = await service.create_self_model(session, client, body.user_id, body.philosophies)
    if not result.created:
        response.status_code = status.HTTP_200_OK
    mirrored = await service.mirrored_dialectic_ids(
        session, body.user_id, [d.id for d in result.self_model.dialectics])
    return Envelope(data=CreateSelfModelOut(
        **_self_model_fields(result.self_model, body.user_id, mirrored),
        created=result.created, profile_self_model_id=result.profile_self_model.id))


@router.get("/getSelfModel", operation_id="emGetSelfModel", response_model=Envelope[EMSelfModelOut],
            summary="The user's Epistemic Me self-model: philosophies, belief system, dialectics")
async def get_self_model(user_id: uuid.UUID, session: Session, principal: CurrentPrincipal,
                         client: EMClient):
    principal.ensure_user(user_id)
    self_model = await service.get_self_model(session, client, user_id)
    mirrored = await service.mirrored_dialectic_ids(session, user_id,
                                                    [d.id for d in self_model.dialectics])
    return Envelope(data=EMSelfModelOut(**_self_model_fields(self_model, user_id, mirrored)))


@router.post("/syncSelfModelToProfile", operation_id="emSyncSelfModelToProfile",
             response_model=Envelope[SyncOut],
             summary="Pull the Epistemic Me beliefs and dialectics into the profile store "
                     "(idempotent by Epistemic Me id)")
async def sync_self_model_to_profile(body: UserIn, session: Session, principal: CurrentPrincipal,
                                     client: EMClient):
    principal.ensure_user(body.user_id)
    report = await service.sync_to_profile(session, client, body.user_id)
    return Envelope(data=SyncOut.model_validate(report.as_dict()))


@router.post("/updateBelief", operation_id="emUpdateBelief", status_code=status.HTTP_201_CREATED,
             response_model=Envelope[UpdateBeliefOut],
             summary="Add a belief to the user's Epistemic Me belief system (type defaults to "
                     "STATEMENT) and mirror it into the profile's `epistemic_me` belief system")
async def update_belief(body: UpdateBeliefIn, session: Session, principal: CurrentPrincipal,
                        client: EMClient):
    principal.ensure_user(body.user_id)
    result = await service.update_belief(session, client, body.user_id, body.statement,
                                         confidence=body.confidence, belief_type=body.belief_type)
    return Envelope(data=UpdateBeliefOut(belief=_belief(result.belief),
                                         profile_belief=BeliefOut.model_validate(result.profile_belief)))


@router.get("/listBeliefSystems", operation_id="emListBeliefSystems",
            response_model=Envelope[Page[EMBeliefSystemOut]],
            summary="The user's Epistemic Me belief systems (the platform keeps one per self-model)")
async def list_belief_systems(user_id: uuid.UUID, session: Session, principal: CurrentPrincipal,
                              client: EMClient, limit: Limit = 50, offset: Offset = 0):
    principal.ensure_user(user_id)
    system = await service.get_belief_system(session, client, user_id)
    return Envelope(data=_page([_belief_system(str(user_id), system)], limit, offset))


@router.get("/listBeliefs", operation_id="emListBeliefs", response_model=Envelope[Page[EMBeliefOut]],
            summary="The user's Epistemic Me beliefs, newest first")
async def list_beliefs(user_id: uuid.UUID, session: Session, principal: CurrentPrincipal,
                       client: EMClient, limit: Limit = 50, offset: Offset = 0):
    principal.ensure_user(user_id)
    beliefs = await service.list_beliefs(session, client, user_id)
    return Envelope(data=_page([_belief(b) for b in reversed(beliefs)], limit, offset))


@router.delete("/deleteBelief", operation_id="emDeleteBelief",
               status_code=status.HTTP_501_NOT_IMPLEMENTED, response_model=ErrorEnvelope,
               summary="Not supported: Epistemic Me cannot delete beliefs (always 501)")
async def delete_belief(principal: CurrentPrincipal, belief_id: ExternalId | None = None,
                        user_id: uuid.UUID | None = None):
    if user_id is not None:
        principal.ensure_user(user_id)
    raise NotSupported(
        "Epistemic Me has no way to delete a belief, so this proxy cannot either. "
        "To remove the mirrored copy, delete it from the profile store with "
        "DELETE /profile/deleteBelief?belief_id=<profile belief id>",
        details={"upstream": "epistemic_me", "belief_id": belief_id})


@router.post("/createDialectic", operation_id="emCreateDialectic", status_code=status.HTTP_201_CREATED,
             response_model=Envelope[EMDialecticOut],
             summary="Start an Epistemic Me dialectic; it is mirrored as a profile dialectic with "
                     "its first question")
async def create_dialectic(body: CreateDialecticIn, session: Session, principal: CurrentPrincipal,
                           client: EMClient):
    principal.ensure_user(body.user_id)
    objective = (body.learning_objective.model_dump(exclude_none=True)
                 if body.learning_objective else None)
    result = await service.create_dialectic(session, client, body.user_id,
                                             dialectic_type=body.dialectic_type,
                                             learning_objective=objective)
    return Envelope(data=_dialectic(result.dialectic, result.profile_dialectic.id))


@router.post("/updateDialectic", operation_id="emUpdateDialectic", response_model=Envelope[EMDialecticOut],
             summary="Answer the pending question of an Epistemic Me dialectic; the answer and the "
                     "next question are mirrored (not on a dry run). 409 if the mirrored profile "
                     "dialectic was closed")
async def update_dialectic(body: UpdateDialecticIn, session: Session, principal: CurrentPrincipal,
                           client: EMClient):
    principal.ensure_user(body.user_id)
    result = await service.update_dialectic(session, client, body.user_id, body.dialectic_id,
                                            body.answer, dry_run=body.dry_run)
    profile_id = result.profile_dialectic.id if result.profile_dialectic else None
    return Envelope(data=_dialectic(result.dialectic, profile_id))


@router.get("/listDialectics", operation_id="emListDialectics",
            response_model=Envelope[Page[EMDialecticOut]],
            summary="The user's Epistemic Me dialectics, newest first")
async def list_dialectics(user_id: uuid.UUID, session: Session, principal: CurrentPrincipal,
                          client: EMClient, limit: Limit = 50, offset: Offset = 0):
    principal.ensure_user(user_id)
    dialectics = list(reversed(await service.list_dialectics(session, client, user_id)))
    page = dialectics[offset:offset + limit]
    mirrored = await service.mirrored_dialectic_ids(session, user_id, [d.id for d in page])
    return Envelope(data=Page(items=[_dialectic(d, mirrored.get(d.id)) for d in page],
                              total=len(dialectics), limit=limit, offset=offset))
