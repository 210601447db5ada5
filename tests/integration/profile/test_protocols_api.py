"""Protocol templates and personalised protocols (SPEC §4.5)."""
from __future__ import annotations

import uuid

import pytest
from sqlalchemy import delete

from _profile_helpers import add_measurement, data, error, on_day
from storage.models import ProtocolTemplate

HABITS = {"sleep", "exercise", "nutrition", "hydration", "mindfulness", "recovery", "social"}
PREFIX = "test-protocols-"


@pytest.fixture
async def template_names(profile_ctx):
    """Unique names for templates a test creates; they are removed afterwards, because the
    shared cleanup keeps the (seeded) protocoltemplate table."""
    names: list[str] = []

    def make() -> str:
        names.append(f"{PREFIX}{uuid.uuid4().hex[:10]}")
        return names[-1]

    yield make
    async with profile_ctx.db.transaction() as session:
        await session.execute(delete(ProtocolTemplate).where(ProtocolTemplate.name.in_(names)))


async def _template_id(caller, name: str) -> str:
    items = data(await caller.client.get("/listProtocolTemplates", params={"limit": 100}))["items"]
    return next(t["id"] for t in items if t["name"] == name)


async def _generate(caller, user_id, template_id: str, **extra):
    return await caller.client.post("/generateProtocol", json={
        "user_id": str(user_id), "template_id": template_id, **extra})


async def _belief(caller, statement: str, confidence: float):
    return data(await caller.client.post("/upsertBelief", json={
        "user_id": str(caller.user_id), "statement": statement, "confidence": confidence}), 201)


# --- templates -----------------------------------------------------------------------------------

async def test_seeded_templates_cover_every_habit(alice):
    page = data(await alice.client.get("/listProtocolTemplates", params={"limit": 100}))
    seeded = [t for t in page["items"] if not t["name"].startswith(PREFIX)]
    assert len(seeded) >= 10 and page["total"] == len(page["items"])
    assert {t["habit_type"] for t in seeded} >= HABITS
    assert [(t["habit_type"], t["name"]) for t in page["items"]] == sorted(
        (t["habit_type"], t["name"]) for t in page["items"])
    for t in seeded:
        assert t["cue"] and t["routine"] and t["reward"] and t["is_active"]
        dd = t["dd_protocol_json"]
        assert set(dd) >= {"name", "description", "goal", "category", "type"}
        assert dd["name"] == t["name"] and dd["type"] == "Habit"
        assert dd["category"].lower() == t["habit_type"]


async def test_filter_and_paginate_templates(alice, service):
    sleep = data(await alice.client.get("/listProtocolTemplates", params={"habit_type": "sleep"}))
    assert sleep["total"] >= 2 and {t["habit_type"] for t in sleep["items"]} == {"sleep"}
    everything = data(await service.client.get("/listProtocolTemplates", params={"limit": 100}))
    first = data(await service.client.get("/listProtocolTemplates", params={"limit": 5}))
    second = data(await service.client.get("/listProtocolTemplates", params={"limit": 5, "offset": 5}))
    assert first["total"] == second["total"] == everything["total"]
    assert [t["id"] for t in first["items"] + second["items"]] == [t["id"] for t in everything["items"][:10]]
    none = data(await alice.client.get("/listProtocolTemplates", params={"habit_type": "juggling"}))
    assert none == {"items": [], "total": 0, "limit": 50, "offset": 0}
    for params in ({"limit": 0}, {"offset": -1}, {"habit_type": "x" * 65}, {"habit_type": "a\x00"}):
        error(await alice.client.get("/listProtocolTemplates", params=params), 422)


async def test_admin_creates_templates(admin, alice, service, anonymous, template_names):
    name = template_names()
    body = {"habit_type": "Stress", "name": name, "cue": "After the last meeting of the day.",
            "routine": "Walk around the block without your phone.", "reward": "A quiet cup of tea."}
    created = data(await admin.client.post("/createProtocolTemplate", json=body), 201)
    assert created["habit_type"] == "stress" and created["is_active"] is True
    assert created["dd_protocol_json"] == {"name": name, "description": body["routine"],
                                           "goal": body["reward"], "category": "Stress", "type": "Habit"}
    listed = data(await alice.client.get("/listProtocolTemplates", params={"habit_type": "stress"}))
    assert [t["id"] for t in listed["items"]] == [created["id"]]
    err = error(await admin.client.post("/createProtocolTemplate", json=body), 409, "conflict")
    assert err["details"]["existing_template_id"] == created["id"]
    error(await alice.client.post("/createProtocolTemplate", json={**body, "name": template_names()}), 403)
    error(await service.client.post("/createProtocolTemplate", json={**body, "name": template_names()}), 403)
    error(await anonymous.post("/createProtocolTemplate", json=body), 401)
    custom = data(await admin.client.post("/createProtocolTemplate", json={
        **body, "name": template_names(), "habit_type": "sleep",
        "dd_protocol_json": {"goal": "Calm evenings", "category": "Sleep"}}), 201)
    assert custom["dd_protocol_json"]["goal"] == "Calm evenings"
    assert custom["dd_protocol_json"]["description"] == body["routine"]
    for bad in ({**body, "habit_type": "sleep hygiene!"}, {**body, "cue": ""},
                {**body, "name": "x" * 201}, {k: v for k, v in body.items() if k != "reward"},
                {**body, "extra": True}, {**body, "dd_protocol_json": {"color": "red"}},
                {**body, "routine": "a\x00b"}):
        error(await admin.client.post("/createProtocolTemplate", json=bad), 422)


async def test_inactive_templates_are_hidden(admin, alice, template_names):
    name = template_names()
    created = data(await admin.client.post("/createProtocolTemplate", json={
        "habit_type": "social", "name": name, "cue": "c", "routine": "r", "reward": "w",
        "is_active": False}), 201)
    listed = data(await alice.client.get("/listProtocolTemplates", params={"limit": 100}))
    assert created["id"] not in [t["id"] for t in listed["items"]]
    error(await _generate(alice, alice.user_id, created["id"]), 404)


# --- generateProtocol ----------------------------------------------------------------------------

async def _sleepy(caller, hours: list[float]):
    for days_ago, value in enumerate(hours):
        await add_measurement(caller.client, caller.user_id, "sleep_hours", value, on_day(days_ago, 7),
                              unit="h")


async def test_generation_is_personalised_from_the_users_data(alice, bob):
    template_id = await _template_id(alice, "Screen-Free Wind-Down")
    await _sleepy(alice, [5.5, 5.5, 5.5, 5.5])
    await _belief(alice, "I can't fall asleep before midnight", 0.9)
    await _sleepy(bob, [8.0, 8.0, 8.0, 8.0])
    await _belief(bob, "I sleep well when I keep a routine", 0.9)
    data(await bob.client.post("/markChecklistItem", json={"bucket_code": "protocols", "status": "completed"}))
    data(await bob.client.post("/markChecklistItem", json={"bucket_code": "measurements", "status": "completed"}))
    data(await bob.client.post("/markChecklistItem", json={"bucket_code": "health_device", "status": "completed"}))

    mine = data(await _generate(alice, alice.user_id, template_id))
    theirs = data(await _generate(bob, bob.user_id, template_id))
    assert mine["template_id"] == template_id and mine["user_id"] == str(alice.user_id)
    assert mine["dontdie_protocol_id"] is None
    p, q = mine["protocol"], theirs["protocol"]
    assert p["habit_type"] == q["habit_type"] == "sleep"
    assert p["schedule"] != q["schedule"] and p["routine"] != q["routine"]
    # alice: 5.5 h → target 7 h, bedtime 15 min earlier per week for 6 weeks, smaller start
    assert p["schedule"]["targets"]["sleep_hours"] == 7.0
    assert p["schedule"]["targets"]["weeks_to_target"] == 6
    assert len(p["schedule"]["phases"]) == 2
    assert p["schedule"]["phases"][0]["minutes_per_day"] < p["schedule"]["minutes_per_day"]
    assert p["schedule"]["time_of_day"] == "evening"
    text = " ".join(mine["rationale"])
    assert "5.5 h" in text and "4 days with data" in text
    assert "I can't fall asleep before midnight" in text and "0.90" in text
    assert "“Protocols” is pending" in text and "“Measurements” is pending" in text
    assert "log your sleep hours" in p["routine"]
    # bob: 8 h → keep 8 h, confident, nothing missing → one phase, no logging step
    assert q["schedule"]["targets"] == {"sleep_hours": 8.0}
    assert len(q["schedule"]["phases"]) == 1
    their_text = " ".join(theirs["rationale"])
    assert "8.0 h" in their_text and "I sleep well when I keep a routine" in their_text
    assert "log your" not in q["routine"]
    # the Don't Die-shaped protocol
    dd = p["dd_protocol"]
    assert dd["category"] == "Sleep" and dd["type"] == "Habit" and dd["status"] == "Draft"
    assert dd["name"] == p["name"] and [s["title"] for s in dd["sections"]] == [
        "Cue", "Routine", "Reward", "Schedule"]


async def test_generation_is_deterministic(alice, service):
    template_id = await _template_id(alice, "Daily Brisk Walk")
    for days_ago, steps in enumerate([3000, 3500, 4200]):
        await add_measurement(alice.client, alice.user_id, "steps", steps, on_day(days_ago), unit="steps")
    await _belief(alice, "Walking every day is easy for me", 0.6)
    first = (await _generate(alice, alice.user_id, template_id)).json()
    again = (await _generate(alice, alice.user_id, template_id)).json()
    by_service = (await _generate(service, alice.user_id, template_id)).json()
    assert first == again == by_service
    schedule = first["data"]["protocol"]["schedule"]
    assert schedule["intensity"] == "low" and schedule["days_per_week"] == 3
    assert schedule["targets"]["daily_steps"] == 4500
    assert any("3,567 steps" in r for r in first["data"]["rationale"])
    # more data → a different plan
    for days_ago in range(3, 6):
        await add_measurement(alice.client, alice.user_id, "steps", 12000, on_day(days_ago), unit="steps")
    changed = (await _generate(alice, alice.user_id, template_id)).json()
    assert changed["data"]["protocol"]["schedule"] != schedule


async def test_units_are_converted(alice):
    template_id = await _template_id(alice, "Morning Glass of Water")
    await add_measurement(alice.client, alice.user_id, "Body Weight", 176.37, on_day(1), unit="lbs")
    await add_measurement(alice.client, alice.user_id, "water", 1.0, on_day(1), unit="L")
    out = data(await _generate(alice, alice.user_id, template_id))
    targets = out["protocol"]["schedule"]["targets"]
    assert targets["water_ml"] == 2750          # 80 kg × 33 ml, to the nearest 250
    assert targets["weeks_to_target"] == 7      # 1,750 ml short, 250 ml a week
    text = " ".join(out["rationale"])
    assert "80.0 kg" in text and "1,000 ml" in text


async def test_preferences_are_respected(alice):
    template_id = await _template_id(alice, "Screen-Free Wind-Down")
    out = data(await _generate(alice, alice.user_id, template_id, preferences={
        "time_of_day": "afternoon", "intensity": "high", "minutes_per_day": 25}))
    schedule = out["protocol"]["schedule"]
    assert schedule["time_of_day"] == "afternoon" and schedule["start_time"] == "13:00"
    assert schedule["intensity"] == "high" and schedule["minutes_per_day"] == 25
    assert "as you asked" in " ".join(out["rationale"])
    default = data(await _generate(alice, alice.user_id, template_id, preferences={}))
    assert default["protocol"]["schedule"]["time_of_day"] == "evening"


async def test_templates_without_data_rules(admin, alice, template_names):
    created = data(await admin.client.post("/createProtocolTemplate", json={
        "habit_type": "learning", "name": template_names(), "cue": "After breakfast.",
        "routine": "Read one chapter.", "reward": "Tick it off."}), 201)
    out = data(await _generate(alice, alice.user_id, created["id"]))
    assert out["protocol"]["habit_type"] == "learning"
    assert out["protocol"]["schedule"]["time_of_day"] == "morning"
    assert any("no data rules" in r for r in out["rationale"])


async def test_push_needs_a_linked_dontdie_account(alice):
    template_id = await _template_id(alice, "Daily Brisk Walk")
    error(await _generate(alice, alice.user_id, template_id, push_to_dontdie=True), 409,
          "dontdie_not_linked")


async def test_generate_errors(alice, bob, service, anonymous):
    template_id = await _template_id(alice, "Daily Brisk Walk")
    error(await _generate(alice, alice.user_id, str(uuid.uuid4())), 404, "not_found")
    error(await _generate(service, uuid.uuid4(), template_id), 404)
    error(await _generate(alice, bob.user_id, template_id), 403, "forbidden")
    error(await _generate(anonymous_caller(anonymous), alice.user_id, template_id), 401)
    for extra in ({"preferences": {"minutes_per_day": 0}}, {"preferences": {"minutes_per_day": 241}},
                  {"preferences": {"time_of_day": "night"}}, {"preferences": {"intensity": "extreme"}},
                  {"preferences": {"colour": "red"}}, {"push_to_dontdie": "maybe"}, {"extra": 1}):
        error(await _generate(alice, alice.user_id, template_id, **extra), 422, "validation_error")
    error(await alice.client.post("/generateProtocol", json={"user_id": str(alice.user_id),
                                                             "template_id": "nope"}), 422)
    error(await alice.client.post("/generateProtocol", json={"user_id": str(alice.user_id)}), 422)


async def test_anonymous_is_401(anonymous):
    error(await anonymous.get("/listProtocolTemplates"), 401, "unauthorized")


class anonymous_caller:  # an object with a `client`, like the authenticated fixtures
    def __init__(self, client):
        self.client = client
