"""The dontdie app (SPEC §5) against the sandbox: every route, whose credentials, error mapping."""
from __future__ import annotations

import time
import uuid
from datetime import date, timedelta

import pytest

from tests.support.dd import CLIENT_ID, DD_RETRIES, DD_TIMEOUT_SECONDS, dd_uid, new_dd_token


@pytest.fixture
async def alice_dd(alice, link, dd_client):
    """Alice with a linked account, and her client for the dontdie app."""
    response, token = await link(alice)
    assert response.status_code == 200, response.text
    return {"client": dd_client(alice), "token": token, "uid": dd_uid(token)}


def explicit(token: str, client_id: str = CLIENT_ID) -> dict[str, str]:
    return {"X-DD-Token": token, "X-DD-Client-Id": client_id}


async def test_get_account_with_the_linked_account(alice_dd):
    response = await alice_dd["client"].get("/getAccount")
    assert response.status_code == 200, response.text
    account = response.json()["data"]
    assert account["id"] == alice_dd["uid"]
    assert account["name"].startswith("Sandbox User")


async def test_get_account_with_explicit_headers(service, dd_client):
    token = new_dd_token()
    response = await dd_client(service).get("/getAccount", headers=explicit(token))
    assert response.status_code == 200, response.text
    assert response.json()["data"]["id"] == dd_uid(token)
    assert token not in response.text


async def test_no_credentials_is_409_with_a_clear_message(alice, service, dd_client):
    for caller in (alice, service):  # alice has no link; a service token names no user
        response = await dd_client(caller).get("/getAccount")
        assert response.status_code == 409
        message = response.json()["error"]["message"]
        assert "X-DD-Token" in message and "link" in message


async def test_service_token_uses_the_named_users_link(service, alice_dd, dd_client, alice):
    response = await dd_client(service).get("/getAccount", params={"user_id": str(alice.user_id)})
    assert response.status_code == 200
    assert response.json()["data"]["id"] == alice_dd["uid"]
    unknown = await dd_client(service).get("/getAccount", params={"user_id": str(uuid.uuid4())})
    assert unknown.status_code == 404
    invalid = await dd_client(service).get("/getAccount", params={"user_id": "nope"})
    assert invalid.status_code == 422


async def test_users_cannot_use_each_others_links(alice_dd, bob, dd_client, alice):
    response = await dd_client(bob).get("/getAccount", params={"user_id": str(alice.user_id)})
    assert response.status_code == 403
    # and never fall back to anyone else's account
    own = await dd_client(bob).get("/getAccount")
    assert own.status_code == 409


async def test_auth_is_required(dd_client):
    response = await dd_client(None).get("/getAccount", headers=explicit(new_dd_token()))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


async def test_half_explicit_credentials_are_422(service, dd_client):
    response = await dd_client(service).get("/getAccount", headers={"X-DD-Token": new_dd_token()})
    assert response.status_code == 422
    assert "X-DD-Client-Id" in response.json()["error"]["message"]


async def test_dd_score_forms(alice_dd):
    client = alice_dd["client"]
    today = date.today()
    one = await client.get("/getDdScore", params={"date": today.isoformat()})
    assert one.status_code == 200, one.text
    assert list(one.json()["data"]["scores"]) == [today.isoformat()]

    start = today - timedelta(days=9)
    ranged = await client.get("/getDdScore", params={"start_date": start.isoformat(),
                                                     "end_date": today.isoformat()})
    data = ranged.json()["data"]
    assert data["days"] == 10 and data["start_date"] == start.isoformat()
    assert sorted(data["scores"]) == [(start + timedelta(days=i)).isoformat() for i in range(10)]
    for result in data["scores"].values():
        assert "score" in result  # a score object or null (no device data that day)

    prior = await client.get("/getDdScore", params={"date": today.isoformat(), "days": 7})
    assert sorted(prior.json()["data"]["scores"]) == [
        (today - timedelta(days=i)).isoformat() for i in range(6, -1, -1)]

    longest = await client.get("/getDdScore", params={"date": today.isoformat(), "days": 366})
    assert longest.status_code == 200
    assert len(longest.json()["data"]["scores"]) == 366


@pytest.mark.parametrize("params", [
    {},
    {"date": "2025-01-01", "start_date": "2024-12-01", "end_date": "2024-12-31"},
    {"start_date": "2024-12-01"},
    {"end_date": "2024-12-01"},
    {"days": 7},
    {"start_date": "2024-12-31", "end_date": "2024-12-01"},
    {"start_date": "2023-01-01", "end_date": "2024-01-02"},  # 367 days
    {"date": "2025-01-01", "days": 367},
    {"date": "2025-01-01", "days": 0},
    {"date": "2025-13-01"},
    {"date": "yesterday"},
    {"start_date": "2024-12-01", "end_date": "2024-12-02", "days": 2},
    {"date": "0001-01-02", "days": 3},
])
async def test_dd_score_validation(alice_dd, params, sandbox_control):
    sandbox_control.clear_requests()
    response = await alice_dd["client"].get("/getDdScore", params=params)
    assert response.status_code == 422, (params, response.text)
    assert response.json()["error"]["code"] == "validation_error"
    assert not sandbox_control.requests("score-v2")


async def test_a_failed_day_is_an_error_object(alice_dd, sandbox_control):
    # a 404 is not retried, so exactly one of the seven days fails
    sandbox_control.faults(path_prefix=f"/user-profile/{alice_dd['uid']}/score-v2",
                           fail_status=404, fail_count=1)
    response = await alice_dd["client"].get("/getDdScore", params={"date": date.today().isoformat(),
                                                                   "days": 7})
    assert response.status_code == 200
    scores = response.json()["data"]["scores"]
    failed = [d for d, r in scores.items() if "error" in r]
    assert len(failed) == 1
    assert scores[failed[0]]["status_code"] == 404


async def test_biomarker_categories(alice_dd):
    client = alice_dd["client"]
    for route, sample in (("/getMeasurements", "Weight"), ("/getCapabilities", "Grip Strength"),
                          ("/getBiomarkers", "LDL Cholesterol")):
        response = await client.get(route)
        assert response.status_code == 200, response.text
        readings = response.json()["data"]
        assert sample in {r["biomarkerName"] for r in readings}
        assert {"value", "measurementUnit", "dateMeasured", "isSelfReported"} <= set(readings[0])
    every = await client.get("/getAllBiomarkers")
    assert set(every.json()["data"]) == {"Measurements", "Capabilities", "Biomarkers"}


async def test_a_failed_category_is_an_error_object(alice_dd, sandbox_control):
    sandbox_control.faults(path_prefix="/account/biomarkers", fail_status=404, fail_count=1)
    response = await alice_dd["client"].get("/getAllBiomarkers")
    assert response.status_code == 200
    failed = [v for v in response.json()["data"].values() if isinstance(v, dict)]
    assert len(failed) == 1 and failed[0]["status_code"] == 404


async def test_protocols_create_and_list(alice_dd):
    client = alice_dd["client"]
    created = await client.post("/createUserProtocol", json={
        "name": "Morning Light", "description": "Ten minutes of sunlight after waking",
        "category": "Sleep", "type": "Habit"})
    assert created.status_code == 201, created.text
    protocol = created.json()["data"]
    assert protocol["status"] == "Draft" and protocol["name"] == "Morning Light"

    section = await client.post("/createUserProtocolSection", params={"protocol_id": protocol["id"]},
                                json={"title": "When", "content": "Within 30 minutes of waking"})
    assert section.status_code == 201, section.text
    assert section.json()["data"]["protocolId"] == protocol["id"]

    listed = await client.get("/getUserProtocols")
    assert protocol["id"] in {p["id"] for p in listed.json()["data"]}
    assert all("sections" not in p for p in listed.json()["data"])
    with_sections = await client.get("/getUserProtocols", params={"include_sections": "true"})
    ours = next(p for p in with_sections.json()["data"] if p["id"] == protocol["id"])
    assert [s["title"] for s in ours["sections"]] == ["When"]


async def test_protocol_validation_and_upstream_404(alice_dd):
    client = alice_dd["client"]
    assert (await client.post("/createUserProtocol", json={})).status_code == 422
    assert (await client.post("/createUserProtocol", json={"name": "x", "status": "Bogus"})).status_code == 422
    assert (await client.post("/createUserProtocol", json={"name": "x", "unknown": 1})).status_code == 422
    bad_id = await client.post("/createUserProtocolSection", params={"protocol_id": "../../account"},
                               json={"title": "t"})
    assert bad_id.status_code == 422
    unknown = await client.post("/createUserProtocolSection", params={"protocol_id": str(uuid.uuid4())},
                                json={"title": "t"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "upstream_client_error"


async def test_upstream_401_is_passed_through(service, dd_client):
    response = await dd_client(service).get("/getAccount", headers=explicit("expired-token"))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "upstream_client_error"
    assert "expired-token" not in response.text


async def test_upstream_500_is_502(alice_dd, sandbox_control):
    sandbox_control.faults(path_prefix="/account", fail_status=500)
    response = await alice_dd["client"].get("/getMeasurements")
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    # retried (GET), then given up
    assert len(sandbox_control.requests("GET /account/biomarkers")) == 1 + DD_RETRIES


async def test_hanging_upstream_is_504_within_the_timeout(alice_dd, sandbox_control):
    sandbox_control.faults(path_prefix="/", hang=True)
    started = time.monotonic()
    response = await alice_dd["client"].get("/getAccount")
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    budget = (1 + DD_RETRIES) * DD_TIMEOUT_SECONDS + 1.5  # attempts plus backoff
    assert elapsed < budget, elapsed


async def test_ready_checks_the_upstream(dontdie_app, dd_client, settings):
    client = dd_client(None)
    ready = await client.get("/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["data"]["dependencies"]["dontdie_api"]["ok"] is True


async def test_ready_fails_when_the_upstream_is_unreachable(settings, profile_ctx):
    from api.context import AppContext
    from api.dontdie_app import build_dontdie_app
    from sandbox.server import free_port
    from tests.support.actors import asgi_client

    ctx = AppContext.from_settings("dontdie", settings.model_copy(
        update={"dontdie_base_url": f"http://127.0.0.1:{free_port()}"}))
    client = asgi_client(build_dontdie_app(ctx.settings, ctx=ctx))
    try:
        ready = await client.get("/ready")
        assert ready.status_code == 503
        detail = ready.json()["error"]["details"]["dependencies"]["dontdie_api"]
        assert detail["ok"] is False and "unreachable" in detail["error"]
    finally:
        await client.aclose()
        await ctx.aclose()
