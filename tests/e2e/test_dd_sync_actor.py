"""The per-user Don't Die sync owners on real Ray actors, through the real Serve proxy.

Two profile replicas share the named sync host actors; a user's refreshes go to one host by
hash, so concurrent requests landing on either replica still make one upstream refresh. A
host killed with `ray.kill` is recreated (or restarted) and recovers state from the database.
"""
from __future__ import annotations

import asyncio
import os
import time
import uuid

import httpx
import pytest
import ray

from actors.dd_sync import NAMESPACE, host_index, host_name
from core.settings import Settings
from tests.support.dd import CREDENTIAL_KEY, SandboxControl, dd_uid, new_dd_token

pytestmark = pytest.mark.e2e

# Set while tests are collected, before the session's cluster starts, so that the Serve
# replicas and the sync hosts (which inherit this environment) can decrypt credentials.
os.environ.setdefault("SMA_CREDENTIAL_KEY", CREDENTIAL_KEY)


@pytest.fixture
def sandbox(serve_cluster) -> SandboxControl:
    control = SandboxControl(serve_cluster["env"]["SMA_DONTDIE_BASE_URL"])
    control.clear_faults()
    yield control
    control.clear_faults()


@pytest.fixture
async def linked(e2e_user, sandbox):
    token = new_dd_token()
    response = await e2e_user["client"].post("/profile/dd-data/link", json={
        "user_id": str(e2e_user["user_id"]), "dd_token": token, "dd_client_id": "e2e"})
    assert response.status_code == 200, response.text
    return {**e2e_user, "uid": dd_uid(token)}


def refreshes(sandbox: SandboxControl, uid: str) -> int:
    return len(sandbox.requests(f"GET /user-health/{uid}/protocols"))


def host_of(user_id: uuid.UUID):
    hosts = Settings().dd_sync_hosts
    return ray.get_actor(host_name(host_index(user_id, hosts)), namespace=NAMESPACE)


async def sync(client: httpx.AsyncClient, user_id, **params) -> dict:
    response = await client.post(f"/profile/dd-data/sync/{user_id}", params=params)
    assert response.status_code == 200, response.text
    return response.json()["data"]


async def wait_for_new_host(user_id: uuid.UUID, old_pid: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            stats = await host_of(user_id).stats.remote()
            if stats["pid"] != old_pid:
                return stats
        except (ValueError, ray.exceptions.RayActorError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the sync host was not recreated")
        await asyncio.sleep(0.5)


async def test_sync_runs_on_a_named_host_actor(linked, sandbox):
    client, user_id = linked["client"], linked["user_id"]
    result = await sync(client, user_id)
    assert result["sync_status"] == "success" and result["refreshed"] is True
    stats = await host_of(user_id).stats.remote()
    assert stats["users_cached"] >= 1 and stats["rss_bytes"] > 0
    again = await sync(client, user_id)
    assert again["throttled"] is True and refreshes(sandbox, linked["uid"]) == 1

    status = await client.get(f"/profile/dd-data/status/{user_id}")
    assert status.json()["data"]["sync_status"] == "success"
    item = await client.get("/profile/dd-data/checklist-item-data", params={"bucket_code": "dd_score"})
    assert item.status_code == 200 and item.json()["data"]["title"] == "Don't Die Score"


async def test_concurrent_syncs_across_replicas_make_one_refresh(linked, sandbox):
    sandbox.faults(path_prefix="/user-health", latency_ms=300)
    client, user_id = linked["client"], linked["user_id"]
    responses = await asyncio.gather(*(client.post(f"/profile/dd-data/sync/{user_id}")
                                       for _ in range(30)))
    assert {r.status_code for r in responses} == {200}, [r.text for r in responses if r.status_code != 200]
    assert refreshes(sandbox, linked["uid"]) == 1
    assert len({r.json()["data"]["last_synced"] for r in responses}) == 1


async def test_killed_host_is_recreated_and_recovers_state_from_the_database(linked, sandbox):
    client, user_id = linked["client"], linked["user_id"]
    first = await sync(client, user_id)
    old = await host_of(user_id).stats.remote()

    ray.kill(host_of(user_id))  # no restart: the next call recreates it by name
    recovered = await sync(client, user_id)
    assert recovered["throttled"] is True and recovered["refreshed"] is False
    assert recovered["last_synced"] == first["last_synced"]
    assert recovered["records_synced"] == first["records_synced"]
    assert refreshes(sandbox, linked["uid"]) == 1
    new = await wait_for_new_host(user_id, old["pid"])
    assert new["users_cached"] >= 1

    ray.kill(host_of(user_id), no_restart=False)  # max_restarts=-1: Ray restarts it
    restarted = await sync(client, user_id)
    assert restarted["throttled"] is True and restarted["last_synced"] == first["last_synced"]
    forced = await sync(client, user_id, force="true")
    assert forced["refreshed"] is True and refreshes(sandbox, linked["uid"]) == 2


async def test_background_sync_through_the_proxy(linked):
    client, user_id = linked["client"], linked["user_id"]
    response = await client.post(f"/profile/dd-data/sync/{user_id}", params={"background": "true"})
    assert response.status_code == 202, response.text
    status_url = response.json()["data"]["status_url"]
    assert status_url == f"/profile/dd-data/status/{user_id}"
    deadline = time.monotonic() + 30
    while (await client.get(status_url)).json()["data"]["sync_status"] != "success":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)


async def test_dontdie_app_uses_the_linked_account(linked, serve_cluster):
    client = linked["client"]
    account = await client.get("/dontdie/getAccount")
    assert account.status_code == 200, account.text
    assert account.json()["data"]["id"] == linked["uid"]
    ready = await client.get("/dontdie/ready")
    assert ready.json()["data"]["dependencies"]["dontdie_api"]["ok"] is True
