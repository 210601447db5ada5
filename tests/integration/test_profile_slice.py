"""Users, self-models, beliefs and measurements (SPEC §4.2) through the profile app."""
from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from tests.support.envelope import data, error

BAD_ID = "not-a-uuid"


def utc(text: str) -> datetime:
    parsed = datetime.fromisoformat(text)
    assert parsed.utcoffset() == timedelta(0), text
    return parsed






# --- users -----------------------------------------------------------------------------------

async def test_service_creates_and_lists_users(service):
    created = await service.client.post("/createUser", json={"dontdie_uid": "dd-123"})
    assert created.status_code == 201
    user = data(created)
    assert user["dontdie_uid"] == "dd-123"
    utc(user["created_at"])
    listed = data(await service.client.get("/listUsers", params={"limit": 1}))
    assert listed["limit"] == 1 and listed["offset"] == 0 and listed["total"] >= 1
    assert listed["items"][0]["id"] == user["id"]


async def test_duplicate_dontdie_uid_names_the_existing_user(service):
    first = data(await service.client.post("/createUser", json={"dontdie_uid": "dd-dup"}))
    again = await service.client.post("/createUser", json={"dontdie_uid": "dd-dup"})
    err = error(again, 409, "conflict")
    assert err["details"]["existing_user_id"] == first["id"]


async def test_create_user_with_explicit_id_and_duplicate(service):
    user_id = str(uuid.uuid4())
    assert data(await service.client.post("/createUser", json={"user_id": user_id}))["id"] == user_id
    error(await service.client.post("/createUser", json={"user_id": user_id}), 409)


async def test_user_tokens_cannot_create_or_list_users(alice):
    error(await alice.client.post("/createUser", json={}), 403, "forbidden")
    error(await alice.client.get("/listUsers"), 403, "forbidden")


async def test_get_user_own_foreign_unknown_malformed(alice, bob, service):
    assert data(await alice.client.get("/getUser", params={"user_id": str(alice.user_id)}))["id"] == str(alice.user_id)
    error(await alice.client.get("/getUser", params={"user_id": str(bob.user_id)}), 403)
    assert data(await service.client.get("/getUser", params={"user_id": str(bob.user_id)}))["id"] == str(bob.user_id)
    error(await service.client.get("/getUser", params={"user_id": str(uuid.uuid4())}), 404, "not_found")
    err = error(await alice.client.get("/getUser", params={"user_id": BAD_ID}), 422, "validation_error")
    assert err["details"][0]["loc"] == ["query", "user_id"]


@pytest.mark.parametrize("limit,offset", [(0, 0), (101, 0), (10, -1)])
async def test_pagination_bounds(service, limit, offset):
    error(await service.client.get("/listUsers", params={"limit": limit, "offset": offset}), 422)


# --- self-models and beliefs -----------------------------------------------------------------

async def test_self_model_is_idempotent_with_default_system(alice):
    uid = str(alice.user_id)
    error(await alice.client.get("/getSelfModel", params={"user_id": uid}), 404)
    first = data(await alice.client.post("/upsertSelfModel", json={"user_id": uid}))
    second = data(await alice.client.post("/upsertSelfModel", json={"user_id": uid}))
    assert first["id"] == second["id"]
    assert [s["name"] for s in second["belief_systems"]] == ["default"]


async def test_concurrent_self_model_upserts_make_one(alice):
    uid = str(alice.user_id)
    results = await asyncio.gather(*(alice.client.post("/upsertSelfModel", json={"user_id": uid})
                                     for _ in range(8)))
    ids = {data(r)["id"] for r in results}
    assert len(ids) == 1


async def test_belief_create_update_delete_and_tree(alice):
    uid = str(alice.user_id)
    created = await alice.client.post("/upsertBelief", json={
        "user_id": uid, "statement": "Sleep drives my mood", "confidence": 0.7, "belief_type": "CAUSAL"})
    assert created.status_code == 201
    belief = data(created)
    updated = data(await alice.client.post("/upsertBelief", json={
        "id": belief["id"], "statement": "Sleep strongly drives my mood", "confidence": 0.9}))
    assert updated["id"] == belief["id"] and updated["confidence"] == 0.9
    assert updated["belief_type"] == "CAUSAL"
    tree = data(await alice.client.get("/getSelfModel", params={"user_id": uid}))
    statements = [b["statement"] for s in tree["belief_systems"] for b in s["beliefs"]]
    assert statements == ["Sleep strongly drives my mood"]
    deleted = await alice.client.delete("/deleteBelief", params={"belief_id": belief["id"]})
    assert deleted.status_code == 204
    error(await alice.client.delete("/deleteBelief", params={"belief_id": belief["id"]}), 404)


async def test_belief_in_named_and_explicit_systems(alice):
    uid = str(alice.user_id)
    system = data(await alice.client.post("/upsertBeliefSystem", json={"user_id": uid, "name": "sleep"}))
    again = data(await alice.client.post("/upsertBeliefSystem", json={"user_id": uid, "name": "sleep"}))
    assert system["id"] == again["id"]
    by_id = data(await alice.client.post("/upsertBelief", json={
        "belief_system_id": system["id"], "statement": "8h is enough", "confidence": 0.5}))
    assert by_id["belief_system_id"] == system["id"]
    by_name = data(await alice.client.post("/upsertBelief", json={
        "user_id": uid, "belief_system_name": "sleep", "statement": "Naps help", "confidence": 0.2}))
    assert by_name["belief_system_id"] == system["id"]


async def test_user_token_may_omit_user_id_for_its_own_beliefs(alice):
    belief = data(await alice.client.post("/upsertBelief", json={"statement": "x", "confidence": 0.1}))
    tree = data(await alice.client.get("/getSelfModel", params={"user_id": str(alice.user_id)}))
    assert tree["belief_systems"][0]["beliefs"][0]["id"] == belief["id"]


async def test_beliefs_are_private(alice, bob):
    belief = data(await alice.client.post("/upsertBelief", json={
        "user_id": str(alice.user_id), "statement": "mine", "confidence": 0.5}))
    system_id = belief["belief_system_id"]
    error(await bob.client.post("/upsertBelief", json={"id": belief["id"], "statement": "hijack", "confidence": 0.1}), 404)
    error(await bob.client.delete("/deleteBelief", params={"belief_id": belief["id"]}), 404)
    error(await bob.client.post("/upsertBelief", json={
        "belief_system_id": system_id, "statement": "x", "confidence": 0.1}), 404)
    error(await bob.client.post("/upsertBelief", json={
        "user_id": str(alice.user_id), "statement": "x", "confidence": 0.1}), 403)
    error(await bob.client.get("/getSelfModel", params={"user_id": str(alice.user_id)}), 403)
    error(await bob.client.post("/upsertSelfModel", json={"user_id": str(alice.user_id)}), 403)
    error(await bob.client.post("/upsertBeliefSystem", json={"user_id": str(alice.user_id), "name": "n"}), 403)


@pytest.mark.parametrize("body", [
    {"statement": "x", "confidence": 1.5},
    {"statement": "x", "confidence": -0.1},
    {"statement": "x", "confidence": "NaN"},
    {"statement": "", "confidence": 0.5},
    {"statement": "x" * 2001, "confidence": 0.5},
    {"statement": "x", "confidence": 0.5, "belief_system_id": "nope"},
    {"statement": "x", "confidence": 0.5, "unknown_field": 1},
    {"confidence": 0.5},
])
async def test_belief_validation(alice, body):
    error(await alice.client.post("/upsertBelief", json=body), 422, "validation_error")


async def test_unknown_belief_and_system_ids(alice):
    error(await alice.client.post("/upsertBelief", json={
        "id": str(uuid.uuid4()), "statement": "x", "confidence": 0.5}), 404)
    error(await alice.client.post("/upsertBelief", json={
        "belief_system_id": str(uuid.uuid4()), "statement": "x", "confidence": 0.5}), 404)


async def test_service_must_name_a_user(service):
    error(await service.client.post("/upsertBelief", json={"statement": "x", "confidence": 0.5}), 422)


# --- measurements ----------------------------------------------------------------------------

async def test_measurement_upsert_is_idempotent_and_utc(alice):
    uid = str(alice.user_id)
    body = {"user_id": uid, "type": "weight", "value": 70.5, "unit": "kg",
            "captured_at": "2026-01-01T08:00:00+02:00", "source": "scale"}
    first = data(await alice.client.post("/upsertMeasurement", json=body))
    assert utc(first["captured_at"]) == datetime(2026, 1, 1, 6, tzinfo=timezone.utc)
    second = data(await alice.client.post("/upsertMeasurement", json={**body, "value": 71.0}))
    assert second["id"] == first["id"] and second["value"] == 71.0
    naive = data(await alice.client.post("/upsertMeasurement", json={
        **body, "captured_at": "2026-01-02T06:00:00", "source": None}))
    assert utc(naive["captured_at"]) == datetime(2026, 1, 2, 6, tzinfo=timezone.utc)
    page = data(await alice.client.get("/listMeasurements", params={"user_id": uid}))
    assert page["total"] == 2
    assert [utc(m["captured_at"]).day for m in page["items"]] == [2, 1]


async def test_list_measurements_filters(alice):
    uid = str(alice.user_id)
    for day, kind in [(1, "weight"), (2, "steps"), (3, "weight"), (4, "weight")]:
        await alice.client.post("/upsertMeasurement", json={
            "user_id": uid, "type": kind, "value": day, "unit": "u", "captured_at": f"2026-03-0{day}T00:00:00Z"})
    page = data(await alice.client.get("/listMeasurements", params={
        "user_id": uid, "type": "weight", "since": "2026-03-02T00:00:00Z", "until": "2026-03-03T23:00:00Z"}))
    assert [m["value"] for m in page["items"]] == [3]
    page = data(await alice.client.get("/listMeasurements", params={"user_id": uid, "limit": 2, "offset": 1}))
    assert page["total"] == 4 and [m["value"] for m in page["items"]] == [3, 2]


@pytest.mark.parametrize("patch", [
    {"value": "Infinity"}, {"value": "NaN"}, {"value": "heavy"}, {"type": ""}, {"unit": "  "},
    {"captured_at": "yesterday"}, {"user_id": "x"}, {"type": "t" * 201},
])
async def test_measurement_validation(alice, patch):
    body = {"user_id": str(alice.user_id), "type": "weight", "value": 70, "unit": "kg",
            "captured_at": "2026-01-01T00:00:00Z", **patch}
    error(await alice.client.post("/upsertMeasurement", json=body), 422)


async def test_measurements_are_private(alice, bob, service):
    body = {"user_id": str(alice.user_id), "type": "weight", "value": 70, "unit": "kg",
            "captured_at": "2026-01-01T00:00:00Z"}
    error(await bob.client.post("/upsertMeasurement", json=body), 403)
    error(await bob.client.get("/listMeasurements", params={"user_id": str(alice.user_id)}), 403)
    assert (await service.client.post("/upsertMeasurement", json=body)).status_code == 200
    error(await service.client.post("/upsertMeasurement", json={**body, "user_id": str(uuid.uuid4())}), 404)


async def test_nul_characters_are_422_on_every_database(alice):
    body = {"user_id": str(alice.user_id), "type": "a\x00b", "value": 1, "unit": "kg",
            "captured_at": "2026-01-01T00:00:00Z"}
    error(await alice.client.post("/upsertMeasurement", json=body), 422)
    listed = await alice.client.get("/listMeasurements", params={"user_id": str(alice.user_id), "type": "x\x00"})
    assert listed.status_code in (200, 422), listed.text
