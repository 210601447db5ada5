"""POST /dd-data/sync, status and sync logs: refresh, throttle, coalescing, failures, checklist."""
from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from storage.models import ChecklistItem, DDSyncLog, DDUserData
from tests.support.dd import DD_RETRIES, DD_TIMEOUT_SECONDS, dd_uid, new_dd_token

FIVE = {"measurements", "capabilities", "biomarkers", "protocols", "dd_scores"}


@pytest.fixture
def linked(link):
    """linked(caller) -> the Don't Die uid of a freshly linked sandbox account."""
    async def _linked(caller, token: str | None = None) -> str:
        response, token = await link(caller, token=token)
        assert response.status_code == 200, response.text
        return dd_uid(token)
    return _linked


def refreshes(sandbox_control, uid: str) -> int:
    """Upstream refreshes of one account so far: each fetches its protocols exactly once."""
    return len(sandbox_control.requests(f"GET /user-health/{uid}/protocols"))


async def user_data(profile_ctx, user_id) -> DDUserData | None:
    async with profile_ctx.db.transaction() as session:
        return await session.scalar(select(DDUserData).where(DDUserData.user_id == user_id))


async def test_sync_fetches_the_five_endpoints_and_updates_the_checklist(alice, linked, sandbox_control,
                                                                         profile_ctx):
    uid = await linked(alice)
    sandbox_control.clear_requests()
    response = await alice.client.post(f"/dd-data/sync/{alice.user_id}")
    assert response.status_code == 200, response.text
    result = response.json()["data"]
    assert result["sync_status"] == "success" and result["errors"] == {}
    assert result["refreshed"] is True and result["records_synced"] > 0
    assert datetime.fromisoformat(result["last_synced"]).tzinfo is not None

    seen = sandbox_control.requests()
    assert len([r for r in seen if r.startswith("GET /account/biomarkers")]) == 3
    assert refreshes(sandbox_control, uid) == 1
    assert not [r for r in seen if r == "GET /account"]  # the uid is known from linking

    row = await user_data(profile_ctx, alice.user_id)
    today = datetime.now(timezone.utc).date()
    assert sorted(row.dd_scores["days"]) == [(today - timedelta(days=i)).isoformat()
                                             for i in range(6, -1, -1)]
    assert row.measurements["items"] and row.protocols["items"]

    status = (await alice.client.get(f"/dd-data/status/{alice.user_id}")).json()["data"]
    assert status["sync_status"] == "success" and status["sync_error"] is None
    assert status["data_available"] == {k: True for k in FIVE}
    assert status["last_synced"] == result["last_synced"]
    assert row.last_synced == datetime.fromisoformat(result["last_synced"])

    async with profile_ctx.db.transaction() as session:
        items = {i.bucket_code: i for i in await session.scalars(
            select(ChecklistItem).where(ChecklistItem.user_id == alice.user_id))}
    for bucket in ("health_device", "dd_score", "measurements", "capabilities", "biomarkers", "protocols"):
        assert items[bucket].status == "completed", bucket
        assert items[bucket].source == "Don't Die API"
    assert items["demographics"].status == "pending"
    assert items["measurements"].data_ref["records"] == len(row.measurements["items"])

    logs = (await alice.client.get(f"/dd-data/sync-logs/{alice.user_id}")).json()["data"]
    assert logs["total"] == 1
    entry = logs["items"][0]
    assert entry["status"] == "success" and entry["sync_type"] == "full"
    assert entry["records_synced"] == result["records_synced"]
    assert entry["duration_ms"] >= 0 and entry["error_message"] is None


async def test_an_empty_account_syncs_without_completing_anything(alice, linked, profile_ctx):
    await linked(alice, token=new_dd_token("empty"))
    response = await alice.client.post(f"/dd-data/sync/{alice.user_id}")
    assert response.status_code == 200
    assert response.json()["data"]["sync_status"] == "success"
    assert response.json()["data"]["records_synced"] == 0
    status = (await alice.client.get(f"/dd-data/status/{alice.user_id}")).json()["data"]
    assert status["data_available"] == {k: False for k in FIVE}
    async with profile_ctx.db.transaction() as session:
        statuses = {i.bucket_code: i.status for i in await session.scalars(
            select(ChecklistItem).where(ChecklistItem.user_id == alice.user_id))}
    assert "completed" not in statuses.values()


async def test_sync_routes_auth_and_not_found(alice, bob, service, anonymous, linked):
    await linked(bob)
    for method, path in (("post", "/dd-data/sync/{id}"), ("get", "/dd-data/status/{id}"),
                         ("get", "/dd-data/sync-logs/{id}")):
        assert (await getattr(anonymous, method)(path.format(id=bob.user_id))).status_code == 401
        forbidden = await getattr(alice.client, method)(path.format(id=bob.user_id))
        assert forbidden.status_code == 403, path
        unknown = await getattr(service.client, method)(path.format(id=uuid.uuid4()))
        assert unknown.status_code == 404, path
        invalid = await getattr(alice.client, method)(path.format(id="not-a-uuid"))
        assert invalid.status_code == 422, path
    by_service = await service.client.post(f"/dd-data/sync/{bob.user_id}")
    assert by_service.status_code == 200


async def test_sync_without_a_linked_account_is_409(alice):
    response = await alice.client.post(f"/dd-data/sync/{alice.user_id}")
    assert response.status_code == 409
    assert "link" in response.json()["error"]["message"]
    background = await alice.client.post(f"/dd-data/sync/{alice.user_id}", params={"background": "true"})
    assert background.status_code == 409
    status = (await alice.client.get(f"/dd-data/status/{alice.user_id}")).json()["data"]
    assert status["sync_status"] == "not_synced" and status["linked"] is False


async def test_throttle_and_force(alice, linked, sandbox_control):
    uid = await linked(alice)
    first = (await alice.client.post(f"/dd-data/sync/{alice.user_id}")).json()["data"]
    again = (await alice.client.post(f"/dd-data/sync/{alice.user_id}")).json()["data"]
    assert again["refreshed"] is False and again["throttled"] is True
    assert again["last_synced"] == first["last_synced"]
    assert again["records_synced"] == first["records_synced"]
    assert refreshes(sandbox_control, uid) == 1

    forced = (await alice.client.post(f"/dd-data/sync/{alice.user_id}", params={"force": "true"})).json()["data"]
    assert forced["refreshed"] is True and forced["last_synced"] > first["last_synced"]
    assert refreshes(sandbox_control, uid) == 2


async def test_concurrent_syncs_for_one_user_make_one_refresh(alice, linked, sandbox_control, count_rows):
    uid = await linked(alice)
    sandbox_control.faults(path_prefix="/", latency_ms=200)
    responses = await asyncio.gather(*(alice.client.post(f"/dd-data/sync/{alice.user_id}")
                                       for _ in range(20)))
    assert {r.status_code for r in responses} == {200}
    results = [r.json()["data"] for r in responses]
    assert refreshes(sandbox_control, uid) == 1
    assert len({r["last_synced"] for r in results}) == 1
    assert sum(r["coalesced"] for r in results) >= 1
    assert await count_rows(DDSyncLog, DDSyncLog.user_id == alice.user_id) == 1

    forced = await asyncio.gather(*(alice.client.post(f"/dd-data/sync/{alice.user_id}",
                                                      params={"force": "true"}) for _ in range(10)))
    assert {r.status_code for r in forced} == {200}
    assert refreshes(sandbox_control, uid) == 2


async def test_background_sync_is_202_with_a_status_url(alice, linked, profile_ctx):
    await linked(alice)
    response = await alice.client.post(f"/dd-data/sync/{alice.user_id}", params={"background": "true"})
    assert response.status_code == 202, response.text
    data = response.json()["data"]
    assert data["sync"] == "started"
    assert data["status_url"] == f"/dd-data/status/{alice.user_id}"
    await profile_ctx.extras["dd_sync"].drain()
    status = await alice.client.get(data["status_url"])
    assert status.json()["data"]["sync_status"] == "success"
    again = await alice.client.post(f"/dd-data/sync/{alice.user_id}", params={"background": "true"})
    assert again.status_code == 202 and again.json()["data"]["sync"] == "fresh"


async def test_a_failing_endpoint_keeps_its_previous_snapshot(alice, linked, sandbox_control, profile_ctx):
    await linked(alice)
    assert (await alice.client.post(f"/dd-data/sync/{alice.user_id}")).status_code == 200
    before = await user_data(profile_ctx, alice.user_id)

    sandbox_control.faults(path_prefix="/account/biomarkers", fail_status=500)
    response = await alice.client.post(f"/dd-data/sync/{alice.user_id}", params={"force": "true"})
    assert response.status_code == 200, response.text
    result = response.json()["data"]
    assert result["sync_status"] == "partial"
    assert set(result["errors"]) == {"measurements", "capabilities", "biomarkers"}
    assert "HTTP 500" in result["errors"]["measurements"]

    after = await user_data(profile_ctx, alice.user_id)
    assert after.measurements == before.measurements  # kept, with its old fetched_at
    assert after.protocols["fetched_at"] > before.protocols["fetched_at"]
    assert after.sync_status == "partial" and "measurements" in after.sync_error
    status = (await alice.client.get(f"/dd-data/status/{alice.user_id}")).json()["data"]
    assert status["data_available"]["measurements"] is True

    item = (await alice.client.get("/dd-data/checklist-item-data",
                                   params={"bucket_code": "measurements"})).json()["data"]
    assert datetime.fromisoformat(item["last_synced"]) == datetime.fromisoformat(
        before.measurements["fetched_at"])

    logs = (await alice.client.get(f"/dd-data/sync-logs/{alice.user_id}")).json()["data"]["items"]
    assert [entry["status"] for entry in logs] == ["partial", "success"]
    assert "measurements" in logs[0]["error_message"]

    # a throttled answer after a partial sync still reports what failed
    throttled = (await alice.client.post(f"/dd-data/sync/{alice.user_id}")).json()["data"]
    assert throttled["throttled"] is True and set(throttled["errors"]) == set(result["errors"])


async def test_failed_score_days_keep_their_previous_values(alice, linked, sandbox_control, profile_ctx):
    uid = await linked(alice)
    assert (await alice.client.post(f"/dd-data/sync/{alice.user_id}")).status_code == 200
    before = (await user_data(profile_ctx, alice.user_id)).dd_scores["days"]
    sandbox_control.faults(path_prefix=f"/user-profile/{uid}/score-v2", fail_status=404, fail_count=2)
    result = (await alice.client.post(f"/dd-data/sync/{alice.user_id}", params={"force": "true"})).json()["data"]
    assert result["sync_status"] == "partial"
    assert result["errors"]["dd_scores"].startswith("2 of 7 days failed")
    assert (await user_data(profile_ctx, alice.user_id)).dd_scores["days"] == before


async def test_every_endpoint_failing_is_502_and_is_not_throttled(alice, linked, sandbox_control,
                                                                  profile_ctx):
    uid = await linked(alice)
    sandbox_control.faults(path_prefix="/", fail_status=500)
    response = await alice.client.post(f"/dd-data/sync/{alice.user_id}")
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_error"
    assert set(error["details"]["errors"]) == FIVE
    row = await user_data(profile_ctx, alice.user_id)
    assert row.sync_status == "error" and row.last_synced is None

    sandbox_control.clear_faults()
    retry = await alice.client.post(f"/dd-data/sync/{alice.user_id}")
    assert retry.status_code == 200 and retry.json()["data"]["refreshed"] is True
    logs = (await alice.client.get(f"/dd-data/sync-logs/{alice.user_id}")).json()["data"]["items"]
    assert [entry["status"] for entry in logs] == ["success", "error"]


async def test_rejected_credentials_upstream(alice, linked, sandbox_control):
    await linked(alice)
    sandbox_control.faults(path_prefix="/", fail_status=401)
    response = await alice.client.post(f"/dd-data/sync/{alice.user_id}")
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "dontdie_credentials_rejected"
    assert "link the account again" in response.json()["error"]["message"]


async def test_a_hanging_upstream_is_504_within_the_timeout(alice, linked, sandbox_control):
    await linked(alice)
    sandbox_control.faults(path_prefix="/", hang=True)
    started = time.monotonic()
    response = await alice.client.post(f"/dd-data/sync/{alice.user_id}")
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert elapsed < (1 + DD_RETRIES) * DD_TIMEOUT_SECONDS + 2.5, elapsed


async def test_sync_logs_paging(alice, linked):
    await linked(alice)
    for _ in range(3):
        assert (await alice.client.post(f"/dd-data/sync/{alice.user_id}",
                                        params={"force": "true"})).status_code == 200
    page = (await alice.client.get(f"/dd-data/sync-logs/{alice.user_id}", params={"limit": 2})).json()["data"]
    assert page["total"] == 3 and len(page["items"]) == 2 and page["limit"] == 2
    assert page["items"][0]["created_at"] >= page["items"][1]["created_at"]
    default = (await alice.client.get(f"/dd-data/sync-logs/{alice.user_id}")).json()["data"]
    assert default["limit"] == 10 and len(default["items"]) == 3
    for limit in (0, 101, "x"):
        response = await alice.client.get(f"/dd-data/sync-logs/{alice.user_id}", params={"limit": limit})
        assert response.status_code == 422
