"""Through the real Serve proxy: routing by prefix, auth, envelope, OpenAPI and MCP."""
from __future__ import annotations

import json

import httpx
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

pytestmark = pytest.mark.e2e


async def test_every_app_is_alive_and_ready(serve_cluster):
    async with httpx.AsyncClient(base_url=serve_cluster["base_url"], timeout=30) as client:
        for app in ("profile", "dontdie", "epistemic"):
            health = await client.get(f"/{app}/health")
            assert health.status_code == 200
            assert health.json()["data"]["app"] == app
            ready = await client.get(f"/{app}/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json()["data"]["dependencies"]["database"]["ok"] is True
            docs = await client.get(f"/{app}/openapi.json")
            assert docs.status_code == 200


async def test_self_model_round_trip_through_the_proxy(e2e_user):
    client, user_id = e2e_user["client"], str(e2e_user["user_id"])
    missing = await client.get("/profile/getSelfModel", params={"user_id": user_id})
    assert missing.status_code == 404
    assert missing.json()["status"] == "error"
    created = await client.post("/profile/upsertSelfModel", json={"user_id": user_id})
    assert created.status_code == 200, created.text
    fetched = await client.get("/profile/getSelfModel", params={"user_id": user_id},
                               headers={"X-Request-ID": "trace-123"})
    assert fetched.headers["x-request-id"] == "trace-123"
    assert fetched.json()["data"]["belief_systems"][0]["name"] == "default"


async def test_proxy_rejects_missing_token(serve_cluster):
    async with httpx.AsyncClient(base_url=serve_cluster["base_url"], timeout=30) as client:
        response = await client.get("/profile/listUsers")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "unauthorized"


async def test_mcp_tool_call_with_bearer_token(serve_cluster, e2e_user):
    url = f"{serve_cluster['base_url']}/profile/mcp"
    headers = {"Authorization": f"Bearer {e2e_user['token']}"}
    async with streamablehttp_client(url, headers=headers) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name for t in (await session.list_tools()).tools}
            assert {"getUser", "upsertSelfModel", "getSelfModel"} <= tools
            assert "health" not in tools
            result = await session.call_tool("getUser", {"user_id": str(e2e_user["user_id"])})
            assert not result.isError, result
            body = json.loads(result.content[0].text)
            assert body["data"]["id"] == str(e2e_user["user_id"])
