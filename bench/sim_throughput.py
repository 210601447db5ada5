"""Simulation throughput with 1, 2 and 4 simulator actors, and queue claim latency.

Real pieces end to end: a local Ray cluster running `actors.simulator.SimulatorActor`s, a real
Redis queue, a database, DeepEval's simulator and metrics, and the sandbox OpenAI-compatible
LLM with a fixed latency per call (default 200 ms). Each round enqueues a batch through the
service layer, waits for every job to succeed, and reports jobs per minute.

    python -m bench.sim_throughput                       # embedded Redis, SQLite in a temp dir
    python -m bench.sim_throughput --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/bench \\
        --redis-url redis://127.0.0.1:6379/6 --actors 1,2,4 --jobs-per-actor-slot 6

Claim latency: `ReliableQueue.claim` (BLMOVE + attempt lookup) and `ack` timed one by one
against a queue holding `--claim-samples` jobs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("DEEPEVAL_TELEMETRY_OPT_OUT", "1")
os.environ.setdefault("DEEPEVAL_DISABLE_DOTENV", "1")

import httpx  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def claim_latency(redis_url: str, samples: int) -> dict:
    from storage.queue import ReliableQueue
    from storage.redis import make_redis

    redis = make_redis(redis_url)
    prefix = f"bench_claims_{uuid.uuid4().hex[:8]}"
    queue = ReliableQueue(redis, prefix=prefix)
    try:
        for _ in range(samples):
            await queue.enqueue({"id": str(uuid.uuid4()), "max_attempts": 3,
                                 "config": {"max_turns": 6, "metrics": None}})
        await queue.register("bench")
        claims, acks = [], []
        for _ in range(samples):
            started = time.perf_counter()
            job = await queue.claim("bench", timeout=1)
            claims.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await queue.ack("bench", job)
            acks.append((time.perf_counter() - started) * 1000)
    finally:
        keys = [k async for k in redis.scan_iter(f"{prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
    return {"samples": samples,
            "claim_ms": {"p50": round(_percentile(claims, 0.5), 3), "p99": round(_percentile(claims, 0.99), 3),
                         "max": round(max(claims), 3)},
            "ack_ms": {"p50": round(_percentile(acks, 0.5), 3), "p99": round(_percentile(acks, 0.99), 3)}}


async def _wait_done(db, ids: list[uuid.UUID], timeout: float) -> dict[str, int]:
    from sqlalchemy import func, select

    from storage.models import SimulationJob

    deadline = time.monotonic() + timeout
    while True:
        async with db.transaction() as session:
            counts = dict((await session.execute(
                select(SimulationJob.status, func.count()).where(SimulationJob.id.in_(ids))
                .group_by(SimulationJob.status))).all())
        if counts.get("succeeded", 0) + counts.get("dead", 0) >= len(ids):
            return counts
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs not finished after {timeout}s: {counts}")
        await asyncio.sleep(0.2)


async def _submit(db, queue, user_id, n: int, max_turns: int) -> list[uuid.UUID]:
    from services import simulation_jobs
    from services.simulation_templates import SimulationConfig

    config = SimulationConfig(max_turns=max_turns)
    return [(await simulation_jobs.submit_job(db, queue, None, user_id=user_id, config=config)).job.id
            for _ in range(n)]


async def throughput_round(settings, actors: int, jobs_per_actor: int, jobs: int,
                           max_turns: int, llm_url: str) -> dict:
    import ray

    from actors.simulator import SimulatorActor
    from storage.db import Database
    from storage.queue import ReliableQueue
    from storage.redis import make_redis
    from tests.support.actors import make_user

    db = Database(settings.resolved_database_url())
    redis = make_redis(settings.redis_url)
    queue = ReliableQueue.from_settings(redis, settings)
    handles = []
    try:
        user_id = await make_user(db)
        handles = [SimulatorActor.options(num_cpus=0.01).remote(f"bench-{actors}-{i}", jobs_per_actor)
                   for i in range(actors)]
        runs = [h.run.remote() for h in handles]
        # Warm-up: every actor imports DeepEval and runs one job before the clock starts.
        await _wait_done(db, await _submit(db, queue, user_id, actors * jobs_per_actor, max_turns), 300)
        httpx.delete(f"{llm_url}/_sandbox/usage")
        started = time.monotonic()
        ids = await _submit(db, queue, user_id, jobs, max_turns)
        counts = await _wait_done(db, ids, 900)
        elapsed = time.monotonic() - started
        usage = httpx.get(f"{llm_url}/_sandbox/usage").json()
        for h in handles:
            h.drain.remote()
        await asyncio.wait_for(asyncio.gather(*runs), 120)
    finally:
        for h in handles:
            ray.kill(h)
        await redis.aclose()
        await db.dispose()
    return {"actors": actors, "jobs_per_actor": jobs_per_actor, "jobs": jobs,
            "succeeded": counts.get("succeeded", 0), "elapsed_s": round(elapsed, 2),
            "jobs_per_min": round(jobs / elapsed * 60, 1),
            "llm_calls_per_job": round(usage["requests"] / jobs, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sim_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actors", default="1,2,4")
    parser.add_argument("--jobs-per-actor", type=int, default=1,
                        help="concurrent jobs in each actor (default 1: actors are the unit)")
    parser.add_argument("--jobs-per-actor-slot", type=int, default=6,
                        help="batch size per concurrent job slot (jobs = slots × this)")
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--latency-ms", type=int, default=200)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--claim-samples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from core import cluster
    from core.settings import Settings
    from sandbox.llm import create_app as llm_app
    from sandbox.server import BackgroundServer, free_port
    from storage.migrate import upgrade_head_sync
    from storage.redis import EmbeddedRedis

    tmp = Path(tempfile.mkdtemp(prefix="sma-bench-"))
    redis_server = None
    redis_url = args.redis_url
    if not redis_url:
        redis_server = EmbeddedRedis(tmp / "redis", persist=False).start()
        redis_url = redis_server.url
    database_url = args.database_url or f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    upgrade_head_sync(database_url)
    results: dict = {"latency_ms_per_llm_call": args.latency_ms, "cpus": os.cpu_count()}
    try:
        results["claim_latency"] = asyncio.run(claim_latency(redis_url, args.claim_samples))
        print(json.dumps(results["claim_latency"]), flush=True)
        with BackgroundServer(llm_app()) as llm:
            httpx.post(f"{llm.url}/_sandbox/faults", json={
                "path_prefix": "/v1/chat/completions", "latency_ms": args.latency_ms}).raise_for_status()
            env = {"SMA_DATABASE_URL": database_url, "SMA_REDIS_URL": redis_url,
                   "SMA_DATA_DIR": str(tmp), "SMA_LLM_BASE_URL": f"{llm.url}/v1",
                   "SMA_LLM_API_KEY": "bench", "SMA_LLM_COACH_MODEL": "sandbox-coach",
                   "SMA_LLM_USER_MODEL": "sandbox-user", "SMA_LLM_JUDGE_MODEL": "sandbox-judge"}
            os.environ.update(env)
            settings = Settings()
            cluster.start_local_ray(gcs_port=None, dashboard_port=free_port(), include_dashboard=False,
                                    object_store_mb=100, env=env)
            rounds = []
            for actors in [int(a) for a in args.actors.split(",")]:
                jobs = actors * args.jobs_per_actor * args.jobs_per_actor_slot
                outcome = asyncio.run(throughput_round(settings, actors, args.jobs_per_actor, jobs,
                                                       args.max_turns, llm.url))
                print(json.dumps(outcome), flush=True)
                rounds.append(outcome)
            results["throughput"] = rounds
            base = rounds[0]["jobs_per_min"] / rounds[0]["actors"]
            for r in rounds:
                r["scaling_vs_linear"] = round(r["jobs_per_min"] / (base * r["actors"]), 2)
    finally:
        import ray
        if ray.is_initialized():
            ray.shutdown()
        if redis_server is not None:
            redis_server.stop()
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
