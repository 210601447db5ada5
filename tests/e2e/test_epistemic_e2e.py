"""The epistemic app through the real Serve proxy, mirrored into the profile app (SPEC §6)."""
from __future__ import annotations

import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

pytestmark = pytest.mark.e2e


async def test_belief_created_upstream_is_visible_in_the_profile(serve_cluster, e2e_user):
    client, user_id = e2e_user["client"], str(e2e_user["user_id"])
    ready = await client.get("/epistemic/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["data"]["dependencies"]["epistemic_me"]["ok"] is True

    created = await client.post("/epistemic/createSelfModel", json={"user_id": user_id})
    assert created.status_code == 201, created.text
    assert created.json()["data"]["id"] == user_id

    response = await client.post("/epistemic/updateBelief", json={
        "user_id": user_id, "statement": "Morning light helps me sleep", "confidence": 0.8,
        "belief_type": "CAUSAL"})
    assert response.status_code == 201, response.text
    belief = response.json()["data"]["belief"]
    assert belief["belief_type"] == "CAUSAL"

    tree = await client.get("/profile/getSelfModel", params={"user_id": user_id})
    assert tree.status_code == 200, tree.text
    systems = {s["name"]: s for s in tree.json()["data"]["belief_systems"]}
    [mirrored] = systems["epistemic_me"]["beliefs"]
    assert mirrored["external_id"] == belief["id"]
    assert mirrored["statement"] == "Morning light helps me sleep"
    assert mirrored["confidence"] == 0.8 and mirrored["belief_type"] == "CAUSAL"

    listed = await client.get("/epistemic/listBeliefs", params={"user_id": user_id})
    assert [b["id"] for b in listed.json()["data"]["items"]] == [belief["id"]]


async def test_epistemic_mcp_tools_have_prefixed_names(serve_cluster, e2e_user):
    url = f"{serve_cluster['base_url']}/epistemic/mcp"
    headers = {"Authorization": f"Bearer {e2e_user['token']}"}
    async with streamablehttp_client(url, headers=headers) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name for t in (await session.list_tools()).tools}
    assert {"emCreateSelfModel", "emGetSelfModel", "emUpdateBelief", "emDeleteBelief",
            "emListDialectics"} <= tools
    assert not {"getSelfModel", "deleteBelief", "ready"} & tools
