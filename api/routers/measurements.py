"""Measurements (SPEC §4.2)."""
from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, BackgroundTasks
from pydantic import Field

from api.deps import CurrentPrincipal, Ctx, Session
from api.envelope import Envelope, Page
from api.schemas_common import Limit, Model, Name, Offset, Request, UTCDatetime
from services import measurements, trends

router = APIRouter(tags=["measurements"])


class MeasurementOut(Model):
    id: uuid.UUID
    user_id: uuid.UUID
    type: str
    value: float
    unit: str
    captured_at: datetime
    source: str


class MeasurementIn(Request):
    user_id: uuid.UUID
    type: Name
    value: float = Field(allow_inf_nan=False)
    unit: Name
    captured_at: UTCDatetime
    source: Name | None = None


@router.post("/upsertMeasurement", operation_id="upsertMeasurement",
             response_model=Envelope[MeasurementOut],
             summary="Record a measurement; a repeat of (user, type, captured_at, source) updates it")
async def upsert_measurement(body: MeasurementIn, session: Session, principal: CurrentPrincipal,
                             ctx: Ctx, after_commit: BackgroundTasks):
    principal.ensure_user(body.user_id)
    row = await measurements.upsert_measurement(
        session, user_id=body.user_id, type=body.type, value=body.value, unit=body.unit,
        captured_at=body.captured_at, source=body.source)
    # Cached trends of this metric go stale now, and again after the commit (background tasks
    # run after the transaction), so a read racing the commit cannot cache old data.
    await trends.invalidate(ctx.redis, body.user_id, row.type)
    after_commit.add_task(trends.invalidate_quietly, ctx.redis, body.user_id, row.type)
    return Envelope(data=MeasurementOut.model_validate(row))


@router.get("/listMeasurements", operation_id="listMeasurements",
            response_model=Envelope[Page[MeasurementOut]], summary="A user's measurements, newest first")
async def list_measurements(user_id: uuid.UUID, session: Session, principal: CurrentPrincipal,
                            type: str | None = None, since: UTCDatetime | None = None,
                            until: UTCDatetime | None = None, limit: Limit = 50, offset: Offset = 0):
    principal.ensure_user(user_id)
    rows, total = await measurements.list_measurements(
        session, user_id=user_id, type=type, since=since, until=until, limit=limit, offset=offset)
    return Envelope(data=Page(items=[MeasurementOut.model_validate(m) for m in rows], total=total,
                              limit=limit, offset=offset))
