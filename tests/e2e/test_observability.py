"""Project metrics reach Ray's Prometheus endpoint; logs are JSON with request ids."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytestmark = pytest.mark.e2e


async def _scrape_until(url: str, needle: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            text = (await client.get(url)).text
            if needle in text:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not exported within {timeout}s")
            await asyncio.sleep(1)  # Ray exports metrics on an interval; poll until present.


async def test_http_metrics_are_exported(serve_cluster, e2e_user):
    for _ in range(3):
        await e2e_user["client"].get("/profile/getUser", params={"user_id": str(e2e_user["user_id"])})
    await e2e_user["client"].get("/profile/getUser", params={"user_id": "not-a-uuid"})
    text = await _scrape_until(serve_cluster["metrics_url"], 'ray_sma_http_requests_total{')
    lines = [l for l in text.splitlines() if l.startswith("ray_sma_http_requests_total{")]
    assert any('app="profile"' in l and 'route="/getUser"' in l and 'status="200"' in l for l in lines)
    await _scrape_until(serve_cluster["metrics_url"], 'status="422"')
    assert "ray_sma_http_request_duration_ms_bucket" in text
