"""The simulation jobs API (SPEC §4.8) over the in-process profile app, on every database."""
from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from sqlalchemy import select

from services import simulation_jobs
from storage.models import SimulationJob
from storage.queue import ReliableQueue
from storage.redis import make_redis


def error_code(response) -> str:
    body = response.json()
    assert body["status"] == "error", body
    return body["error"]["code"]


async def simulate(caller, user_id, **body):
    return await caller.client.post("/simulateConversation", json={"user_id": str(user_id), **body})


async def test_simulate_queues_a_job_and_pushes_its_json(alice, redis, profile_ctx):
    response = await simulate(alice, alice.user_id, template="protocol_discussion",
                              config={"max_turns": 3, "coach": "llm", "seed": 7,
                                      "metrics": ["turn_relevancy", "role_adherence"]},
                              priority=4)
    assert response.status_code == 202, response.text
    data = response.json()["data"]
    assert data["status"] == "queued" and uuid.UUID(data["job_id"])

    [raw] = await redis.lrange("simulation_jobs", 0, -1)
    queued = json.loads(raw)
    assert queued["id"] == data["job_id"] and queued["user_id"] == str(alice.user_id)
    assert queued["template"] == "protocol_discussion" and queued["priority"] == 4
    assert queued["max_attempts"] == profile_ctx.settings.sim_max_attempts
    assert queued["config"]["metrics"] == ["turn_relevancy", "role_adherence"]

    job = (await alice.client.get("/getSimulationJob", params={"job_id": data["job_id"]})).json()["data"]
    assert job["status"] == "queued" and job["attempts"] == 0 and job["conversation_id"] is None
    assert job["config"] == {"max_turns": 3, "scenario": None, "expected_outcome": None,
                             "persona": None, "coach": "llm",
                             "metrics": ["turn_relevancy", "role_adherence"], "seed": 7}


async def test_defaults_template_and_resolves_a_seed(alice):
    data = (await simulate(alice, alice.user_id)).json()["data"]
    job = (await alice.client.get("/getSimulationJob", params={"job_id": data["job_id"]})).json()["data"]
    assert job["template"] == "health_assessment"
    assert job["config"]["max_turns"] == 6 and job["config"]["coach"] == "llm"
    assert isinstance(job["config"]["seed"], int)  # recorded so the run can be reproduced


async def test_who_may_simulate(alice, bob, service, admin, anonymous):
    assert (await simulate(bob, alice.user_id)).status_code == 403
    assert (await anonymous.post("/simulateConversation",
                                 json={"user_id": str(alice.user_id)})).status_code == 401
    assert (await simulate(service, alice.user_id)).status_code == 202
    assert (await simulate(admin, alice.user_id)).status_code == 202
    unknown = await simulate(service, uuid.uuid4())
    assert unknown.status_code == 404 and error_code(unknown) == "not_found"


@pytest.mark.parametrize("body", [
    {"template": "nonexistent"},
    {"config": {"max_turns": 0}},
    {"config": {"max_turns": 51}},
    {"config": {"coach": "oracle"}},
    {"config": {"metrics": ["bleu"]}},
    {"config": {"metrics": ["turn_relevancy", "turn_relevancy"]}},
    {"config": {"metrics": []}},
    {"config": {"seed": -1}},
    {"config": {"persona": ""}},
    {"config": {"scenario": "x" * 2001}},
    {"config": {"unknown": 1}},
    {"config": {"persona": "nul \x00 byte"}},
    {"priority": 10},
    {"priority": -1},
    {"idempotency_key": ""},
    {"idempotency_key": "k" * 201},
    {"extra": True},
])
async def test_validation(alice, body):
    response = await simulate(alice, alice.user_id, **body)
    assert response.status_code == 422, response.text
    assert error_code(response) == "validation_error"
    assert response.json()["error"]["details"]


async def test_unknown_template_names_the_choices(alice):
    response = await simulate(alice, alice.user_id, template="nonexistent")
    assert response.status_code == 422
    assert "health_assessment" in json.dumps(response.json()["error"])


async def test_idempotency_key_returns_the_first_job(alice, bob, redis):
    first = await simulate(alice, alice.user_id, idempotency_key="nightly-1", config={"max_turns": 2})
    again = await simulate(alice, alice.user_id, idempotency_key="nightly-1", config={"max_turns": 2})
    assert first.status_code == again.status_code == 202
    assert again.json()["data"]["job_id"] == first.json()["data"]["job_id"]
    assert again.headers.get("idempotent-replayed") == "true"
    assert "idempotent-replayed" not in first.headers
    assert await redis.llen("simulation_jobs") == 1

    changed = await simulate(alice, alice.user_id, idempotency_key="nightly-1", config={"max_turns": 3})
    assert changed.status_code == 409 and error_code(changed) == "idempotency_key_reused"
    # Keys are per user.
    other = await simulate(bob, bob.user_id, idempotency_key="nightly-1", config={"max_turns": 2})
    assert other.status_code == 202 and other.json()["data"]["job_id"] != first.json()["data"]["job_id"]


async def test_concurrent_submissions_with_one_key_make_one_job(alice, profile_ctx, redis):
    responses = await asyncio.gather(*(simulate(alice, alice.user_id, idempotency_key="burst")
                                       for _ in range(8)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["data"]["job_id"] for r in responses}) == 1
    async with profile_ctx.db.transaction() as session:
        rows = list(await session.scalars(select(SimulationJob).where(SimulationJob.user_id == alice.user_id)))
    assert len(rows) == 1
    assert await redis.llen("simulation_jobs") == 1


async def test_get_and_list(alice, bob, service):
    mine = [(await simulate(alice, alice.user_id)).json()["data"]["job_id"] for _ in range(3)]
    theirs = (await simulate(bob, bob.user_id)).json()["data"]["job_id"]

    assert (await bob.client.get("/getSimulationJob", params={"job_id": mine[0]})).status_code == 404
    assert (await alice.client.get("/getSimulationJob", params={"job_id": str(uuid.uuid4())})).status_code == 404
    assert (await alice.client.get("/getSimulationJob", params={"job_id": "nope"})).status_code == 422

    page = (await alice.client.get("/listSimulationJobs", params={"limit": 2})).json()["data"]
    assert page["total"] == 3 and [j["id"] for j in page["items"]] == mine[::-1][:2]
    assert (await alice.client.get("/listSimulationJobs",
                                   params={"user_id": str(bob.user_id)})).status_code == 403
    everyone = (await service.client.get("/listSimulationJobs")).json()["data"]
    assert everyone["total"] == 4
    bobs = (await service.client.get("/listSimulationJobs",
                                     params={"user_id": str(bob.user_id)})).json()["data"]
    assert [j["id"] for j in bobs["items"]] == [theirs]
    queued = (await service.client.get("/listSimulationJobs", params={"status": "queued"})).json()["data"]
    assert queued["total"] == 4
    assert (await service.client.get("/listSimulationJobs",
                                     params={"status": "succeeded"})).json()["data"]["total"] == 0
    assert (await service.client.get("/listSimulationJobs", params={"status": "bogus"})).status_code == 422
    assert (await service.client.get("/listSimulationJobs", params={"limit": 101})).status_code == 422


async def test_cancel(alice, bob, redis):
    job_id = (await simulate(alice, alice.user_id)).json()["data"]["job_id"]
    assert (await bob.client.post("/cancelSimulationJob", json={"job_id": job_id})).status_code == 404
    response = await alice.client.post("/cancelSimulationJob", json={"job_id": job_id})
    assert response.status_code == 200, response.text
    job = response.json()["data"]
    assert job["status"] == "cancelled" and job["finished_at"]
    assert await redis.llen("simulation_jobs") == 0  # no worker will ever see it
    again = await alice.client.post("/cancelSimulationJob", json={"job_id": job_id})
    assert again.status_code == 409 and error_code(again) == "simulation_job_finished"
    assert (await alice.client.post("/cancelSimulationJob",
                                    json={"job_id": str(uuid.uuid4())})).status_code == 404


async def test_dead_jobs_are_listed_and_retried_by_admins(alice, service, admin, profile_ctx, sim_queue, redis):
    job_id = (await simulate(alice, alice.user_id)).json()["data"]["job_id"]
    for caller in (alice, service):
        assert (await caller.client.get("/listDeadSimulationJobs")).status_code == 403
        assert (await caller.client.post("/retrySimulationJob", json={"job_id": job_id})).status_code == 403
    not_dead = await admin.client.post("/retrySimulationJob", json={"job_id": job_id})
    assert not_dead.status_code == 409 and error_code(not_dead) == "simulation_job_not_dead"

    await sim_queue.register("w")
    claimed = await sim_queue.claim("w", timeout=1)
    await sim_queue.fail("w", claimed, "UpstreamError: broken", retryable=False)
    async with profile_ctx.db.transaction() as session:
        await simulation_jobs.record_dead(session, uuid.UUID(job_id), 1, "UpstreamError: broken")

    dead = (await admin.client.get("/listDeadSimulationJobs")).json()["data"]
    assert dead["total"] == 1 and dead["items"][0]["last_error"] == "UpstreamError: broken"
    retried = await admin.client.post("/retrySimulationJob", json={"job_id": job_id})
    assert retried.status_code == 202, retried.text
    assert retried.json()["data"]["status"] == "queued" and retried.json()["data"]["attempts"] == 0
    assert await redis.llen("simulation_jobs:dead") == 0
    assert json.loads((await redis.lrange("simulation_jobs", 0, -1))[0])["id"] == job_id
    assert (await admin.client.get("/listDeadSimulationJobs")).json()["data"]["total"] == 0
    assert (await admin.client.post("/retrySimulationJob",
                                    json={"job_id": str(uuid.uuid4())})).status_code == 404


async def test_a_failed_push_loses_no_job(alice, profile_ctx, sim_queue, redis):
    """Redis down at submit time: the job is recorded, the call succeeds, and the reconciler
    queues it once Redis answers again."""
    broken = make_redis("redis://127.0.0.1:1/0")
    profile_ctx.extras["simulation_queue"] = ReliableQueue(broken)
    try:
        response = await simulate(alice, alice.user_id)
    finally:
        del profile_ctx.extras["simulation_queue"]
        await broken.aclose()
    assert response.status_code == 202, response.text
    job_id = response.json()["data"]["job_id"]
    assert await redis.llen("simulation_jobs") == 0

    result = await simulation_jobs.reconcile(profile_ctx.db, sim_queue, grace_seconds=0)
    assert result.enqueued == 1
    assert json.loads((await redis.lrange("simulation_jobs", 0, -1))[0])["id"] == job_id
    again = await simulation_jobs.reconcile(profile_ctx.db, sim_queue, grace_seconds=0)
    assert again.enqueued == 0 and await redis.llen("simulation_jobs") == 1


async def test_reconcile_mirrors_dead_letters_into_the_table(alice, profile_ctx, sim_queue):
    job_id = (await simulate(alice, alice.user_id)).json()["data"]["job_id"]
    await sim_queue.register("w")
    await sim_queue.claim("w", timeout=1)
    for _ in range(3):  # the worker dies on every attempt
        await sim_queue.reap_worker("w", force=True)
        await sim_queue.register("w")
        if await sim_queue.claim("w", timeout=0.2) is None:
            break
    assert (await sim_queue.owned([job_id]))[job_id] == "dead"
    result = await simulation_jobs.reconcile(profile_ctx.db, sim_queue, grace_seconds=0)
    assert result.marked_dead == 1
    job = (await alice.client.get("/getSimulationJob", params={"job_id": job_id})).json()["data"]
    assert job["status"] == "dead" and "stopped during attempt 3" in job["last_error"]


async def test_routes_have_operation_ids_and_are_mcp_tools(profile_app):
    paths = profile_app.openapi()["paths"]
    for path, method in [("/simulateConversation", "post"), ("/getSimulationJob", "get"),
                         ("/listSimulationJobs", "get"), ("/cancelSimulationJob", "post"),
                         ("/listDeadSimulationJobs", "get"), ("/retrySimulationJob", "post")]:
        assert paths[path][method]["operationId"] == path.lstrip("/")
