"""Redis restarted mid-run (issue 8, faults): a real redis-server with an append-only file is
stopped and started again on the same port and directory under a running profile app.

While it is down every request fails fast with 503 `redis_unavailable` and /ready names redis;
afterwards the app recovers by itself; a simulation job queued before the restart is still
both in Redis and in the database, and one a worker had claimed is still held by that worker
and returns to the queue once when the worker is reaped."""
from __future__ import annotations

import json
import uuid

import pytest

from api.context import AppContext
from api.profile_app import build_profile_app
from core.principal import TokenKind
from core.settings import Settings
from storage.models import SimulationJob
from storage.queue import DEFAULT_PREFIX, ReliableQueue
from storage.redis import EmbeddedRedis, make_redis
from tests.faults.conftest import err, timed, wait_for_status
from tests.support.actors import asgi_client, make_caller, make_user

FAST_S = 5.0  # "fails fast": well under any client timeout, generous for a loaded machine


@pytest.fixture
def redis_servers(tmp_path):
    """The first server, and every server started later on its port; all stopped at the end."""
    servers = [EmbeddedRedis(tmp_path / "redis", persist=True).start()]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def own_redis(redis_servers) -> EmbeddedRedis:
    return redis_servers[0]


@pytest.fixture
async def app_on_own_redis(own_redis, test_database, tmp_path):
    settings = Settings(database_url=test_database.url, redis_url=own_redis.url,
                        data_dir=tmp_path / "data", rate_limit_per_minute=10_000,
                        credential_key="", llm_base_url="")
    ctx = AppContext.from_settings("profile", settings)
    app = build_profile_app(settings, ctx=ctx)
    yield ctx, app
    await test_database.clean(ctx.db)
    await ctx.aclose()


async def test_redis_restart_fails_fast_then_recovers_and_keeps_queued_jobs(
        own_redis, redis_servers, app_on_own_redis):
    ctx, app = app_on_own_redis
    service = await make_caller(ctx.db, app, TokenKind.service)
    anonymous = asgi_client(app)
    user_id = await make_user(ctx.db)
    try:
        assert (await service.client.get("/listUsers")).status_code == 200

        async def queue_job() -> str:
            queued = await service.client.post("/simulateConversation", json={
                "user_id": str(user_id), "template": "protocol_discussion", "config": {"max_turns": 2}})
            assert queued.status_code == 202, queued.text
            return queued.json()["data"]["job_id"]

        # One job in flight (claimed by a worker) and one still queued when Redis goes down.
        in_flight_id = await queue_job()
        worker = ReliableQueue.new_worker_id("restart-test")
        before = make_redis(own_redis.url)
        try:
            queue = ReliableQueue(before)
            await queue.register(worker)
            claimed = await queue.claim(worker, timeout=5)
            assert claimed is not None and claimed.id == in_flight_id
        finally:
            await before.aclose()
        job_id = await queue_job()

        own_redis.stop()

        # Down: every request answers 503 redis_unavailable quickly (no hang on the socket).
        for _ in range(3):
            response, elapsed = await timed(service.client.get("/listUsers"))
            err(response, 503, "redis_unavailable")
            assert elapsed < FAST_S, elapsed
        response, elapsed = await timed(service.client.post("/simulateConversation", json={
            "user_id": str(user_id), "template": "protocol_discussion"}))
        assert response.status_code == 503, response.text
        assert elapsed < FAST_S, elapsed
        ready, elapsed = await timed(anonymous.get("/ready"))
        assert ready.status_code == 503 and elapsed < FAST_S, ready.text
        assert "redis" in json.dumps(ready.json()), ready.text
        assert (await anonymous.get("/health")).status_code == 200  # liveness is unaffected

        # Same port, same directory: the append-only file brings the data back.
        redis_servers.append(EmbeddedRedis(own_redis.data_dir, port=own_redis.port,
                                           persist=True).start())

        # Recovery by itself: no reconnect call, no new app; polled with a deadline.
        await wait_for_status(lambda: service.client.get("/listUsers"), 200, deadline_s=30)
        await wait_for_status(lambda: anonymous.get("/ready"), 200, deadline_s=30)

        # The job queued before the restart is still in Redis and committed in the database.
        check = make_redis(own_redis.url)
        try:
            pending = await check.lrange(DEFAULT_PREFIX, 0, -1)
            owned = await check.hget(f"{DEFAULT_PREFIX}:jobs", job_id)
        finally:
            await check.aclose()
        assert owned is not None and job_id in owned, owned
        assert sum(job_id in raw for raw in pending) == 1, pending  # nothing consumes it here
        async with ctx.db.transaction() as session:
            for known in (job_id, in_flight_id):
                row = await session.get(SimulationJob, uuid.UUID(known))
                assert row is not None and row.user_id == user_id and row.status == "queued"

        # The in-flight job is still held by its worker; when that worker is reaped (as when
        # its heartbeat runs out) the job goes back to the queue exactly once.
        after = make_redis(own_redis.url)
        try:
            queue = ReliableQueue(after)
            assert [json.loads(raw)["id"] for raw in await queue.held(worker)] == [in_flight_id]
            assert not any(in_flight_id in raw for raw in await after.lrange(DEFAULT_PREFIX, 0, -1))
            reaped = await queue.reap_worker(worker, force=True)
            assert [job["id"] for job in reaped.requeued] == [in_flight_id] and not reaped.dead
            pending = await after.lrange(DEFAULT_PREFIX, 0, -1)
            assert sum(in_flight_id in raw for raw in pending) == 1, pending
        finally:
            await after.aclose()

        # Business as usual afterwards.
        again = await service.client.post("/simulateConversation", json={
            "user_id": str(user_id), "template": "protocol_discussion"})
        assert again.status_code == 202, again.text
    finally:
        await service.client.aclose()
        await anonymous.aclose()
