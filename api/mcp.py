"""Every route of an app as an MCP tool, over stateless streamable HTTP at `/mcp`.

Stateless because a Serve app has several replicas and a follow-up MCP request may land on
any of them. The caller's Authorization header is forwarded, so tools obey the same auth.
"""
from __future__ import annotations

import asyncio

import httpx
from fastapi import Depends, FastAPI
from fastapi_mcp import AuthConfig, FastApiMCP
from fastapi_mcp.transport.http import FastApiHttpSessionManager
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from api.deps import get_principal

NOT_TOOLS = ["health", "ready"]
TOOL_CALL_TIMEOUT_SECONDS = 300.0


class StatelessHttpSessionManager(FastApiHttpSessionManager):
    async def _ensure_session_manager_started(self) -> None:
        if self._manager_started:
            return
        async with self._startup_lock:
            if self._manager_started:
                return
            self._session_manager = StreamableHTTPSessionManager(
                app=self.mcp_server, json_response=True, stateless=True)
            ready = asyncio.Event()

            async def run() -> None:
                async with self._session_manager.run():
                    ready.set()
                    await asyncio.Event().wait()

            self._manager_task = asyncio.create_task(run())
            await ready.wait()
            self._manager_started = True


class StatelessFastApiMCP(FastApiMCP):
    def _register_mcp_endpoints_http(self, router, transport, mount_path, dependencies):
        super()._register_mcp_endpoints_http(
            router, StatelessHttpSessionManager(mcp_server=self.server), mount_path, dependencies)


def mount_mcp(app: FastAPI) -> FastApiMCP:
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://apiserver", timeout=TOOL_CALL_TIMEOUT_SECONDS)
    mcp = StatelessFastApiMCP(
        app, name=f"sma-{app.title}", http_client=client, exclude_operations=NOT_TOOLS,
        headers=["authorization", "x-request-id", "x-dd-token", "x-dd-client-id"],
        auth_config=AuthConfig(dependencies=[Depends(get_principal)]))
    mcp.mount_http(app, mount_path="/mcp")
    return mcp
