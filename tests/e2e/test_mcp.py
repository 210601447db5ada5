"""Agents over MCP: every app's tools through the Serve proxy with 2 replicas per app
(stateless streamable HTTP), Authorization forwarded so tools obey the same auth."""
from __future__ import annotations

import json

import httpx
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

from api.dontdie_app import build_dontdie_app
from api.epistemic_app import build_epistemic_app
from api.profile_app import build_profile_app
from core.principal import TokenKind
from core.settings import Settings
from tests.support.actors import make_token, make_user

pytestmark = pytest.mark.e2e


def _session(url: str, headers: dict[str, str]):
    return streamablehttp_client(url, headers=headers, timeout=60)


async def _call(url: str, headers: dict[str, str], tool: str, args: dict):
    async with _session(url, headers) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            return await session.call_tool(tool, args)


def test_tool_names_are_unique_across_apps_and_short():
    settings = Settings(database_url="sqlite+aiosqlite:///:memory:")
    names: list[str] = []
    for build in (build_profile_app, build_dontdie_app, build_epistemic_app):
        schema = build(settings).openapi()
        for path_item in schema["paths"].values():
            for operation in path_item.values():
                if operation["operationId"] not in ("health", "ready"):
                    names.append(operation["operationId"])
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert all(len(n) <= 64 for n in names)


async def test_profile_tools_list_read_write_and_auth(serve_cluster, e2e_user):
    url = f"{serve_cluster['base_url']}/profile/mcp"
    headers = {"Authorization": f"Bearer {e2e_user['token']}"}
    user_id = str(e2e_user["user_id"])
    async with _session(url, headers) as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert {"upsertMeasurement", "listMeasurements", "getChecklistProgress"} <= set(tools)
            assert tools["upsertMeasurement"].description
            assert "user_id" in json.dumps(tools["upsertMeasurement"].inputSchema)
            written = await session.call_tool("upsertMeasurement", {
                "user_id": user_id, "type": "steps", "value": 9000, "unit": "count",
                "captured_at": "2026-11-30T12:00:00Z"})
            assert not written.isError, written.content
            listed = await session.call_tool("listMeasurements", {"user_id": user_id})
            body = json.loads(listed.content[0].text)
            assert [m["value"] for m in body["data"]["items"]] == [9000]

    other = await make_user(serve_cluster["db"])
    foreign = await _call(url, headers, "listMeasurements", {"user_id": str(other)})
    assert foreign.isError and "403" in foreign.content[0].text


async def test_mcp_endpoint_refuses_missing_or_unknown_tokens(serve_cluster):
    for app in ("profile", "dontdie", "epistemic"):
        url = f"{serve_cluster['base_url']}/{app}/mcp"
        for headers in ({}, {"Authorization": "Bearer sma_unknown_token_value_000000000000"}):
            async with httpx.AsyncClient(timeout=30) as client:
                response = await client.post(url, headers={**headers, "Accept": "application/json, text/event-stream"},
                                             json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
            assert response.status_code == 401, (app, response.text)
            assert response.json()["error"]["code"] == "unauthorized"


async def test_epistemic_tools_read_and_write(serve_cluster, e2e_user):
    url = f"{serve_cluster['base_url']}/epistemic/mcp"
    headers = {"Authorization": f"Bearer {e2e_user['token']}"}
    user_id = str(e2e_user["user_id"])
    created = await _call(url, headers, "emCreateSelfModel", {"user_id": user_id})
    assert not created.isError, created.content
    fetched = await _call(url, headers, "emGetSelfModel", {"user_id": user_id})
    assert json.loads(fetched.content[0].text)["data"]["id"] == user_id


async def test_dontdie_tools_with_explicit_credentials_and_a_slow_upstream(serve_cluster, e2e_user):
    url = f"{serve_cluster['base_url']}/dontdie/mcp"
    headers = {"Authorization": f"Bearer {e2e_user['token']}", "X-DD-Token": "sandbox-mcp-agent",
               "X-DD-Client-Id": "mcp-test"}
    sandbox = serve_cluster["env"]["SMA_DONTDIE_BASE_URL"]
    async with httpx.AsyncClient(base_url=sandbox) as control:
        # Tool calls that take longer than 5 s must still complete.
        await control.post("/_sandbox/faults", json={"path_prefix": "/account", "latency_ms": 6000})
        try:
            account = await _call(url, headers, "getAccount", {})
        finally:
            await control.delete("/_sandbox/faults")
    assert not account.isError, account.content
    assert json.loads(account.content[0].text)["data"]["id"]
    created = await _call(url, headers, "createUserProtocol", {"name": "Evening wind-down"})
    assert not created.isError, created.content
    assert json.loads(created.content[0].text)["data"]["status"] == "Draft"
    no_credentials = await _call(url, {"Authorization": headers["Authorization"]}, "getAccount", {})
    assert no_credentials.isError and "409" in no_credentials.content[0].text
