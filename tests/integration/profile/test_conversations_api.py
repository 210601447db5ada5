"""Conversations and turns (SPEC §4.6)."""
from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

from sqlalchemy import func, select

from _profile_helpers import data, error
from storage.models import ChecklistItem


async def _start(caller, **extra) -> dict:
    return data(await caller.client.post("/startConversation",
                                         json={"user_id": str(caller.user_id), **extra}), 201)


async def _turn(caller, conversation_id: str, content: str, role: str = "user", **extra):
    return await caller.client.post("/appendTurn", json={
        "conversation_id": conversation_id, "role": role, "content": content, **extra})


async def test_start_append_get_close(alice):
    conv = await _start(alice, meta={"channel": "web"})
    assert conv["user_id"] == str(alice.user_id) and conv["closed"] is False
    assert conv["meta"] == {"channel": "web"}
    assert datetime.fromisoformat(conv["started_at"]).utcoffset() == timedelta(0)
    cid = conv["conversation_id"]
    turn = data(await _turn(alice, cid, "How did I sleep?", extra_json={"lang": "en"}), 201)
    assert turn["seq"] == 1 and turn["role"] == "user" and turn["extra_json"] == {"lang": "en"}
    assert turn["conversation_id"] == cid and turn["conversation_closed"] is False
    data(await _turn(alice, cid, "About 6 hours a night.", role="assistant"), 201)
    data(await _turn(alice, cid, "Summary written.", role="system"), 201)
    full = data(await alice.client.get("/getConversation", params={"conversation_id": cid}))
    assert [t["content"] for t in full["turns"]] == ["How did I sleep?", "About 6 hours a night.",
                                                     "Summary written."]
    assert [t["seq"] for t in full["turns"]] == [1, 2, 3]
    closed = data(await alice.client.post("/closeConversation", json={"conversation_id": cid}))
    assert closed["closed"] is True
    again = data(await alice.client.post("/closeConversation", json={"conversation_id": cid}))
    assert again["closed"] is True  # idempotent
    error(await _turn(alice, cid, "one more"), 409, "conversation_closed")
    assert len(data(await alice.client.get("/getConversation", params={"conversation_id": cid}))["turns"]) == 3


async def test_close_with_the_last_turn(alice):
    cid = (await _start(alice))["conversation_id"]
    last = data(await _turn(alice, cid, "Bye", close_conversation=True), 201)
    assert last["conversation_closed"] is True
    error(await _turn(alice, cid, "Still there?"), 409)
    assert data(await alice.client.get("/getConversation", params={"conversation_id": cid}))["closed"]


async def test_transcript_order_is_stable_under_concurrency(alice):
    cid = (await _start(alice))["conversation_id"]
    for i in range(5):
        data(await _turn(alice, cid, f"sequential {i}"), 201)
    responses = await asyncio.gather(*(_turn(alice, cid, f"concurrent {i}") for i in range(10)))
    assert [r.status_code for r in responses] == [201] * 10, [r.text for r in responses]
    turns = data(await alice.client.get("/getConversation", params={"conversation_id": cid}))["turns"]
    assert [t["seq"] for t in turns] == list(range(1, 16))
    assert [t["content"] for t in turns[:5]] == [f"sequential {i}" for i in range(5)]
    assert sorted(r.json()["data"]["seq"] for r in responses) == list(range(6, 16))


async def test_first_conversation_creates_the_checklist(alice, profile_ctx):
    async def items() -> int:
        async with profile_ctx.db.transaction() as session:
            return await session.scalar(select(func.count()).select_from(ChecklistItem)
                                        .where(ChecklistItem.user_id == alice.user_id))
    assert await items() == 0
    await _start(alice)
    assert await items() == 7
    data(await alice.client.post("/markChecklistItem", json={"bucket_code": "dd_score",
                                                              "status": "completed"}))
    await _start(alice)
    assert await items() == 7
    progress = data(await alice.client.get("/getProgress"))
    assert progress["completed"] == ["dd_score"]


async def test_list_is_paginated_newest_first(alice, bob, service):
    ids = [(await _start(alice, meta={"n": n}))["conversation_id"] for n in range(3)]
    await _start(bob)
    data(await _turn(alice, ids[0], "hello"), 201)
    page = data(await alice.client.get("/listConversations", params={"limit": 2}))
    assert page["total"] == 3 and page["limit"] == 2 and page["offset"] == 0
    assert [c["conversation_id"] for c in page["items"]] == [ids[2], ids[1]]
    rest = data(await alice.client.get("/listConversations", params={"limit": 2, "offset": 2}))
    assert rest["total"] == 3 and [c["conversation_id"] for c in rest["items"]] == [ids[0]]
    assert rest["items"][0]["turn_count"] == 1
    beyond = data(await alice.client.get("/listConversations", params={"offset": 10}))
    assert beyond["total"] == 3 and beyond["items"] == []
    everyone = data(await service.client.get("/listConversations"))
    assert everyone["total"] == 4
    bobs = data(await service.client.get("/listConversations", params={"user_id": str(bob.user_id)}))
    assert bobs["total"] == 1
    data(await alice.client.post("/closeConversation", json={"conversation_id": ids[1]}))
    open_ = data(await alice.client.get("/listConversations", params={"closed": False}))
    assert open_["total"] == 2 and ids[1] not in [c["conversation_id"] for c in open_["items"]]


async def test_other_users_conversations_are_invisible(alice, bob):
    theirs = (await _start(bob))["conversation_id"]
    error(await _turn(alice, theirs, "hi"), 404, "not_found")
    error(await alice.client.get("/getConversation", params={"conversation_id": theirs}), 404)
    error(await alice.client.post("/closeConversation", json={"conversation_id": theirs}), 404)
    error(await alice.client.post("/startConversation", json={"user_id": str(bob.user_id)}), 403)
    error(await alice.client.get("/listConversations", params={"user_id": str(bob.user_id)}), 403)
    assert not data(await bob.client.get("/getConversation", params={"conversation_id": theirs}))["closed"]


async def test_not_found(alice, service):
    missing = str(uuid.uuid4())
    error(await _turn(alice, missing, "hi"), 404)
    error(await alice.client.get("/getConversation", params={"conversation_id": missing}), 404)
    error(await alice.client.post("/closeConversation", json={"conversation_id": missing}), 404)
    error(await service.client.post("/startConversation", json={"user_id": missing}), 404)


async def test_validation(alice):
    cid = (await _start(alice))["conversation_id"]
    for body in ({"conversation_id": cid, "role": "bot", "content": "x"},
                 {"conversation_id": cid, "role": "user", "content": ""},
                 {"conversation_id": cid, "role": "user", "content": "   \n"},
                 {"conversation_id": cid, "role": "user", "content": "x" * 32_001},
                 {"conversation_id": cid, "role": "user", "content": "nul\x00"},
                 {"conversation_id": cid, "role": "user", "content": "x", "extra_json": {"k": "\x00"}},
                 {"conversation_id": cid, "role": "user", "content": "x", "extra_json": [1]},
                 {"conversation_id": cid, "role": "user", "content": "x", "unknown": 1},
                 {"conversation_id": "nope", "role": "user", "content": "x"},
                 {"role": "user", "content": "x"}):
        error(await alice.client.post("/appendTurn", json=body), 422, "validation_error")
    data(await _turn(alice, cid, "x" * 32_000), 201)
    for body in ({}, {"user_id": "nope"}, {"user_id": str(alice.user_id), "meta": "text"},
                 {"user_id": str(alice.user_id), "meta": {"\x00": 1}}):
        error(await alice.client.post("/startConversation", json=body), 422)
    for params in ({"conversation_id": "nope"}, {}):
        error(await alice.client.get("/getConversation", params=params), 422)
    for params in ({"limit": 0}, {"limit": 101}, {"offset": -1}, {"user_id": "x"}):
        error(await alice.client.get("/listConversations", params=params), 422)


async def test_anonymous_is_401(anonymous):
    cid = str(uuid.uuid4())
    for method, path, kw in (
            ("POST", "/startConversation", {"json": {"user_id": cid}}),
            ("POST", "/appendTurn", {"json": {"conversation_id": cid, "role": "user", "content": "x"}}),
            ("POST", "/closeConversation", {"json": {"conversation_id": cid}}),
            ("GET", "/listConversations", {}),
            ("GET", "/getConversation", {"params": {"conversation_id": cid}})):
        error(await anonymous.request(method, path, **kw), 401, "unauthorized")
