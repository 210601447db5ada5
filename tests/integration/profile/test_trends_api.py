"""getProgressTrend (cached, invalidated by writes) and getCohortStats (k-anonymity)."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import update

from _profile_helpers import add_measurement, data, error, on_day, today
from services import trends
from storage.models import Measurement
from tests.support.actors import make_user


async def test_trend_from_real_measurements(alice):
    uid = alice.user_id
    await add_measurement(alice.client, uid, "weight", 80.0, on_day(6, 7), unit="kg")
    await add_measurement(alice.client, uid, "weight", 82.0, on_day(6, 19), unit="kg")  # day mean 81
    await add_measurement(alice.client, uid, "weight", 83.0, on_day(4), unit="kg")
    await add_measurement(alice.client, uid, "weight", 85.0, on_day(0), unit="kg")
    await add_measurement(alice.client, uid, "weight", 99.0, on_day(7), unit="kg")     # outside 7 days
    await add_measurement(alice.client, uid, "steps", 5000, on_day(1), unit="steps")   # other metric
    trend = data(await alice.client.get("/getProgressTrend", params={"metric": "weight"}))
    assert trend["user_id"] == str(uid) and trend["metric"] == "weight" and trend["unit"] == "kg"
    assert trend["window"] == 7
    assert trend["end_date"] == today().isoformat()
    assert trend["start_date"] == (today() - timedelta(days=6)).isoformat()
    assert trend["sparkline"] == [81.0, None, 83.0, None, None, None, 85.0]
    assert trend["count"] == 4 and trend["days_with_data"] == 3
    # x = 0, 2, 6; y = 81, 83, 85: Sxx = 56/3·… computed by the pure function
    expected = trends.compute_trend([(datetime.fromisoformat(on_day(d)), v) for d, v in
                                     ((6, 81.0), (4, 83.0), (0, 85.0))], end=today(), window=7)
    assert trend["slope"] == pytest.approx(expected["slope"])
    assert trend["r_squared"] == pytest.approx(expected["r_squared"])
    assert trend["direction"] == "rising"
    assert trend["start"] == 81.0 and trend["end"] == 85.0
    assert trend["percent_change"] == pytest.approx(100 * 4 / 81)
    # a longer window includes the older reading
    longer = data(await alice.client.get("/getProgressTrend", params={
        "metric": "weight", "window": 8, "user_id": str(uid)}))
    assert longer["sparkline"][0] == 99.0 and longer["count"] == 5


async def test_trend_without_data(alice):
    trend = data(await alice.client.get("/getProgressTrend", params={"metric": "hrv", "window": 3}))
    assert trend["count"] == 0 and trend["sparkline"] == [None, None, None]
    assert trend["slope"] == 0.0 and trend["r_squared"] is None and trend["direction"] == "flat"
    assert trend["start"] is None and trend["percent_change"] is None and trend["unit"] is None


async def test_trend_is_cached_and_invalidated_by_a_new_measurement(alice, redis, profile_ctx):
    uid = alice.user_id
    await add_measurement(alice.client, uid, "sleep_hours", 6.0, on_day(2), unit="h")
    await add_measurement(alice.client, uid, "sleep_hours", 7.0, on_day(1), unit="h")
    first = data(await alice.client.get("/getProgressTrend", params={"metric": "sleep_hours"}))
    assert first["end"] == 7.0 and first["count"] == 2
    key = trends.cache_key(uid, "sleep_hours", 7, today())
    assert key.startswith(f"sma:trend:{uid}:")
    assert await redis.exists(key)
    # A change behind the API's back is not seen: the answer comes from the cache.
    async with profile_ctx.db.transaction() as session:
        await session.execute(update(Measurement).where(Measurement.user_id == uid)
                              .values(value=Measurement.value + 100))
    cached = data(await alice.client.get("/getProgressTrend", params={"metric": "sleep_hours"}))
    assert cached == first
    # Writing a measurement of that type through the API invalidates the cached trend.
    await add_measurement(alice.client, uid, "sleep_hours", 8.0, on_day(0), unit="h")
    fresh = data(await alice.client.get("/getProgressTrend", params={"metric": "sleep_hours"}))
    assert fresh != first
    assert fresh["count"] == 3 and fresh["end"] == 8.0 and fresh["start"] == 106.0
    # An update of an existing reading (same key) invalidates as well.
    await add_measurement(alice.client, uid, "sleep_hours", 9.0, on_day(0), unit="h")
    updated = data(await alice.client.get("/getProgressTrend", params={"metric": "sleep_hours"}))
    assert updated["end"] == 9.0 and updated["count"] == 3


async def test_writes_of_other_metrics_or_users_keep_the_cache(alice, bob, redis):
    await add_measurement(alice.client, alice.user_id, "steps", 1000, on_day(1))
    data(await alice.client.get("/getProgressTrend", params={"metric": "steps"}))
    generation = await redis.get(trends.generation_key(alice.user_id, "steps"))
    await add_measurement(alice.client, alice.user_id, "weight", 70, on_day(1))
    await add_measurement(bob.client, bob.user_id, "steps", 2000, on_day(1))
    assert await redis.get(trends.generation_key(alice.user_id, "steps")) == generation


async def test_trend_validation_auth_and_not_found(alice, bob, service, anonymous):
    for params in ({"metric": "weight", "window": 0}, {"metric": "weight", "window": 366},
                   {"metric": "weight", "window": "x"}, {}, {"metric": ""}, {"metric": "   "},
                   {"metric": "a\x00b"}, {"metric": "weight", "user_id": "nope"}):
        error(await alice.client.get("/getProgressTrend", params=params), 422, "validation_error")
    data(await alice.client.get("/getProgressTrend", params={"metric": "weight", "window": 365}))
    data(await alice.client.get("/getProgressTrend", params={"metric": "weight", "window": 1}))
    error(await alice.client.get("/getProgressTrend", params={"metric": "weight",
                                                             "user_id": str(bob.user_id)}), 403)
    error(await service.client.get("/getProgressTrend", params={"metric": "weight"}), 422)
    error(await service.client.get("/getProgressTrend", params={"metric": "weight",
                                                               "user_id": str(uuid.uuid4())}), 404)
    assert data(await service.client.get("/getProgressTrend", params={
        "metric": "weight", "user_id": str(bob.user_id)}))["count"] == 0
    error(await anonymous.get("/getProgressTrend", params={"metric": "weight"}), 401)
    error(await anonymous.get("/getCohortStats", params={"metric": "weight"}), 401)


async def _cohort_member(profile_ctx, service, values: list[float]) -> uuid.UUID:
    user_id = await make_user(profile_ctx.db)
    now = datetime.now(timezone.utc)
    for i, value in enumerate(values):
        await add_measurement(service.client, user_id, "resting_hr", value,
                              (now - timedelta(days=i, hours=1)).isoformat(), unit="bpm")
    return user_id


async def test_cohort_stats_k_anonymity_boundary(alice, service, profile_ctx):
    values = [[60.0, 62.0], [55.0], [70.0, 71.0, 72.0], [58.0]]
    for v in values:
        await _cohort_member(profile_ctx, service, v)
    # an old reading and another metric do not count
    await add_measurement(service.client, alice.user_id, "resting_hr", 40.0,
                          (datetime.now(timezone.utc) - timedelta(days=40)).isoformat())
    await add_measurement(service.client, alice.user_id, "weight", 80.0, on_day(1))
    four = data(await alice.client.get("/getCohortStats", params={"metric": "resting_hr"}))
    assert four == {"metric": "resting_hr", "window_days": 30, "users": 4, "count": 7,
                    "k_anonymity": 5, "suppressed": True}
    values.append([65.0, 66.0])
    await _cohort_member(profile_ctx, service, values[-1])
    five = data(await alice.client.get("/getCohortStats", params={"metric": "resting_hr"}))
    expected = trends.describe([v for vs in values for v in vs])
    assert five["users"] == 5 and five["count"] == 9 and five["suppressed"] is False
    for field in ("mean", "std", "min", "p50", "p90", "max"):
        assert five[field] == pytest.approx(expected[field]), field
    assert five["min"] == 55.0 and five["max"] == 72.0 and five["p50"] == 65.0
    # the 40-day-old reading joins with a longer window, alice becomes the sixth user
    wide = data(await service.client.get("/getCohortStats", params={"metric": "resting_hr",
                                                                    "window_days": 60}))
    assert wide["users"] == 6 and wide["min"] == 40.0


async def test_cohort_stats_validation_and_empty(alice):
    for params in ({"metric": "x", "window_days": 0}, {"metric": "x", "window_days": 366}, {},
                   {"metric": "x", "window_days": "many"}):
        error(await alice.client.get("/getCohortStats", params=params), 422)
    empty = data(await alice.client.get("/getCohortStats", params={"metric": "nothing"}))
    assert empty["users"] == 0 and empty["count"] == 0 and "mean" not in empty
