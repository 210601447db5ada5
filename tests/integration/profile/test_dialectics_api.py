"""Dialectics (SPEC §4.7) and the service functions the Epistemic Me mirroring uses."""
from __future__ import annotations

import asyncio
import uuid

import pytest

from _profile_helpers import data, error
from core.errors import Conflict
from services import dialectics

OBJECTIVE = {"description": "Understand what keeps you from sleeping 8 hours",
             "topics": ["sleep", "stress"], "target_belief_type": "CAUSAL",
             "completion_percentage": 25}


async def _start(caller, **extra) -> dict:
    return data(await caller.client.post("/startDialectic",
                                         json={"user_id": str(caller.user_id), **extra}), 201)


async def _append(caller, dialectic_id: str, role: str, content: str, **extra):
    return await caller.client.post("/appendDialecticTurn", json={
        "dialectic_id": dialectic_id, "role": role, "content": content, **extra})


async def test_start_append_get_close(alice):
    self_model = data(await alice.client.post("/upsertSelfModel", json={"user_id": str(alice.user_id)}))
    conversation = data(await alice.client.post("/startConversation",
                                                json={"user_id": str(alice.user_id)}), 201)
    dialectic = await _start(alice, learning_objective=OBJECTIVE,
                             conversation_id=conversation["conversation_id"])
    assert dialectic["user_id"] == str(alice.user_id) and dialectic["closed"] is False
    assert dialectic["self_model_id"] == self_model["id"]  # the user's self-model by default
    assert dialectic["conversation_id"] == conversation["conversation_id"]
    assert dialectic["learning_objective"] == {**OBJECTIVE, "completion_percentage": 25.0}
    did = dialectic["dialectic_id"]
    q = data(await _append(alice, did, "question", "What time do you go to bed?"), 201)
    assert q["seq"] == 1 and q["role"] == "question" and q["dialectic_id"] == did
    data(await _append(alice, did, "answer", "Around 1 am.", extra_json={"beliefs": ["late"]}), 201)
    data(await _append(alice, did, "system", "Belief extracted."), 201)
    full = data(await alice.client.get("/getDialectic", params={"dialectic_id": did}))
    assert [(i["seq"], i["role"]) for i in full["interactions"]] == [
        (1, "question"), (2, "answer"), (3, "system")]
    assert full["interactions"][1]["extra_json"] == {"beliefs": ["late"]}
    closed = data(await alice.client.post("/closeDialectic", json={"dialectic_id": did}))
    assert closed["closed"] is True
    assert data(await alice.client.post("/closeDialectic", json={"dialectic_id": did}))["closed"]
    error(await _append(alice, did, "answer", "late"), 409, "dialectic_closed")


async def test_minimal_start_without_self_model(alice):
    dialectic = await _start(alice)
    assert dialectic["self_model_id"] is None and dialectic["learning_objective"] is None
    assert dialectic["external_id"] is None


async def test_interactions_keep_their_order_under_concurrency(alice):
    did = (await _start(alice))["dialectic_id"]
    responses = await asyncio.gather(*(_append(alice, did, "answer", f"a{i}") for i in range(8)))
    assert [r.status_code for r in responses] == [201] * 8
    interactions = data(await alice.client.get("/getDialectic", params={"dialectic_id": did}))["interactions"]
    assert [i["seq"] for i in interactions] == list(range(1, 9))


async def test_list_paginated_newest_first(alice, bob, service):
    ids = [(await _start(alice))["dialectic_id"] for _ in range(3)]
    await _start(bob)
    data(await _append(alice, ids[2], "question", "Why?"), 201)
    page = data(await alice.client.get("/listDialectics", params={"limit": 2}))
    assert page["total"] == 3 and [d["dialectic_id"] for d in page["items"]] == [ids[2], ids[1]]
    assert page["items"][0]["interaction_count"] == 1
    rest = data(await alice.client.get("/listDialectics", params={"limit": 2, "offset": 2}))
    assert [d["dialectic_id"] for d in rest["items"]] == [ids[0]] and rest["total"] == 3
    assert data(await service.client.get("/listDialectics"))["total"] == 4
    assert data(await service.client.get("/listDialectics",
                                         params={"user_id": str(bob.user_id)}))["total"] == 1
    data(await alice.client.post("/closeDialectic", json={"dialectic_id": ids[0]}))
    assert data(await alice.client.get("/listDialectics", params={"closed": True}))["total"] == 1


async def test_other_users_dialectics_are_invisible(alice, bob):
    theirs = (await _start(bob))["dialectic_id"]
    error(await _append(alice, theirs, "answer", "x"), 404, "not_found")
    error(await alice.client.get("/getDialectic", params={"dialectic_id": theirs}), 404)
    error(await alice.client.post("/closeDialectic", json={"dialectic_id": theirs}), 404)
    error(await alice.client.post("/startDialectic", json={"user_id": str(bob.user_id)}), 403)
    error(await alice.client.get("/listDialectics", params={"user_id": str(bob.user_id)}), 403)
    # bob's self-model or conversation cannot be attached to alice's dialectic
    bob_model = data(await bob.client.post("/upsertSelfModel", json={"user_id": str(bob.user_id)}))
    bob_conv = data(await bob.client.post("/startConversation", json={"user_id": str(bob.user_id)}), 201)
    error(await alice.client.post("/startDialectic", json={"user_id": str(alice.user_id),
                                                           "self_model_id": bob_model["id"]}), 404)
    error(await alice.client.post("/startDialectic", json={
        "user_id": str(alice.user_id), "conversation_id": bob_conv["conversation_id"]}), 404)


async def test_not_found(alice, service):
    missing = str(uuid.uuid4())
    error(await _append(alice, missing, "answer", "x"), 404)
    error(await alice.client.get("/getDialectic", params={"dialectic_id": missing}), 404)
    error(await alice.client.post("/closeDialectic", json={"dialectic_id": missing}), 404)
    error(await service.client.post("/startDialectic", json={"user_id": missing}), 404)
    error(await alice.client.post("/startDialectic", json={"user_id": str(alice.user_id),
                                                           "self_model_id": missing}), 404)
    error(await alice.client.post("/startDialectic", json={"user_id": str(alice.user_id),
                                                           "conversation_id": missing}), 404)


async def test_validation(alice):
    uid = str(alice.user_id)
    for body in ({"user_id": uid, "learning_objective": {**OBJECTIVE, "completion_percentage": 101}},
                 {"user_id": uid, "learning_objective": {**OBJECTIVE, "completion_percentage": -1}},
                 {"user_id": uid, "learning_objective": {"topics": ["x"]}},
                 {"user_id": uid, "learning_objective": {**OBJECTIVE, "topics": "sleep"}},
                 {"user_id": uid, "learning_objective": {**OBJECTIVE, "extra": 1}},
                 {"user_id": uid, "self_model_id": "nope"},
                 {"user_id": "nope"}, {}):
        error(await alice.client.post("/startDialectic", json=body), 422, "validation_error")
    did = (await _start(alice))["dialectic_id"]
    for body in ({"dialectic_id": did, "role": "user", "content": "x"},
                 {"dialectic_id": did, "role": "answer", "content": ""},
                 {"dialectic_id": did, "role": "answer", "content": " "},
                 {"dialectic_id": did, "role": "answer", "content": "x" * 32_001},
                 {"dialectic_id": did, "role": "answer", "content": "x", "extra_json": {"a": "\x00"}},
                 {"dialectic_id": "nope", "role": "answer", "content": "x"}):
        error(await alice.client.post("/appendDialecticTurn", json=body), 422, "validation_error")
    error(await alice.client.get("/getDialectic", params={"dialectic_id": "nope"}), 422)
    error(await alice.client.get("/listDialectics", params={"limit": 500}), 422)


async def test_anonymous_is_401(anonymous):
    did = str(uuid.uuid4())
    for method, path, kw in (
            ("POST", "/startDialectic", {"json": {"user_id": did}}),
            ("POST", "/appendDialecticTurn", {"json": {"dialectic_id": did, "role": "answer",
                                                       "content": "x"}}),
            ("POST", "/closeDialectic", {"json": {"dialectic_id": did}}),
            ("GET", "/getDialectic", {"params": {"dialectic_id": did}}),
            ("GET", "/listDialectics", {})):
        error(await anonymous.request(method, path, **kw), 401, "unauthorized")


async def test_service_functions_for_mirroring(alice, profile_ctx):
    """What the Epistemic Me mirroring calls: idempotent by external id, principal-free."""
    async with profile_ctx.db.transaction() as session:
        first = await dialectics.start_dialectic(session, alice.user_id, external_id="em-1",
                                                 learning_objective={"description": "d"})
        again = await dialectics.start_dialectic(session, alice.user_id, external_id="em-1")
        assert again.id == first.id
        found = await dialectics.find_by_external_id(session, alice.user_id, "em-1")
        assert found is not None and found.id == first.id
        assert await dialectics.find_by_external_id(session, alice.user_id, "em-2") is None
        q = await dialectics.append_interaction(session, first, "question", "Why?", {"em": "q1"})
        a = await dialectics.append_interaction(session, first, "answer", "Because.")
        assert (q.seq, a.seq) == (1, 2)
        await dialectics.close_dialectic(session, first)
        with pytest.raises(Conflict):
            await dialectics.append_interaction(session, first, "question", "More?")
    listed = data(await alice.client.get("/listDialectics"))
    assert listed["items"][0]["external_id"] == "em-1" and listed["items"][0]["interaction_count"] == 2
