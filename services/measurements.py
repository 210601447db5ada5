"""Measurements: idempotent upsert and time-window listing."""
from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.users import get_user
from storage.models import Measurement
from storage.upsert import upsert

async def upsert_measurement(session: AsyncSession, *, user_id: uuid.UUID, type: str, value: float,
                             unit: str, captured_at: datetime, source: str | None) -> Measurement:
    """Idempotent on (user_id, type, captured_at, source): a repeat updates the value."""
    await get_user(session, user_id)
    values = dict(id=uuid.uuid4(), user_id=user_id, type=type, value=value, unit=unit,
                  captured_at=captured_at, source=source or "")
    await upsert(session, Measurement, values, ["user_id", "type", "captured_at", "source"],
                 ["value", "unit"])
    row = await session.scalar(
        select(Measurement).where(Measurement.user_id == user_id, Measurement.type == type,
                                  Measurement.captured_at == captured_at,
                                  Measurement.source == (source or ""))
        .execution_options(populate_existing=True))
    return row


async def list_measurements(session: AsyncSession, *, user_id: uuid.UUID, type: str | None,
                            since: datetime | None, until: datetime | None, limit: int,
                            offset: int) -> tuple[list[Measurement], int]:
    conditions = [Measurement.user_id == user_id]
    if type:
        conditions.append(Measurement.type == type)
    if since:
        conditions.append(Measurement.captured_at >= since)
    if until:
        conditions.append(Measurement.captured_at <= until)
    total = await session.scalar(select(func.count()).select_from(Measurement).where(*conditions))
    rows = await session.scalars(select(Measurement).where(*conditions)
                                 .order_by(Measurement.captured_at.desc(), Measurement.id)
                                 .limit(limit).offset(offset))
    return list(rows), total or 0
