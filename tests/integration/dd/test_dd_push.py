"""services.dd_push.push_protocol: a generated protocol created in the user's own account."""
from __future__ import annotations


import pytest

from api.dd_context import dd_runtime
from core.errors import Conflict, UpstreamError, ValidationFailed
from tests.support.dd import dd_uid

DD_PROTOCOL = {"name": "Evening Wind-down", "description": "Screens off an hour before bed",
               "goal": "Fall asleep within 20 minutes", "category": "Sleep", "type": "Habit"}


async def push(profile_ctx, user_id, dd_protocol):
    from services import dd_push
    async with profile_ctx.db.transaction() as session:
        return await dd_push.push_protocol(session, dd_runtime(profile_ctx), user_id, dd_protocol)


async def test_push_creates_the_protocol_upstream_as_draft(alice, link, profile_ctx, dd_client):
    response, token = await link(alice)
    pushed = await push(profile_ctx, alice.user_id, {
        **DD_PROTOCOL, "ignored_field": "x",
        "sections": [{"title": "Cue", "content": "Alarm at 21:30"}, {"title": "Routine"}]})
    assert pushed["protocol_id"] and pushed["dontdie_uid"] == dd_uid(token)
    assert pushed["protocol"]["status"] == "Draft"
    assert "ignored_field" not in pushed["protocol"]
    assert [s["title"] for s in pushed["sections"]] == ["Cue", "Routine"]
    assert pushed["section_errors"] == []

    listed = await dd_client(alice).get("/getUserProtocols", params={"include_sections": "true"})
    ours = next(p for p in listed.json()["data"] if p["id"] == pushed["protocol_id"])
    assert ours["name"] == DD_PROTOCOL["name"] and len(ours["sections"]) == 2


async def test_push_needs_a_linked_account_and_a_name(alice, link, profile_ctx):
    with pytest.raises(Conflict):
        await push(profile_ctx, alice.user_id, DD_PROTOCOL)
    await link(alice)
    with pytest.raises(ValidationFailed):
        await push(profile_ctx, alice.user_id, {"description": "no name"})


async def test_push_maps_upstream_failures(alice, link, profile_ctx, sandbox_control):
    await link(alice)
    sandbox_control.faults(path_prefix="/user-health", fail_status=500)
    with pytest.raises(UpstreamError) as caught:
        await push(profile_ctx, alice.user_id, DD_PROTOCOL)
    assert caught.value.status_code == 502
    # a POST is never retried: one attempt, no duplicate protocol
    assert len(sandbox_control.requests("POST /user-health")) == 1


async def test_generate_protocol_pushes_to_the_linked_account(alice, bob, link, profile_app, dd_client):
    templates = (await alice.client.get("/listProtocolTemplates", params={"habit_type": "sleep"})).json()
    template_id = templates["data"]["items"][0]["id"]
    body = {"user_id": str(alice.user_id), "template_id": template_id, "push_to_dontdie": True}
    unlinked = await alice.client.post("/generateProtocol", json=body)
    assert unlinked.status_code == 409 and unlinked.json()["error"]["code"] == "dontdie_not_linked"

    await link(alice)
    pushed = await alice.client.post("/generateProtocol", json=body)
    assert pushed.status_code == 200, pushed.text
    data = pushed.json()["data"]
    assert data["dontdie_protocol_id"]
    upstream = await dd_client(alice).get("/getUserProtocols")
    ours = next(p for p in upstream.json()["data"] if p["id"] == data["dontdie_protocol_id"])
    assert ours["name"] == data["protocol"]["dd_protocol"]["name"] and ours["status"] == "Draft"

    without_push = await alice.client.post("/generateProtocol", json={**body, "push_to_dontdie": False})
    assert without_push.json()["data"]["dontdie_protocol_id"] is None
    foreign = await bob.client.post("/generateProtocol", json=body)
    assert foreign.status_code == 403
