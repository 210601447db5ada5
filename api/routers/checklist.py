"""The onboarding checklist and profile completeness (SPEC §4.4, getProgress of §4.2)."""
from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from api.deps import CurrentPrincipal, Session
from api.envelope import Envelope
from api.schemas_common import Model, Name, Request
from core.errors import ValidationFailed
from services import checklist

router = APIRouter(tags=["checklist"])

BucketCode = Literal["health_device", "dd_score", "measurements", "capabilities", "biomarkers",
                     "demographics", "protocols"]
ChecklistStatus = Literal["pending", "in_progress", "completed", "skipped"]
assert set(BucketCode.__args__) == set(checklist.BUCKETS)
assert set(ChecklistStatus.__args__) == set(checklist.STATUSES)


class ChecklistItemOut(Model):
    bucket_code: str
    label: str
    status: str
    source: str | None
    data_ref: dict[str, Any] | None
    updated_at: datetime


class ChecklistProgressOut(Model):
    items: list[ChecklistItemOut]
    completed: int
    total: int
    percent: int


class ProgressOut(Model):
    percent: int
    completed: list[str]
    missing: list[str]


class MarkChecklistItemIn(Request):
    user_id: uuid.UUID | None = None
    bucket_code: BucketCode
    status: ChecklistStatus
    source: Name | None = None
    data_ref: dict[str, Any] | None = None


def _item_out(item) -> ChecklistItemOut:
    return ChecklistItemOut(bucket_code=item.bucket_code, label=checklist.BUCKETS[item.bucket_code],
                            status=item.status, source=item.source, data_ref=item.data_ref,
                            updated_at=item.updated_at)


def _from_query(fields: dict[str, Any]) -> MarkChecklistItemIn:
    """The original query-parameter form; `data_ref` is then a JSON object in a string."""
    given = {k: v for k, v in fields.items() if v is not None}
    if "data_ref" in given:
        try:
            given["data_ref"] = json.loads(given["data_ref"])
        except (ValueError, RecursionError):
            raise ValidationFailed("data_ref must be a JSON object", details=[
                {"loc": ["query", "data_ref"], "msg": "must be a JSON object", "type": "json_invalid"}])
    try:
        return MarkChecklistItemIn(**given)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("query", *e["loc"])} for e in exc.errors()])


@router.get("/getChecklistProgress", operation_id="getChecklistProgress",
            response_model=Envelope[ChecklistProgressOut],
            summary="The seven onboarding items in bucket order (missing ones created as pending)")
async def get_checklist_progress(session: Session, principal: CurrentPrincipal,
                                 user_id: uuid.UUID | None = None):
    owner = principal.default_user(user_id)
    return Envelope(data=ChecklistProgressOut(**await checklist.checklist_progress(session, owner)))


@router.post("/markChecklistItem", operation_id="markChecklistItem",
             response_model=Envelope[ChecklistItemOut],
             summary="Set a checklist item's status (JSON body, or the original query parameters)")
async def mark_checklist_item(
        session: Session, principal: CurrentPrincipal,
        body: Annotated[MarkChecklistItemIn | None, Body()] = None,
        user_id: Annotated[uuid.UUID | None, Query(description="Query form only")] = None,
        bucket_code: Annotated[BucketCode | None, Query(description="Query form only")] = None,
        status: Annotated[ChecklistStatus | None, Query(description="Query form only")] = None,
        source: Annotated[Name | None, Query(description="Query form only")] = None,
        data_ref: Annotated[str | None, Query(max_length=10_000,
                                              description="Query form only: a JSON object")] = None):
    query = {"user_id": user_id, "bucket_code": bucket_code, "status": status, "source": source,
             "data_ref": data_ref}
    if body is None:
        body = _from_query(query)
    elif any(v is not None for v in query.values()):
        raise ValidationFailed("Send the fields either as a JSON body or as query parameters, not both",
                               details=[{"loc": ["query"], "msg": "not allowed with a JSON body"}])
    owner = principal.default_user(body.user_id)
    item = await checklist.mark_item(session, owner, body.bucket_code, body.status,
                                     source=body.source, data_ref=body.data_ref)
    return Envelope(data=_item_out(item))


@router.get("/getProgress", operation_id="getProgress", response_model=Envelope[ProgressOut],
            summary="Profile completeness from the onboarding checklist")
async def get_progress(session: Session, principal: CurrentPrincipal, user_id: uuid.UUID | None = None):
    owner = principal.default_user(user_id)
    return Envelope(data=ProgressOut(**await checklist.profile_progress(session, owner)))
