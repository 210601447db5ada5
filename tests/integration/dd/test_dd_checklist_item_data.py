"""GET /dd-data/checklist-item-data: cached UI payloads, fallback, stale-while-revalidate, formats."""
from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update

from services import dd_data
from storage.models import DDUserData
from storage.types import utcnow
from tests.support.dd import dd_uid

DD_BUCKETS = ["health_device", "dd_score", "measurements", "capabilities", "biomarkers", "protocols"]
TITLES = {"health_device": "Health Devices", "dd_score": "Don't Die Score",
          "measurements": "Physical Measurements",
          "capabilities": "Physical & Cognitive Capabilities",
          "biomarkers": "Lab Results & Biomarkers", "protocols": "Health Optimization Protocols"}


async def item(caller, bucket: str, **params):
    return await caller.client.get("/dd-data/checklist-item-data",
                                   params={"bucket_code": bucket, **params})


@pytest.fixture
async def synced_alice(alice, link, profile_ctx):
    response, token = await link(alice)
    assert response.status_code == 200
    assert (await alice.client.post(f"/dd-data/sync/{alice.user_id}")).status_code == 200
    return dd_uid(token)


def refreshes(sandbox_control, uid: str) -> int:
    return len(sandbox_control.requests(f"GET /user-health/{uid}/protocols"))


async def test_nothing_cached_starts_a_sync_and_returns_a_fallback(alice, link, profile_ctx,
                                                                   sandbox_control):
    response, token = await link(alice)
    sandbox_control.faults(path_prefix="/", latency_ms=100)
    first = await asyncio.gather(*(item(alice, bucket) for bucket in DD_BUCKETS))
    for bucket, response in zip(DD_BUCKETS, first):
        assert response.status_code == 200, response.text
        payload = response.json()["data"]
        assert payload["available"] is False and payload["data"]["message"]
        assert payload["title"] == TITLES[bucket] and payload["type"] == bucket
        assert payload["last_synced"] is None
        assert "sync has been started" in payload["message"]
        assert payload["sync"] in ("started", "in_progress")
    await profile_ctx.extras["dd_sync"].drain()
    assert refreshes(sandbox_control, dd_uid(token)) == 1

    ready = (await item(alice, "measurements")).json()["data"]
    assert ready["available"] is True and ready["stale"] is False
    assert ready["data"]["measurements"]


async def test_payload_formats_and_titles(alice, synced_alice, profile_ctx):
    payloads = {b: (await item(alice, b)).json()["data"] for b in DD_BUCKETS}
    for bucket, payload in payloads.items():
        assert payload["title"] == TITLES[bucket] and payload["type"] == bucket
        assert payload["stale"] is False and payload["available"] is True
        assert datetime.fromisoformat(payload["last_synced"]).tzinfo is not None

    scores = payloads["dd_score"]["data"]
    dates = [s["date"] for s in scores["scores"]]
    assert dates == sorted(dates) and len(dates) == 7
    values = [s["score"] for s in scores["scores"] if s["score"] is not None]
    assert scores["current_score"] == values[-1]
    assert scores["trend"] == dd_data.trend(values)
    assert scores["trend"] in ("improving", "declining", "stable")

    measurements = payloads["measurements"]["data"]
    weight = next(m for m in measurements["measurements"] if m["type"] == "Weight")
    assert weight["unit"] == "lbs" and weight["self_reported"] is True
    assert weight["readings"] >= 1 and weight["date"]
    assert measurements["summary"].endswith("recent measurements")
    assert {c["type"] for c in payloads["capabilities"]["data"]["capabilities"]} >= {"VO2 Max"}
    assert {b["type"] for b in payloads["biomarkers"]["data"]["biomarkers"]} >= {"HbA1c"}

    protocols = payloads["protocols"]["data"]
    assert protocols["active_count"] == 2 and protocols["completed_count"] == 1
    assert {p["name"] for p in protocols["active"]} == {"Consistent Sleep Window", "Zone 2 Cardio"}
    assert [p["status"] for p in protocols["completed"]] == ["Completed"]

    device = payloads["health_device"]["data"]
    assert device["connected"] is (len(values) > 0)
    assert device["days_with_data"] == len(values)


async def test_served_from_the_cache_without_upstream_calls(alice, synced_alice, sandbox_control, redis):
    sandbox_control.clear_requests()
    for bucket in DD_BUCKETS:
        assert (await item(alice, bucket)).status_code == 200
    # Redis lost the cache: rebuilt from the database, still no upstream call
    await redis.delete(dd_data.items_key(alice.user_id))
    for bucket in DD_BUCKETS:
        assert (await item(alice, bucket)).json()["data"]["available"] is True
    assert await redis.exists(dd_data.items_key(alice.user_id))
    assert sandbox_control.requests() == []


async def test_stale_data_is_served_at_once_and_refreshed_in_the_background(
        alice, synced_alice, profile_ctx, sandbox_control, redis):
    old = utcnow() - timedelta(hours=2)
    async with profile_ctx.db.transaction() as session:
        row = await session.scalar(select(DDUserData).where(DDUserData.user_id == alice.user_id))
        snapshots = {c: {**getattr(row, c), "fetched_at": old.isoformat()} for c in dd_data.SNAPSHOT_COLUMNS}
        await session.execute(update(DDUserData).where(DDUserData.user_id == alice.user_id)
                              .values(last_synced=old, **snapshots))
    await redis.delete(dd_data.items_key(alice.user_id))
    await profile_ctx.extras["dd_sync"].forget(alice.user_id)  # as a fresh process would
    sandbox_control.clear_requests()

    stale = (await item(alice, "dd_score")).json()["data"]
    assert stale["stale"] is True and stale["sync"] == "started"
    assert datetime.fromisoformat(stale["last_synced"]) == old
    await profile_ctx.extras["dd_sync"].drain()
    assert refreshes(sandbox_control, synced_alice) == 1

    fresh = (await item(alice, "dd_score")).json()["data"]
    assert fresh["stale"] is False and datetime.fromisoformat(fresh["last_synced"]) > old
    assert fresh.get("sync") is None


async def test_checklist_item_data_auth_and_validation(alice, bob, service, anonymous, link):
    await link(bob)
    assert (await anonymous.get("/dd-data/checklist-item-data",
                                params={"bucket_code": "dd_score"})).status_code == 401
    forbidden = await item(alice, "dd_score", user_id=str(bob.user_id))
    assert forbidden.status_code == 403
    assert (await item(service, "dd_score", user_id=str(uuid.uuid4()))).status_code == 404
    assert (await item(service, "dd_score")).status_code == 422  # service must name the user
    assert (await item(service, "dd_score", user_id=str(bob.user_id))).status_code == 200
    for bucket in ("demographics", "nope", ""):
        response = await item(alice, bucket)
        assert response.status_code == 422, bucket
    missing = await alice.client.get("/dd-data/checklist-item-data")
    assert missing.status_code == 422
    not_linked = await item(alice, "dd_score")
    assert not_linked.status_code == 409


async def test_alice_cannot_read_bobs_cached_data(alice, bob, link):
    await link(bob)
    assert (await bob.client.post(f"/dd-data/sync/{bob.user_id}")).status_code == 200
    for bucket in DD_BUCKETS:
        assert (await item(alice, bucket, user_id=str(bob.user_id))).status_code == 403
    assert (await alice.client.get(f"/dd-data/status/{bob.user_id}")).status_code == 403
    assert (await alice.client.get(f"/dd-data/sync-logs/{bob.user_id}")).status_code == 403


async def test_redis_keys_of_a_user_live_under_its_prefix(alice, synced_alice, redis):
    for bucket in DD_BUCKETS:
        await item(alice, bucket)
    keys = [k async for k in redis.scan_iter(match="*")]
    ours = [k for k in keys if str(alice.user_id) in k]
    assert ours
    assert all(k.startswith(f"sma:dd:{alice.user_id}:") for k in ours)


@pytest.mark.parametrize("values, expected", [
    ([], "stable"), ([70.0], "stable"), ([70.0, 72.5], "improving"), ([72.5, 70.0], "declining"),
    ([60.0, 71.0, 71.0], "stable"), ([71.0, 71.0, 60.0], "declining"),
])
def test_trend_rule(values, expected):
    assert dd_data.trend(values) == expected


def test_score_format_skips_days_without_data():
    doc = {"fetched_at": "2025-01-08T00:00:00+00:00", "days": {
        "2025-01-03": {"points": 70.0}, "2025-01-01": {"points": 64.0},
        "2025-01-02": None, "2025-01-04": {"points": 70.0}, "2025-01-05": None}}
    data = dd_data.format_scores(doc)
    assert [s["date"] for s in data["scores"]] == sorted(doc["days"])
    assert data["current_score"] == 70.0 and data["trend"] == "stable"
    assert data["days_with_data"] == 3
    assert dd_data.format_health_device(doc)["last_data_date"] == "2025-01-04"
