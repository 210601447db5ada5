"""Simulations on the real cluster: API → Redis queue → simulator actors (DeepEval against the
sandbox LLM) → a stored, scored conversation; actor kills, retries to dead, idempotency,
cancel, pool scaling, and the bulk entry point (also through `ray job submit`)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from core.principal import TokenKind
from sandbox.server import free_port
from storage.models import Conversation, SimulationJob
from storage.redis import make_redis
from tests.support.actors import make_token, make_user

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
FINISHED = ("succeeded", "dead", "cancelled")


@pytest.fixture(scope="module")
async def service_client(serve_cluster):
    token, _ = await make_token(serve_cluster["db"], TokenKind.service)
    async with httpx.AsyncClient(base_url=serve_cluster["base_url"], timeout=60,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        yield client


@pytest.fixture
def llm_url(serve_cluster) -> str:
    return serve_cluster["env"]["SMA_LLM_BASE_URL"].removesuffix("/v1")


@pytest.fixture(autouse=True)
def clean_llm_faults(serve_cluster):
    url = serve_cluster["env"]["SMA_LLM_BASE_URL"].removesuffix("/v1")
    httpx.delete(f"{url}/_sandbox/faults")
    yield
    httpx.delete(f"{url}/_sandbox/faults")


def set_llm_faults(llm_url: str, **faults) -> None:
    httpx.post(f"{llm_url}/_sandbox/faults",
               json={"path_prefix": "/v1/chat/completions", **faults}).raise_for_status()


async def pool_status() -> dict:
    from ray import serve
    return await serve.get_app_handle("simulator").status.remote()


async def submit(client, user_id, **body) -> str:
    response = await client.post("/profile/simulateConversation",
                                 json={"user_id": str(user_id), **body})
    assert response.status_code == 202, response.text
    return response.json()["data"]["job_id"]


async def wait_job(client, job_id: str, statuses=FINISHED, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get("/profile/getSimulationJob", params={"job_id": job_id})
        assert response.status_code == 200, response.text
        job = response.json()["data"]
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}; "
                                 f"pool {await pool_status()}")
        await asyncio.sleep(0.25)


async def conversations_for_job(db, user_id, job_id: str) -> list[Conversation]:
    async with db.transaction() as session:
        rows = list(await session.scalars(select(Conversation).where(Conversation.user_id == user_id)))
        found = [c for c in rows if (c.meta or {}).get("job_id") == job_id]
        for conversation in found:
            await session.refresh(conversation, ["turns"])
        return found


async def until(predicate, timeout: float, message: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, message
        await asyncio.sleep(interval)


async def test_the_pool_is_deployed_and_alive(serve_cluster):
    async with httpx.AsyncClient(base_url=serve_cluster["base_url"], timeout=30) as client:
        health = await client.get("/simulator/health")
    assert health.status_code == 200 and health.json()["data"]["alive"] is True
    status = await until(pool_status_with_actors, 60, "no simulator actor started")
    assert status["limits"] == {"min": 1, "max": 3, "jobs_per_actor": 2}


async def pool_status_with_actors():
    status = await pool_status()
    return status if status["active"] >= 1 else None


async def test_a_job_becomes_a_stored_scored_conversation(serve_cluster, e2e_user):
    client, user_id = e2e_user["client"], e2e_user["user_id"]
    job_id = await submit(client, user_id, config={"max_turns": 3, "seed": 42})
    job = await wait_job(client, job_id, timeout=180)
    assert job["status"] == "succeeded", job
    assert job["metrics"]["computed"] is True and job["metrics"]["judge_model"] == "sandbox-judge"
    assert set(job["metrics"]["scores"]) == {"conversation_completeness", "turn_relevancy"}
    assert job["metrics"]["tokens"]["total"] > 0

    [conversation] = await conversations_for_job(serve_cluster["db"], user_id, job_id)
    assert str(conversation.id) == job["conversation_id"] and conversation.closed
    assert conversation.meta["sim"] is True and conversation.meta["seed"] == 42
    assert conversation.meta["simulation_type"] == "conversation"
    assert conversation.meta["models"]["simulated_user"] == "sandbox-user"
    system = conversation.turns[-1]
    assert system.role == "system" and system.content.startswith("[DeepEval Simulation Metrics]")
    for metric in system.extra_json["metrics"].values():
        assert metric["computed"] and 0 <= metric["score"] <= 1 and metric["reason"]
    assert [t.extra_json["turn_number"] for t in conversation.turns[:-1]] == \
        list(range(1, len(conversation.turns)))

    # The user reads it back through the API like any other conversation.
    fetched = await client.get("/profile/getConversation", params={"conversation_id": job["conversation_id"]})
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["data"]["closed"] is True


async def test_idempotency_key_and_cancel(serve_cluster, e2e_user, llm_url):
    client, user_id = e2e_user["client"], e2e_user["user_id"]
    first = await submit(client, user_id, idempotency_key="e2e-once", config={"max_turns": 1})
    again = await submit(client, user_id, idempotency_key="e2e-once", config={"max_turns": 1})
    assert first == again
    await wait_job(client, first)

    set_llm_faults(llm_url, latency_ms=300)  # keep the next job in flight long enough
    job_id = await submit(client, user_id, config={"max_turns": 4})
    cancelled = await client.post("/profile/cancelSimulationJob", json={"job_id": job_id})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["data"]["status"] == "cancelled"
    await asyncio.sleep(3)  # whatever a worker was doing with it, it must not store a result
    job = await wait_job(client, job_id)
    assert job["status"] == "cancelled" and job["conversation_id"] is None
    assert await conversations_for_job(serve_cluster["db"], user_id, job_id) == []
    assert (await client.post("/profile/cancelSimulationJob", json={"job_id": job_id})).status_code == 409


async def _holder(redis, job_id: str) -> str | None:
    """The worker whose processing list holds the job."""
    async for key in redis.scan_iter("simulation_jobs:processing:*"):
        for raw in await redis.lrange(key, 0, -1):
            if json.loads(raw)["id"] == job_id:
                return key.rsplit(":", 1)[1]
    return None


async def test_killing_an_actor_mid_job_loses_nothing_and_duplicates_nothing(serve_cluster, e2e_user, llm_url):
    import ray

    client, user_id = e2e_user["client"], e2e_user["user_id"]
    restarts_before = (await pool_status())["restarts"]
    set_llm_faults(llm_url, latency_ms=250)
    job_id = await submit(client, user_id, config={"max_turns": 4})
    redis = make_redis(serve_cluster["env"]["SMA_REDIS_URL"])
    try:
        await wait_job(client, job_id, statuses=("running",), timeout=60)
        worker = await until(lambda: _holder(redis, job_id), 30, "job not in a processing list")
        await asyncio.sleep(1.0)  # well into the conversation
        ray.kill(ray.get_actor(f"simulator-{worker}", namespace="sma"), no_restart=True)
    finally:
        await redis.aclose()
    job = await wait_job(client, job_id, timeout=180)
    assert job["status"] == "succeeded", job
    assert job["attempts"] >= 2  # the killed attempt counted; a later one finished it
    assert len(await conversations_for_job(serve_cluster["db"], user_id, job_id)) == 1
    status = await pool_status()
    assert status["restarts"] > restarts_before
    assert worker not in {a["worker_id"] for a in status["actors"]}


async def test_the_pool_itself_is_restarted_and_its_jobs_survive(serve_cluster, e2e_user, llm_url):
    """Killing the pool's Serve replica takes its actors with it (they are owned by it); Serve
    starts a new pool, which reclaims the in-flight job once its worker's heartbeat expires."""
    import ray

    client, user_id = e2e_user["client"], e2e_user["user_id"]
    set_llm_faults(llm_url, latency_ms=250)
    job_id = await submit(client, user_id, config={"max_turns": 4})
    await wait_job(client, job_id, statuses=("running",), timeout=60)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::simulator#SimulatorPool")]
    assert len(replicas) == 1
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)

    job = await wait_job(client, job_id, timeout=180)
    assert job["status"] == "succeeded", job
    assert job["attempts"] >= 2
    assert len(await conversations_for_job(serve_cluster["db"], user_id, job_id)) == 1
    status = await until(pool_status_with_actors, 60, "the new pool has no actor")
    assert status["restarts"] == 0  # a fresh pool
    async with httpx.AsyncClient(base_url=serve_cluster["base_url"], timeout=30) as http:
        assert (await http.get("/simulator/health")).status_code == 200


async def test_an_always_failing_job_backs_off_and_ends_dead(serve_cluster, e2e_user, e2e_admin, llm_url):
    client, user_id = e2e_user["client"], e2e_user["user_id"]
    set_llm_faults(llm_url, fail_status=500)
    job_id = await submit(client, user_id, config={"max_turns": 2})
    job = await wait_job(client, job_id, timeout=120)
    assert job["status"] == "dead", job
    assert job["attempts"] == 3 and "500" in job["last_error"]
    async with serve_cluster["db"].transaction() as session:
        row = await session.get(SimulationJob, uuid.UUID(job_id))
    # Two backoffs of 0.5 s and 1 s lie between the first claim and the end.
    assert (row.finished_at - row.created_at).total_seconds() >= 1.5
    redis = make_redis(serve_cluster["env"]["SMA_REDIS_URL"])
    try:
        entry = json.loads(await redis.hget("simulation_jobs:dead_entries", job_id))
    finally:
        await redis.aclose()
    assert entry["attempts"] == 3 and "500" in entry["error"] and entry["job"]["id"] == job_id
    dead = (await e2e_admin["client"].get("/profile/listDeadSimulationJobs")).json()["data"]
    assert job_id in {j["id"] for j in dead["items"]}
    assert await conversations_for_job(serve_cluster["db"], user_id, job_id) == []

    # Once the LLM works again an admin can send it back through.
    httpx.delete(f"{llm_url}/_sandbox/faults")
    retried = await e2e_admin["client"].post("/profile/retrySimulationJob", json={"job_id": job_id})
    assert retried.status_code == 202, retried.text
    job = await wait_job(client, job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert len(await conversations_for_job(serve_cluster["db"], user_id, job_id)) == 1


async def test_the_pool_scales_up_under_a_backlog_and_back_down(serve_cluster, service_client, llm_url):
    user_id = await make_user(serve_cluster["db"])
    set_llm_faults(llm_url, latency_ms=400)
    job_ids = [await submit(service_client, user_id, config={"max_turns": 2, "metrics": ["turn_relevancy"]})
               for _ in range(8)]

    async def at_max():
        status = await pool_status()
        return status if status["active"] == 3 else None

    scaled_up = await until(at_max, 60, "the pool did not grow to 3 actors")
    assert scaled_up["scale_events"][-1]["to"] == 3
    for job_id in job_ids:
        assert (await wait_job(service_client, job_id, timeout=180))["status"] == "succeeded"
    httpx.delete(f"{llm_url}/_sandbox/faults")

    async def at_min():
        status = await pool_status()
        return status if status["active"] == 1 and not status["actors"][1:] else None

    scaled_down = await until(at_min, 60, "the pool did not shrink back to 1 actor")
    assert scaled_down["scale_events"][-1]["to"] == 1


async def test_simulation_metrics_are_exported(serve_cluster):
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            text = (await client.get(serve_cluster["metrics_url"])).text
            wanted = ("ray_sma_sim_jobs_total{", "ray_sma_sim_queue_depth{",
                      "ray_sma_sim_job_duration_s_bucket{", "ray_sma_llm_tokens_total{")
            if all(w in text for w in wanted):
                break
            assert time.monotonic() < deadline, [w for w in wanted if w not in text]
            await asyncio.sleep(2)
    assert any('outcome="succeeded"' in line for line in text.splitlines()
               if line.startswith("ray_sma_sim_jobs_total{"))


# --- bulk batches -------------------------------------------------------------------------

async def test_bulk_entry_point_runs_against_the_cluster(serve_cluster, tmp_path):
    users = [str(await make_user(serve_cluster["db"])) for _ in range(2)]
    out = tmp_path / "report"
    env = {**os.environ, **serve_cluster["env"], "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobs.bulk_simulate", "--user-ids", ",".join(users),
        "--templates", "health_assessment,belief_exploration", "-k", "2", "--max-turns", "2",
        "--threshold", "0.5", "--out", str(out), "--poll", "0.5", "--timeout", "240",
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert "success rate 1.000 (8/8)" in stdout.decode()
    assert "simulations: 100%" in stderr.decode()  # the progress bar
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["succeeded"] == 8 and report["pass_k"]["judged"] == 4
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "durations.png",
                                               "metrics_health_assessment.png",
                                               "metrics_belief_exploration.png"}


async def test_bulk_batch_through_ray_job_submit(serve_cluster, tmp_path):
    """`ray job submit` needs a dashboard, which the shared cluster runs without: a small head
    with one (on ports of its own) runs the batch's driver, and the shared cluster's simulator
    pool (same database and Redis) runs the simulations."""
    user_id = str(await make_user(serve_cluster["db"]))
    ray_cli = str(Path(sys.executable).with_name("ray"))
    dashboard = free_port()
    address = f"http://127.0.0.1:{dashboard}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    # `--block`: the head lives as long as this process; terminating it takes the head down.
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(free_port()), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), "--dashboard-agent-listen-port", str(free_port()),
         "--dashboard-agent-grpc-port", str(free_port()), "--metrics-export-port", str(free_port()),
         "--runtime-env-agent-port", str(free_port()), "--num-cpus", "1",
         "--object-store-memory", str(80 * 1024 * 1024), "--disable-usage-stats"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await until(lambda: _dashboard_up(address), 120, "the head's dashboard did not come up",
                    interval=1)
        out = tmp_path / "report"
        submit_cmd = [ray_cli, "job", "submit", "--address", address,
                      "--runtime-env-json", json.dumps({"env_vars": serve_cluster["env"]}), "--",
                      sys.executable, "-m", "jobs.bulk_simulate", "--user-ids", user_id, "-k", "2",
                      "--max-turns", "1", "--out", str(out), "--poll", "0.5", "--timeout", "180",
                      "--no-progress"]
        deadline = time.monotonic() + 90
        while True:
            result = await asyncio.to_thread(subprocess.run, submit_cmd, env=env, cwd=REPO,
                                             capture_output=True, text=True, timeout=300)
            # The node's job agent registers a little after the dashboard answers.
            if "No available agent" not in result.stderr or time.monotonic() > deadline:
                break
            await asyncio.sleep(2)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        assert "succeeded" in result.stdout and "success rate 1.000 (2/2)" in result.stdout
        assert (out / "report.json").exists() and (out / "report.md").exists()
        assert (out / "metrics_health_assessment.png").exists()
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()


async def _dashboard_up(address: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            return (await client.get(f"{address}/api/version")).status_code == 200
    except httpx.HTTPError:
        return False
