"""Trends of a user's measurements and cohort statistics (SPEC §4.2)."""
from __future__ import annotations

import uuid
from datetime import date
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.deps import CurrentPrincipal, Ctx, Session
from api.envelope import Envelope
from api.schemas_common import Model
from services import trends

router = APIRouter(tags=["trends"])

Metric = Annotated[str, Query(min_length=1, max_length=200, pattern=r"^[^\x00]*[^\s\x00][^\x00]*$",
                              description="A measurement type, e.g. `weight` or `steps`")]


class TrendOut(Model):
    user_id: uuid.UUID
    metric: str
    unit: str | None
    window: int
    start_date: date
    end_date: date
    count: int
    days_with_data: int
    sparkline: list[float | None]
    slope: float
    r_squared: float | None
    direction: Literal["rising", "falling", "flat"]
    start: float | None
    end: float | None
    percent_change: float | None
    mean: float | None
    min: float | None
    max: float | None


class CohortStatsOut(Model):
    metric: str
    window_days: int
    users: int
    count: int
    k_anonymity: int
    suppressed: bool
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    p50: float | None = None
    p90: float | None = None
    max: float | None = None


@router.get("/getProgressTrend", operation_id="getProgressTrend", response_model=Envelope[TrendOut],
            summary="Daily means, sparkline, least-squares slope and direction of a user's metric")
async def get_progress_trend(metric: Metric, session: Session, ctx: Ctx, principal: CurrentPrincipal,
                             user_id: uuid.UUID | None = None,
                             window: Annotated[int, Query(ge=1, le=365)] = 7):
    owner = principal.default_user(user_id)
    metric = metric.strip()
    return Envelope(data=TrendOut(**await trends.progress_trend(session, ctx.redis, owner, metric, window)))


@router.get("/getCohortStats", operation_id="getCohortStats", response_model=Envelope[CohortStatsOut],
            response_model_exclude_none=True,
            summary="Statistics of a metric over all users; counts only below 5 users (k-anonymity)")
async def get_cohort_stats(metric: Metric, session: Session, _: CurrentPrincipal,
                           window_days: Annotated[int, Query(ge=1, le=365)] = 30):
    return Envelope(data=CohortStatsOut(**await trends.cohort_stats(session, metric.strip(), window_days)))
