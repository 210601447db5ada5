"""DontDieClient against the local Don't Die sandbox over real HTTP, with real Redis."""
from __future__ import annotations

import hashlib
import os
import time
import uuid
from datetime import date, timedelta

import httpx
import pytest
import redis.asyncio as aioredis

from clients.dontdie import DontDieClient
from core.errors import (DependencyUnavailable, NotFound, UpstreamClientError, UpstreamError,
                         UpstreamTimeout)
from core.settings import Settings
from sandbox.dontdie import create_app
from sandbox.server import BackgroundServer, free_port

REDIS_URL = os.environ.get("SMA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TOKEN = "sandbox-client-test-alice"
CLIENT_ID = "test-client-id"


@pytest.fixture(scope="module")
def sandbox():
    server = BackgroundServer(create_app()).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def reset_sandbox(sandbox):
    httpx.delete(f"{sandbox.url}/_sandbox/faults")
    httpx.delete(f"{sandbox.url}/_sandbox/requests")
    yield
    httpx.delete(f"{sandbox.url}/_sandbox/faults")


@pytest.fixture
def prefix() -> str:
    return f"test-dd-{uuid.uuid4().hex}"


@pytest.fixture
async def redis(prefix):
    client = aioredis.from_url(REDIS_URL)
    yield client
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def cached_keys(redis, prefix: str) -> list[str]:
    return [k.decode() async for k in redis.scan_iter(match=f"{prefix}:*")]


@pytest.fixture
async def make_client(sandbox, redis, prefix):
    clients = []

    def make(token: str = TOKEN, *, base_url: str | None = None, **kw) -> DontDieClient:
        options = {"timeout": 2.0, "retries": 2, "concurrency": 4, "redis": redis,
                   "cache_prefix": prefix, "backoff_seconds": 0.02,
                   "backoff_max_seconds": 0.1, **kw}
        client = DontDieClient(base_url or sandbox.url, token, CLIENT_ID, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def set_faults(sandbox, **config) -> None:
    httpx.post(f"{sandbox.url}/_sandbox/faults", json=config).raise_for_status()


def requests_seen(sandbox, method: str | None = None, prefix: str = "") -> list[str]:
    seen = httpx.get(f"{sandbox.url}/_sandbox/requests").json()["requests"]
    return [r for r in seen if (method is None or r.startswith(method + " "))
            and r.split(" ", 1)[1].startswith(prefix)]


def assert_no_token(exc: Exception, token: str) -> None:
    text = f"{exc} {exc!r} {getattr(exc, 'message', '')} {getattr(exc, 'details', '')}"
    assert token not in text


# --- happy paths ---------------------------------------------------------------------------

async def test_account_and_user_id_are_deterministic_per_token(make_client):
    alice = make_client()
    account = await alice.get_account()
    assert account["name"].startswith("Sandbox User")
    assert account["_sandbox"] is True
    assert await alice.get_user_id() == account["id"]

    assert await make_client().get_user_id() == account["id"]
    assert await make_client("sandbox-client-test-bob").get_user_id() != account["id"]


async def test_every_call_sends_token_and_client_id_headers(sandbox, make_client):
    client = make_client()
    uid = await client.get_user_id()
    await client.list_categories()
    await client.create_protocol(uid, {"name": "Header check"})
    seen = httpx.get(f"{sandbox.url}/_sandbox/headers").json()["requests"][-3:]
    assert [r["method"] for r in seen] == ["GET", "GET", "POST"]
    for request in seen:
        assert request["authorization"] == f"Bearer {TOKEN}"
        assert request["x-dd-client-id"] == CLIENT_ID
        assert request["x-client-id"] == CLIENT_ID


async def test_scores_per_day_with_null_days(make_client):
    client = make_client()
    uid = await client.get_user_id()
    today = date.today()
    days = [today - timedelta(days=i) for i in range(30)]
    scores = await client.get_scores(uid, days)
    assert list(scores) == [d.isoformat() for d in days]
    with_data = [s for s in scores.values() if s["score"] is not None]
    assert with_data and all(isinstance(s["score"]["points"], (int, float)) for s in with_data)
    assert any(s["score"] is None for s in scores.values())  # some days have no data

    single = await client.get_score(uid, days[3].isoformat())
    assert single == scores[days[3].isoformat()]
    future = await client.get_score(uid, today + timedelta(days=3))
    assert future["score"] is None


async def test_scores_report_failed_days_individually(sandbox, make_client):
    client = make_client()
    uid = await client.get_user_id()
    result = await client.get_scores(uid, ["2025-01-01", "not-a-date"])
    assert "score" in result["2025-01-01"]
    assert result["not-a-date"]["status_code"] == 400
    assert result["not-a-date"]["error"]

    set_faults(sandbox, path_prefix=f"/user-profile/{uid}/score-v2", fail_status=404,
               fail_count=1)
    result = await client.get_scores(uid, ["2025-01-01", "2025-01-02", "2025-01-03"])
    failed = [v for v in result.values() if "error" in v]
    assert len(failed) == 1 and failed[0]["status_code"] == 404
    assert sum("score" in v for v in result.values()) == 2


async def test_score_requests_run_concurrently_within_the_bound(sandbox, make_client):
    client = make_client(concurrency=2)
    uid = await client.get_user_id()
    set_faults(sandbox, path_prefix="/user-profile/", latency_ms=300)
    started = time.monotonic()
    result = await client.get_scores(uid, [f"2025-02-0{i}" for i in range(1, 7)])
    elapsed = time.monotonic() - started
    assert all("score" in v for v in result.values())
    # six days two at a time: three rounds of 0.3 s; one at a time would take 1.8 s
    assert 0.85 <= elapsed < 1.6


async def test_categories_are_cached_without_the_token(sandbox, make_client, redis, prefix):
    client = make_client()
    categories = await client.list_categories()
    assert {"Measurements", "Capabilities", "Biomarkers"} <= {c["name"] for c in categories}

    keys = await cached_keys(redis, prefix)
    assert len(keys) == 1 and "categories" in keys[0] and TOKEN not in keys[0]
    assert 0 < await redis.ttl(keys[0]) <= 24 * 3600

    other_user = make_client("sandbox-client-test-carol")
    assert await other_user.list_categories() == categories
    assert len(requests_seen(sandbox, "GET", "/system/biomarker-categories")) == 1


async def test_category_readings_by_case_insensitive_name(make_client):
    client = make_client()
    readings = await client.get_category_readings("measurements")
    assert readings
    for reading in readings:
        assert {"biomarkerName", "value", "measurementUnit", "dateMeasured",
                "isSelfReported"} <= set(reading)
        date.fromisoformat(reading["dateMeasured"][:10])
    assert {"Weight", "Height"} <= {r["biomarkerName"] for r in readings}
    assert await client.get_category_readings("CAPABILITIES")
    with pytest.raises(NotFound):
        await client.get_category_readings("Horoscopes")


async def test_all_biomarkers_and_failed_categories(sandbox, make_client):
    client = make_client(retries=0)
    everything = await client.get_all_biomarkers()
    assert set(everything) >= {"Measurements", "Capabilities", "Biomarkers"}
    assert all(isinstance(v, list) and v for v in everything.values())

    set_faults(sandbox, path_prefix="/account/biomarkers", fail_status=500)
    everything = await client.get_all_biomarkers()
    assert all(v["status_code"] == 502 and v["error"] for v in everything.values())


async def test_protocols_list_create_and_sections(make_client):
    client = make_client("sandbox-client-test-protocols")
    uid = await client.get_user_id()
    protocols = await client.list_protocols(uid)
    assert protocols and all({"id", "name", "status"} <= set(p) for p in protocols)
    assert "sections" not in protocols[0]

    created = await client.create_protocol(uid, {"name": "Morning sunlight",
                                                 "description": "10 minutes outside"})
    assert created["id"] and created["status"] == "Draft"
    active = await client.create_protocol(uid, {"name": "Walk", "status": "Active"})
    assert active["status"] == "Active"
    section = await client.create_protocol_section(uid, created["id"], {"title": "When"})
    assert section["id"] and section["protocolId"] == created["id"]

    detailed = await client.list_protocols(uid, include_sections=True)
    by_id = {p["id"]: p for p in detailed}
    assert created["id"] in by_id and active["id"] in by_id
    assert [s["title"] for s in by_id[created["id"]]["sections"]] == ["When"]
    assert all(isinstance(p["sections"], list) for p in detailed)


async def test_foreign_uid_and_unknown_protocol_pass_through(make_client):
    alice, bob = make_client(), make_client("sandbox-client-test-bob")
    bob_uid = await bob.get_user_id()
    with pytest.raises(UpstreamClientError) as forbidden:
        await alice.list_protocols(bob_uid)
    assert forbidden.value.status_code == 403
    with pytest.raises(UpstreamClientError) as missing:
        await alice.create_protocol_section(await alice.get_user_id(), "no-such-protocol",
                                            {"title": "x"})
    assert missing.value.status_code == 404 and "not found" in missing.value.message


async def test_empty_account_has_no_data(make_client):
    client = make_client("sandbox-empty-client-test")
    uid = await client.get_user_id()
    assert await client.list_protocols(uid) == []
    assert all(v == [] for v in (await client.get_all_biomarkers()).values())
    scores = await client.get_scores(uid, [date.today() - timedelta(days=i) for i in range(7)])
    assert all(v["score"] is None for v in scores.values())


async def test_from_settings_and_shared_http_client(sandbox):
    settings = Settings(dontdie_base_url=sandbox.url, dontdie_timeout_seconds=3)
    async with httpx.AsyncClient() as shared:
        async with DontDieClient.from_settings(settings, TOKEN, CLIENT_ID, http=shared) as client:
            assert await client.get_user_id()
        assert not shared.is_closed  # a shared client belongs to its owner


# --- failures ------------------------------------------------------------------------------

async def test_bad_token_is_passed_through_as_401(sandbox, make_client):
    token = "not-a-sandbox-token-s3cret"
    client = make_client(token)
    with pytest.raises(UpstreamClientError) as err:
        await client.get_account()
    assert err.value.status_code == 401
    assert err.value.message == "Invalid or expired token"
    assert_no_token(err.value, token)
    assert len(requests_seen(sandbox, "GET", "/account")) == 1  # 4xx is not retried


async def test_server_errors_are_retried_then_502(sandbox, make_client):
    client = make_client(retries=2)
    set_faults(sandbox, path_prefix="/account", fail_status=503)
    with pytest.raises(UpstreamError) as err:
        await client.get_account()
    assert err.value.status_code == 502
    assert_no_token(err.value, TOKEN)
    assert len(requests_seen(sandbox, "GET", "/account")) == 3


async def test_transient_500_succeeds_on_retry(sandbox, make_client):
    client = make_client(retries=2)
    set_faults(sandbox, path_prefix="/system/biomarker-categories", fail_status=500,
               fail_count=1)
    assert await client.list_categories()
    assert len(requests_seen(sandbox, "GET", "/system/biomarker-categories")) == 2


async def test_hang_times_out_with_504(sandbox, make_client):
    client = make_client(timeout=0.5, retries=1)
    set_faults(sandbox, path_prefix="/account", hang=True)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as err:
        await client.get_account()
    elapsed = time.monotonic() - started
    assert err.value.status_code == 504
    assert 0.9 <= elapsed < 3.0  # two attempts of 0.5 s plus a short backoff
    assert len(requests_seen(sandbox, "GET", "/account")) == 2


async def test_connection_refused_is_503(make_client):
    client = make_client(base_url=f"http://127.0.0.1:{free_port()}", retries=1)
    with pytest.raises(DependencyUnavailable) as err:
        await client.get_account()
    assert err.value.status_code == 503
    assert_no_token(err.value, TOKEN)


async def test_malformed_json_is_502():
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>maintenance</html>")

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        client = DontDieClient("http://dd.test", TOKEN, CLIENT_ID, timeout=1, http=http)
        with pytest.raises(UpstreamError) as err:
            await client.get_account()
    assert err.value.status_code == 502 and "malformed" in err.value.message


async def test_post_is_never_retried(sandbox, make_client):
    client = make_client(retries=3)
    uid = await client.get_user_id()
    set_faults(sandbox, path_prefix=f"/user-health/{uid}/protocols", fail_status=500)
    with pytest.raises(UpstreamError):
        await client.create_protocol(uid, {"name": "Once only"})
    assert len(requests_seen(sandbox, "POST")) == 1

    set_faults(sandbox, path_prefix=f"/user-health/{uid}/protocols", hang=True)
    slow = make_client(timeout=0.3, retries=3)
    with pytest.raises(UpstreamTimeout):
        await slow.create_protocol(uid, {"name": "Once only"})
    assert len(requests_seen(sandbox, "POST")) == 2


# --- uid cache -----------------------------------------------------------------------------

async def test_uid_is_cached_in_redis_under_a_token_hash(sandbox, make_client, redis, prefix):
    uid = await make_client().get_user_id()
    keys = await cached_keys(redis, prefix)
    assert len(keys) == 1
    assert TOKEN not in keys[0]
    assert hashlib.sha256(TOKEN.encode()).hexdigest() in keys[0]
    assert (await redis.get(keys[0])).decode() == uid
    assert 24 * 3600 - 60 < await redis.ttl(keys[0]) <= 24 * 3600

    httpx.delete(f"{sandbox.url}/_sandbox/requests")
    assert await make_client().get_user_id() == uid  # a fresh client, same Redis
    assert requests_seen(sandbox, "GET", "/account") == []


async def test_redis_outage_only_costs_upstream_calls(sandbox):
    dead_redis = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0",
                                   socket_connect_timeout=0.5)
    async with DontDieClient(sandbox.url, TOKEN, CLIENT_ID, timeout=2, redis=dead_redis) as c:
        assert await c.get_user_id()
        assert await c.list_categories()
    await dead_redis.aclose()
