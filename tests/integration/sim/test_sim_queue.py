"""The reliable queue against a real Redis: claims, acks, retries with backoff, dead letters,
the reaper (including a worker process killed mid-job), and atomicity under concurrency."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from storage.queue import ReliableQueue
from tests.integration.sim.conftest import BACKOFF_SECONDS, HEARTBEAT_SECONDS

REPO = Path(__file__).resolve().parents[3]


def job(max_attempts: int = 3, **extra) -> dict:
    return {"id": str(uuid.uuid4()), "max_attempts": max_attempts, "config": {"metrics": []},
            **extra}


async def test_enqueue_claim_ack_is_fifo_and_dedupes(queue, redis):
    first, second = job(), job()
    assert await queue.enqueue(first) is True
    assert await queue.enqueue(second) is True
    assert await queue.enqueue(first) is False  # already owned: not queued twice
    assert await redis.llen("simulation_jobs") == 2
    await queue.register("w1")

    claimed = await queue.claim("w1", timeout=0.1)
    assert claimed.id == first["id"] and claimed.attempt == 1
    assert claimed.data["config"] == {"metrics": []}  # the JSON round-trips unchanged
    assert await redis.lrange("simulation_jobs:processing:w1", 0, -1) == [claimed.raw]
    assert (await queue.depth())["processing"] == 1

    assert await queue.ack("w1", claimed) is True
    assert await redis.llen("simulation_jobs:processing:w1") == 0
    assert (await queue.owned([first["id"], second["id"]])) == {first["id"]: None,
                                                                second["id"]: "live"}
    assert (await queue.claim("w1", timeout=0.1)).id == second["id"]
    assert await queue.claim("w1", timeout=0.1) is None


async def test_claim_waits_for_a_job(queue):
    await queue.register("w1")
    started = time.monotonic()
    assert await queue.claim("w1", timeout=0.2) is None
    assert time.monotonic() - started >= 0.15

    waiter = asyncio.create_task(queue.claim("w1", timeout=2))
    await asyncio.sleep(0.1)
    queued = job()
    await queue.enqueue(queued)
    assert (await waiter).id == queued["id"]


async def test_failures_back_off_exponentially_then_go_dead(queue, redis):
    queued = job(max_attempts=3)
    await queue.enqueue(queued)
    await queue.register("w1")
    delays = []
    for attempt in (1, 2):
        claimed = await queue.claim("w1", timeout=0.5)
        assert claimed.attempt == attempt
        outcome = await queue.fail("w1", claimed, f"boom {attempt}")
        assert outcome.action == "retry" and outcome.attempts == attempt
        delays.append(outcome.delay_seconds)
        assert await redis.zcard("simulation_jobs:delayed") == 1
        assert await queue.promote_due() == 0  # not due yet
        await asyncio.sleep(outcome.delay_seconds + 0.02)
        assert await queue.promote_due() == 1
    assert delays == [pytest.approx(BACKOFF_SECONDS), pytest.approx(2 * BACKOFF_SECONDS)]

    claimed = await queue.claim("w1", timeout=0.5)
    assert claimed.attempt == 3
    outcome = await queue.fail("w1", claimed, "boom 3")
    assert outcome.action == "dead" and outcome.attempts == 3
    [entry] = await queue.dead_letters()
    assert entry["error"] == "boom 3" and entry["attempts"] == 3
    assert entry["job"] == queued
    assert await queue.dead_entry(queued["id"]) == entry
    assert (await queue.owned([queued["id"]]))[queued["id"]] == "dead"
    depth = await queue.depth()
    assert (depth["pending"], depth["delayed"], depth["processing"], depth["dead"]) == (0, 0, 0, 1)

    assert await queue.revive(queued["id"]) is True
    assert await redis.llen("simulation_jobs:dead") == 0
    revived = await queue.claim("w1", timeout=0.5)
    assert revived.id == queued["id"] and revived.attempt == 1


async def test_not_retryable_goes_dead_at_once(queue):
    await queue.enqueue(job(max_attempts=5))
    await queue.register("w1")
    claimed = await queue.claim("w1", timeout=0.5)
    outcome = await queue.fail("w1", claimed, "NotFound: Unknown user", retryable=False)
    assert (outcome.action, outcome.attempts) == ("dead", 1)


async def test_backoff_is_capped(redis):
    queue = ReliableQueue(redis, backoff_base_seconds=2, max_backoff_seconds=5)
    assert [queue.backoff_seconds(n) for n in (1, 2, 3, 4)] == [2, 4, 5, 5]


async def test_reaper_returns_a_dead_workers_jobs_to_the_head(queue, redis):
    older, newer = job(), job()
    await queue.enqueue(older)
    await queue.register("gone")
    await queue.register("alive")
    claimed = await queue.claim("gone", timeout=0.5)
    await queue.enqueue(newer)

    assert await queue.reap() == []  # heartbeat still fresh
    await redis.delete(queue.heartbeat_key("gone"))  # as if its TTL ran out
    [reaped] = await queue.reap()
    assert reaped.worker == "gone" and [j["id"] for j in reaped.requeued] == [claimed.id]
    assert "gone" not in await redis.smembers("simulation_jobs:workers")
    assert "alive" in await redis.smembers("simulation_jobs:workers")

    again = await queue.claim("alive", timeout=0.5)
    assert again.id == older["id"]  # ahead of the job queued after it
    assert again.attempt == 2  # the lost attempt counts
    # The first worker's late ack or failure changes nothing: the job is no longer its own.
    assert await queue.ack("gone", claimed) is False
    assert (await queue.fail("gone", claimed, "late")).action == "lost"
    assert (await queue.owned([older["id"]]))[older["id"]] == "live"


async def test_reaper_dead_letters_a_job_that_keeps_killing_workers(queue, redis):
    queued = job(max_attempts=2)
    await queue.enqueue(queued)
    for worker in ("a", "b"):
        await queue.register(worker)
        await queue.claim(worker, timeout=0.5)
        reaped = await queue.reap_worker(worker, force=True)
    assert reaped.dead and reaped.dead[0]["id"] == queued["id"]
    entry = await queue.dead_entry(queued["id"])
    assert entry["attempts"] == 2 and "stopped during attempt 2" in entry["error"]


WORKER_SCRIPT = """
import asyncio, sys
from storage.queue import ReliableQueue
from storage.redis import make_redis

async def main():
    queue = ReliableQueue(make_redis(sys.argv[1]), heartbeat_seconds=float(sys.argv[2]))
    await queue.register("doomed")
    claimed = await queue.claim("doomed", timeout=5)
    print(claimed.id, flush=True)
    while True:  # "working" and heartbeating until killed
        await queue.heartbeat("doomed")
        await asyncio.sleep(0.1)

asyncio.run(main())
"""


async def test_a_killed_worker_process_loses_no_job(queue, redis, redis_url):
    queued = job()
    await queue.enqueue(queued)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, redis_url, str(HEARTBEAT_SECONDS)],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        claimed_id = await asyncio.to_thread(proc.stdout.readline)
        assert claimed_id.strip() == queued["id"]
        await asyncio.sleep(HEARTBEAT_SECONDS + 0.2)
        assert await queue.reap() == []  # alive: heartbeating
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert await redis.llen("simulation_jobs:processing:doomed") == 1

    deadline = time.monotonic() + HEARTBEAT_SECONDS + 3
    reaped = []
    while not reaped and time.monotonic() < deadline:
        reaped = await queue.reap()
        await asyncio.sleep(0.1)
    assert [j["id"] for j in reaped[0].requeued] == [queued["id"]]
    await queue.register("survivor")
    claimed = await queue.claim("survivor", timeout=0.5)
    assert claimed.id == queued["id"] and claimed.attempt == 2
    assert await redis.llen("simulation_jobs:processing:doomed") == 0


async def test_remove_drops_waiting_jobs_only(queue, redis):
    waiting, delayed, running = job(), job(), job()
    for queued in (running, delayed, waiting):
        await queue.enqueue(queued)
    await queue.register("w1")
    claimed_running = await queue.claim("w1", timeout=0.5)
    claimed_delayed = await queue.claim("w1", timeout=0.5)
    await queue.fail("w1", claimed_delayed, "later")

    assert await queue.remove(waiting["id"]) is True
    assert await queue.remove(delayed["id"]) is True
    assert await queue.remove(running["id"]) is False  # claimed: the worker decides
    assert await queue.remove(str(uuid.uuid4())) is False
    depth = await queue.depth()
    assert (depth["pending"], depth["delayed"], depth["processing"]) == (0, 0, 1)
    assert claimed_running.id == running["id"]


async def test_orphaned_claims_are_returned(queue, redis):
    queued = job()
    await queue.enqueue(queued)
    await queue.register("w1")
    claimed = await queue.claim("w1", timeout=0.5)
    assert await queue.requeue_orphans("w1", [claimed.raw]) == 1
    assert await redis.llen("simulation_jobs") == 1
    again = await queue.claim("w1", timeout=0.5)
    assert again.attempt == 1  # not counted: the job never ran


async def test_concurrent_workers_process_every_job_exactly_once(queue, redis):
    ids = [job()["id"] for _ in range(200)]
    for job_id in ids:
        await queue.enqueue({"id": job_id, "max_attempts": 3})
    seen: list[str] = []

    async def worker(name: str):
        await queue.register(name)
        while True:
            claimed = await queue.claim(name, timeout=0.2)
            if claimed is None:
                return
            if len(seen) % 7 == 0 and claimed.attempt == 1:
                await queue.fail(name, claimed, "flaky")  # retried after a short backoff
                await asyncio.sleep(BACKOFF_SECONDS)
                await queue.promote_due()
                continue
            seen.append(claimed.id)
            await queue.ack(name, claimed)

    await asyncio.gather(*(worker(f"w{i}") for i in range(4)))
    while await queue.promote_due() or await redis.llen("simulation_jobs"):
        await worker("late")
        await asyncio.sleep(BACKOFF_SECONDS)
    assert sorted(seen) == sorted(ids)
    depth = await queue.depth()
    assert (depth["pending"], depth["delayed"], depth["processing"], depth["dead"]) == (0, 0, 0, 0)
    assert await redis.hlen("simulation_jobs:jobs") == 0


async def test_enqueue_needs_an_id_and_attempt_budget(queue):
    with pytest.raises(ValueError):
        await queue.enqueue({"id": "x"})
