"""Protocol templates and personalised protocols (SPEC §4.5)."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, status
from pydantic import Field, StringConstraints

from api.dd_context import dd_runtime
from api.deps import AdminPrincipal, Ctx, CurrentPrincipal, Session
from api.envelope import Envelope, Page
from api.schemas_common import Limit, Model, Name, Offset, Request, Statement
from services import dd_push, protocols

router = APIRouter(tags=["protocols"])

HabitType = Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, min_length=1,
                                             max_length=64, pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]


class DDProtocolIn(Request):
    name: Name | None = None
    description: Statement | None = None
    goal: Statement | None = None
    category: Name | None = None
    type: Name | None = None


class CreateTemplateIn(Request):
    habit_type: HabitType = Field(description="e.g. sleep, exercise, nutrition, hydration, "
                                              "mindfulness, recovery, social")
    name: Name
    cue: Statement
    routine: Statement
    reward: Statement
    dd_protocol_json: DDProtocolIn | None = Field(
        None, description="Don't Die protocol fields; missing ones are derived from the template")
    is_active: bool = True


class TemplateOut(Model):
    id: uuid.UUID
    habit_type: str
    name: str
    cue: str
    routine: str
    reward: str
    dd_protocol_json: dict[str, Any]
    is_active: bool
    created_at: datetime


class PreferencesIn(Request):
    time_of_day: Literal["morning", "afternoon", "evening"] | None = None
    intensity: Literal["low", "moderate", "high"] | None = None
    minutes_per_day: int | None = Field(None, ge=1, le=protocols.MAX_MINUTES)


class GenerateProtocolIn(Request):
    user_id: uuid.UUID
    template_id: uuid.UUID
    preferences: PreferencesIn | None = None
    push_to_dontdie: bool = False


class PhaseOut(Model):
    week_from: int
    week_to: int | None
    minutes_per_day: int
    days_per_week: int


class ScheduleOut(Model):
    time_of_day: str
    start_time: str
    minutes_per_day: int
    days_per_week: int
    intensity: str
    phases: list[PhaseOut]
    targets: dict[str, Any]
    review_after_days: int


class ProtocolOut(Model):
    name: str
    habit_type: str
    cue: str
    routine: str
    reward: str
    schedule: ScheduleOut
    dd_protocol: dict[str, Any]


class GeneratedProtocolOut(Model):
    template_id: uuid.UUID
    user_id: uuid.UUID
    protocol: ProtocolOut
    rationale: list[str]
    dontdie_protocol_id: str | None = Field(None, description="Set when pushed to Don't Die")


@router.get("/listProtocolTemplates", operation_id="listProtocolTemplates",
            response_model=Envelope[Page[TemplateOut]],
            summary="Active habit templates, by habit type then name")
async def list_protocol_templates(
        session: Session, _: CurrentPrincipal,
        habit_type: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9_ ]*$")] = None,
        limit: Limit = 50, offset: Offset = 0):
    habit = habit_type.strip().lower() if habit_type else None
    rows, total = await protocols.list_templates(session, habit_type=habit or None, limit=limit,
                                                 offset=offset)
    return Envelope(data=Page(items=[TemplateOut.model_validate(t) for t in rows], total=total,
                              limit=limit, offset=offset))


@router.post("/createProtocolTemplate", operation_id="createProtocolTemplate",
             status_code=status.HTTP_201_CREATED, response_model=Envelope[TemplateOut],
             summary="Add a habit template (admin); a duplicate name → 409")
async def create_protocol_template(body: CreateTemplateIn, session: Session, _: AdminPrincipal):
    template = await protocols.create_template(
        session, habit_type=body.habit_type, name=body.name, cue=body.cue, routine=body.routine,
        reward=body.reward, is_active=body.is_active,
        dd_protocol=body.dd_protocol_json.model_dump() if body.dd_protocol_json else None)
    return Envelope(data=TemplateOut.model_validate(template))


@router.post("/generateProtocol", operation_id="generateProtocol",
             response_model=Envelope[GeneratedProtocolOut],
             summary="Personalise a template from the user's measurements, beliefs, checklist "
                     "gaps and preferences (deterministic)")
async def generate_protocol(body: GenerateProtocolIn, session: Session, ctx: Ctx,
                            principal: CurrentPrincipal):
    principal.ensure_user(body.user_id)
    prefs = body.preferences or PreferencesIn()
    generated = await protocols.generate(
        session, body.user_id, body.template_id,
        protocols.Preferences(time_of_day=prefs.time_of_day, intensity=prefs.intensity,
                              minutes_per_day=prefs.minutes_per_day))
    if body.push_to_dontdie:
        pushed = await dd_push.push_protocol(session, dd_runtime(ctx), body.user_id,
                                             generated["protocol"]["dd_protocol"])
        generated["dontdie_protocol_id"] = str(pushed["protocol_id"])
    return Envelope(data=GeneratedProtocolOut(**generated))
