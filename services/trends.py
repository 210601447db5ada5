"""Trends of one user's measurements and cohort statistics over everyone's (SPEC §4.2).

The first half is pure statistics (unit-tested against hand-computed values); the second reads
measurements from the database and caches a user's trend in Redis.

Definitions
- The window of a trend is `window` calendar days (UTC) ending today, inclusive.
- `sparkline`: one value per day of the window, the mean of that day's measurements, or None.
- `slope`: ordinary least squares of daily mean on day index, over days with data (per day).
- `r_squared`: squared correlation of that fit; None with fewer than two days with data, 0.0
  for a series with no variance.
- `direction`: `flat` when the fitted change over the days spanned is within ±1 % of the mean
  magnitude of the daily means (`FLAT_THRESHOLD`), else `rising` / `falling`.
- `start` / `end`: the first and last daily means; `percent_change` = 100·(end − start)/|start|
  (None when start is 0 and end is not; 0.0 when both are 0).
- `count`: the number of measurements in the window.
"""
from __future__ import annotations

import json
import math
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import distinct, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.users import get_user
from storage.models import Measurement
from storage.redis import REDIS_ERRORS
from storage.types import as_utc, utcnow

FLAT_THRESHOLD = 0.01
COHORT_MIN_USERS = 5
CACHE_TTL_SECONDS = 600
GENERATION_TTL_SECONDS = 2 * 24 * 3600


# --- pure statistics -----------------------------------------------------------------------------

def window_start(end: date, window: int) -> date:
    return end - timedelta(days=window - 1)


def daily_means(points: Iterable[tuple[datetime, float]], start: date, days: int) -> list[float | None]:
    """Mean value per UTC calendar day from `start` for `days` days; None for days without data.
    Points outside the range are ignored."""
    buckets: list[list[float]] = [[] for _ in range(days)]
    for captured_at, value in points:
        index = (as_utc(captured_at).date() - start).days
        if 0 <= index < days:
            buckets[index].append(float(value))
    return [math.fsum(b) / len(b) if b else None for b in buckets]


def least_squares(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float | None]:
    """(slope, intercept, r²) of y = intercept + slope·x. Fewer than two points: slope 0 and
    r² None. A series without variance: slope 0 and r² 0."""
    n = len(xs)
    if n != len(ys):
        raise ValueError("xs and ys differ in length")
    if n == 0:
        return 0.0, 0.0, None
    mean_y = math.fsum(ys) / n
    if n == 1:
        return 0.0, mean_y, None
    mean_x = math.fsum(xs) / n
    sxx = math.fsum((x - mean_x) ** 2 for x in xs)
    syy = math.fsum((y - mean_y) ** 2 for y in ys)
    sxy = math.fsum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    scale = max(abs(y) for y in ys) or 1.0
    if sxx == 0 or syy <= n * (1e-12 * scale) ** 2:
        # no spread in x, or y constant up to floating-point noise
        return 0.0, mean_y, 0.0
    slope = sxy / sxx
    r_squared = min(1.0, max(0.0, (sxy * sxy) / (sxx * syy)))
    return slope, mean_y - slope * mean_x, r_squared


def direction_of(slope: float, span_days: float, values: Sequence[float]) -> str:
    if not values or span_days <= 0:
        return "flat"
    magnitude = math.fsum(abs(v) for v in values) / len(values)
    change = slope * span_days
    if magnitude == 0 or abs(change) <= FLAT_THRESHOLD * magnitude:
        return "flat"
    return "rising" if change > 0 else "falling"


def percent_change(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    if start == 0:
        return 0.0 if end == 0 else None
    return 100.0 * (end - start) / abs(start)


def summarize_daily(sparkline: Sequence[float | None], count: int) -> dict[str, Any]:
    """Every statistic of a trend from its per-day means (None = no data that day)."""
    xs = [float(i) for i, v in enumerate(sparkline) if v is not None]
    ys = [float(v) for v in sparkline if v is not None]
    slope, _, r_squared = least_squares(xs, ys)
    start = ys[0] if ys else None
    end = ys[-1] if ys else None
    return {
        "count": count,
        "days_with_data": len(ys),
        "sparkline": list(sparkline),
        "slope": slope,
        "r_squared": r_squared,
        "direction": direction_of(slope, xs[-1] - xs[0], ys) if len(ys) >= 2 else "flat",
        "start": start,
        "end": end,
        "percent_change": percent_change(start, end),
        "mean": math.fsum(ys) / len(ys) if ys else None,
        "min": min(ys) if ys else None,
        "max": max(ys) if ys else None,
    }


def compute_trend(points: Sequence[tuple[datetime, float]], *, end: date, window: int) -> dict[str, Any]:
    """The trend of `points` over `window` days ending on `end` (inclusive)."""
    if window < 1:
        raise ValueError("window must be at least 1 day")
    start = window_start(end, window)
    inside = [(t, v) for t, v in points if start <= as_utc(t).date() <= end]
    return {"window": window, "start_date": start, "end_date": end,
            **summarize_daily(daily_means(inside, start, window), len(inside))}


def percentile_position(n: int, q: float) -> tuple[int, float]:
    """Linear interpolation between closest ranks (numpy's default): the lower index into the
    sorted values and the fraction towards the next one."""
    if n < 1 or not 0.0 <= q <= 1.0:
        raise ValueError("need n >= 1 and 0 <= q <= 1")
    position = q * (n - 1)
    lower = math.floor(position)
    return lower, position - lower


def percentile(sorted_values: Sequence[float], q: float) -> float:
    lower, fraction = percentile_position(len(sorted_values), q)
    value = sorted_values[lower]
    if fraction:
        value += fraction * (sorted_values[lower + 1] - value)
    return value


def describe(values: Sequence[float]) -> dict[str, Any]:
    """count, mean, population std, min, p50, p90, max."""
    if not values:
        return {"count": 0, "mean": None, "std": None, "min": None, "p50": None, "p90": None, "max": None}
    ordered = sorted(float(v) for v in values)
    n = len(ordered)
    mean = math.fsum(ordered) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in ordered) / n)
    return {"count": n, "mean": mean, "std": std, "min": ordered[0],
            "p50": percentile(ordered, 0.5), "p90": percentile(ordered, 0.9), "max": ordered[-1]}


# --- a user's trend, cached in Redis -------------------------------------------------------------

def cache_prefix(user_id: uuid.UUID) -> str:
    """Every trend key of a user starts with this (deleteUser clears it)."""
    return f"sma:trend:{user_id}:"


def cache_key(user_id: uuid.UUID, metric: str, window: int, day: date) -> str:
    return f"{cache_prefix(user_id)}{metric}:{window}:{day.isoformat()}"


def generation_key(user_id: uuid.UUID, metric: str) -> str:
    # Cannot equal a cache key: those end in a date.
    return f"{cache_prefix(user_id)}{metric}:gen"


# Store the value only if no measurement of this (user, metric) was written since the reader
# looked at the generation: a computation that raced a write never lands in the cache.
_SET_IF_GENERATION = """
local current = redis.call('GET', KEYS[1]) or ''
if current == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', tonumber(ARGV[3]))
  return 1
end
return 0
"""


async def invalidate(redis: Redis, user_id: uuid.UUID, metric: str) -> None:
    """Call when a measurement of `metric` of this user is written: every cached trend of that
    (user, metric) becomes stale at once. Call it again after the commit, so that a read which
    ran between the first call and the commit cannot leave a stale value behind."""
    await redis.set(generation_key(user_id, metric), uuid.uuid4().hex, ex=GENERATION_TTL_SECONDS)


async def invalidate_quietly(redis: Redis, user_id: uuid.UUID, metric: str) -> None:
    """`invalidate` for after-commit hooks, where nobody is left to report a Redis outage to."""
    try:
        await invalidate(redis, user_id, metric)
    except REDIS_ERRORS:
        pass


async def _load_points(session: AsyncSession, user_id: uuid.UUID, metric: str, start: date,
                       end: date) -> tuple[list[tuple[datetime, float]], str | None]:
    lower = datetime.combine(start, time.min, tzinfo=timezone.utc)
    upper = datetime.combine(end + timedelta(days=1), time.min, tzinfo=timezone.utc)
    rows = (await session.execute(
        select(Measurement.captured_at, Measurement.value, Measurement.unit)
        .where(Measurement.user_id == user_id, Measurement.type == metric,
               Measurement.captured_at >= lower, Measurement.captured_at < upper)
        .order_by(Measurement.captured_at))).all()
    units = Counter(r.unit for r in rows)
    unit = min(units, key=lambda u: (-units[u], u)) if units else None
    return [(r.captured_at, r.value) for r in rows], unit


async def progress_trend(session: AsyncSession, redis: Redis | None, user_id: uuid.UUID, metric: str,
                         window: int = 7, *, today: date | None = None) -> dict[str, Any]:
    """getProgressTrend: the user's trend of `metric` over `window` days ending today (UTC)."""
    await get_user(session, user_id)
    today = today or utcnow().date()
    key, gen_key = cache_key(user_id, metric, window, today), generation_key(user_id, metric)
    generation = ""
    if redis is not None:
        try:
            generation, cached = await redis.mget(gen_key, key)
            generation = generation or ""
            if cached:
                entry = json.loads(cached)
                if entry.get("generation") == generation:
                    return entry["trend"]
        except REDIS_ERRORS:
            redis = None  # compute without the cache
    points, unit = await _load_points(session, user_id, metric, window_start(today, window), today)
    trend = compute_trend(points, end=today, window=window)
    trend = {"user_id": str(user_id), "metric": metric, "unit": unit, **trend,
             "start_date": trend["start_date"].isoformat(), "end_date": trend["end_date"].isoformat()}
    if redis is not None:
        payload = json.dumps({"generation": generation, "trend": trend})
        try:
            await redis.eval(_SET_IF_GENERATION, 2, gen_key, key, generation, payload,
                             CACHE_TTL_SECONDS)
        except REDIS_ERRORS:
            pass
    return trend


# --- cohort statistics ---------------------------------------------------------------------------

async def _value_at(session: AsyncSession, conditions: list, index: int) -> float:
    return await session.scalar(select(Measurement.value).where(*conditions)
                                .order_by(Measurement.value).offset(index).limit(1))


async def _percentile_sql(session: AsyncSession, conditions: list, count: int, q: float) -> float:
    lower, fraction = percentile_position(count, q)
    value = await _value_at(session, conditions, lower)
    if fraction:
        value += fraction * (await _value_at(session, conditions, lower + 1) - value)
    return value


async def cohort_stats(session: AsyncSession, metric: str, window_days: int = 30, *,
                       now: datetime | None = None) -> dict[str, Any]:
    """Over every user's measurements of `metric` captured in the last `window_days` days.
    With fewer than COHORT_MIN_USERS distinct users only the counts are returned
    (k-anonymity). std is the population standard deviation; percentiles interpolate
    linearly between closest ranks."""
    now = now or utcnow()
    conditions = [Measurement.type == metric,
                  Measurement.captured_at >= now - timedelta(days=window_days),
                  Measurement.captured_at <= now]
    row = (await session.execute(
        select(func.count(distinct(Measurement.user_id)), func.count(), func.avg(Measurement.value),
               func.min(Measurement.value), func.max(Measurement.value)).where(*conditions))).one()
    users, count = int(row[0] or 0), int(row[1] or 0)
    result: dict[str, Any] = {"metric": metric, "window_days": window_days, "users": users,
                              "count": count, "k_anonymity": COHORT_MIN_USERS,
                              "suppressed": users < COHORT_MIN_USERS}
    if result["suppressed"]:
        return result
    mean = float(row[2])
    variance = await session.scalar(
        select(func.avg((Measurement.value - mean) * (Measurement.value - mean))).where(*conditions))
    result.update(mean=mean, std=math.sqrt(max(0.0, float(variance or 0.0))), min=float(row[3]),
                  p50=await _percentile_sql(session, conditions, count, 0.5),
                  p90=await _percentile_sql(session, conditions, count, 0.9), max=float(row[4]))
    return result
