"""Project metrics reach Ray's Prometheus endpoint; logs are JSON with request ids."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytestmark = pytest.mark.e2e


def _has_series(text: str, name: str, *labels: str) -> bool:
    return any(line.startswith(name + "{") and all(label in line for label in labels)
               for line in text.splitlines())


async def _scrape_until(url: str, name: str, *labels: str, timeout: float = 60.0) -> str:
    needle = f"{name}{{{','.join(labels)}}}"
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            text = (await client.get(url)).text
            if _has_series(text, name, *labels):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not exported within {timeout}s")
            await asyncio.sleep(1)  # Ray exports metrics on an interval; poll until present.


async def test_http_metrics_are_exported(serve_cluster, e2e_user):
    for _ in range(3):
        await e2e_user["client"].get("/profile/getUser", params={"user_id": str(e2e_user["user_id"])})
    await e2e_user["client"].get("/profile/getUser", params={"user_id": "not-a-uuid"})
    url = serve_cluster["metrics_url"]
    await _scrape_until(url, "ray_sma_http_requests_total", 'app="profile"', 'route="/getUser"',
                        'status="200"')
    await _scrape_until(url, "ray_sma_http_requests_total", 'route="/getUser"', 'status="422"')
    await _scrape_until(url, "ray_sma_http_request_duration_ms_bucket", 'route="/getUser"')


async def test_upstream_calls_are_counted_by_outcome(serve_cluster, e2e_user):
    headers = {"X-DD-Token": "sandbox-metrics", "X-DD-Client-Id": "metrics"}
    ok = await e2e_user["client"].get("/dontdie/getAccount", headers=headers)
    assert ok.status_code == 200, ok.text
    rejected = await e2e_user["client"].get("/dontdie/getAccount",
                                            headers={**headers, "X-DD-Token": "not-a-sandbox-token"})
    assert rejected.status_code == 401
    url = serve_cluster["metrics_url"]
    await _scrape_until(url, "ray_sma_upstream_calls_total", 'upstream="dontdie"', 'outcome="ok"')
    await _scrape_until(url, "ray_sma_upstream_calls_total", 'upstream="dontdie"',
                        'outcome="client_error"')
    await _scrape_until(url, "ray_sma_upstream_duration_ms_bucket", 'upstream="dontdie"')
