"""A reliable job queue on Redis lists (the `simulation_jobs` queue of SPEC §4.8–§4.9).

Keys (prefix `P`, by default `simulation_jobs`):

| key | type | holds |
|---|---|---|
| `P` | list | job JSON waiting to be claimed (`LPUSH` in, claimed from the right: FIFO) |
| `P:processing:{worker}` | list | jobs a worker has claimed (`BLMOVE P → here`) |
| `P:heartbeat:{worker}` | string with TTL | the worker is alive while this exists |
| `P:workers` | set | registered workers, so the reaper finds their processing lists |
| `P:delayed` | sorted set | job JSON waiting for a retry, scored by due time (ms) |
| `P:dead` | list | dead-letter entries `{"error", "attempts", "dead_at", "job": <job JSON>}` |
| `P:jobs` | hash | job id → job JSON for every job the queue owns (dedupes enqueues) |
| `P:attempts` | hash | job id → failed attempts so far |
| `P:dead_entries` | hash | job id → its dead-letter entry (for exact removal on retry) |

The job JSON is immutable once enqueued (the lists are matched by exact value); what changes
(attempt counts, errors) lives in the hashes. Every transition that touches more than one key
is one Lua script, so a crash between two commands can never lose or duplicate a job. The one
exception is the claim itself, a single atomic `BLMOVE` (blocking commands cannot run in Lua).

A claimed job returns to the queue when its worker's heartbeat expires (`reap`), counting as
a failed attempt so that a job that kills its worker ends dead rather than looping forever.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

DEFAULT_PREFIX = "simulation_jobs"
MAX_BACKOFF_SECONDS = 300.0
PROMOTE_BATCH = 500

_ENQUEUE = """
-- KEYS: pending, jobs; ARGV: id, raw
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('LPUSH', KEYS[1], ARGV[2])
return 1
"""

_ACK = """
-- KEYS: processing, jobs, attempts, dead_entries; ARGV: raw, id
-- A late ack from a worker that lost the job to the reaper changes nothing.
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('HDEL', KEYS[4], ARGV[2])
return 1
"""

_FAIL = """
-- KEYS: processing, delayed, dead, attempts, dead_entries
-- ARGV: raw, id, max_attempts, error, now_ms, base_ms, cap_ms, retryable
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return {'lost', 0, 0}  -- the reaper already returned it to the queue and counted it
end
local n = redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
local now = tonumber(ARGV[5])
if ARGV[8] == '1' and n < tonumber(ARGV[3]) then
  local delay = math.min(tonumber(ARGV[6]) * (2 ^ (n - 1)), tonumber(ARGV[7]))
  redis.call('ZADD', KEYS[2], now + delay, ARGV[1])
  return {'retry', n, tostring(delay)}
end
local entry = '{"error":' .. cjson.encode(ARGV[4]) .. ',"attempts":' .. n ..
              ',"dead_at":' .. now .. ',"job":' .. ARGV[1] .. '}'
redis.call('LPUSH', KEYS[3], entry)
redis.call('HSET', KEYS[5], ARGV[2], entry)
return {'dead', n, '0'}
"""

_BURY = """
-- A job the database already knows is dead: move it from processing to the dead letters.
-- KEYS: processing, dead, attempts, dead_entries; ARGV: raw, id, error, now_ms
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[4], ARGV[2]) == 1 then return 1 end
local n = tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0')
local entry = '{"error":' .. cjson.encode(ARGV[3]) .. ',"attempts":' .. n ..
              ',"dead_at":' .. ARGV[4] .. ',"job":' .. ARGV[1] .. '}'
redis.call('LPUSH', KEYS[2], entry)
redis.call('HSET', KEYS[4], ARGV[2], entry)
return 1
"""

_PROMOTE = """
-- KEYS: delayed, pending; ARGV: now_ms, batch
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, raw in ipairs(due) do
  redis.call('ZREM', KEYS[1], raw)
  redis.call('LPUSH', KEYS[2], raw)
end
return #due
"""

_REAP = """
-- Return a worker's claimed jobs to the queue (or to the dead letters when out of attempts).
-- KEYS: heartbeat, processing, workers, pending, dead, attempts, dead_entries
-- ARGV: worker, now_ms, force
if ARGV[3] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then return {} end
local out = {}
while true do
  local raw = redis.call('RPOP', KEYS[2])
  if not raw then break end
  local job = cjson.decode(raw)
  local n = redis.call('HINCRBY', KEYS[6], job.id, 1)
  if n < tonumber(job.max_attempts) then
    redis.call('RPUSH', KEYS[4], raw)  -- the claim end: it is the next job out
    table.insert(out, 'requeued')
  else
    local err = 'worker ' .. ARGV[1] .. ' stopped during attempt ' .. n
    local entry = '{"error":' .. cjson.encode(err) .. ',"attempts":' .. n ..
                  ',"dead_at":' .. ARGV[2] .. ',"job":' .. raw .. '}'
    redis.call('LPUSH', KEYS[5], entry)
    redis.call('HSET', KEYS[7], job.id, entry)
    table.insert(out, 'dead')
  end
  table.insert(out, raw)
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[3], ARGV[1])
return out
"""

_REQUEUE_ORPHANS = """
-- Items left in a live worker's processing list that it is not working on (a claim whose
-- reply was lost): back to the head of the queue, not counted as an attempt.
-- KEYS: processing, pending; ARGV: raw...
local moved = 0
for i = 1, #ARGV do
  if redis.call('LREM', KEYS[1], 1, ARGV[i]) == 1 then
    redis.call('RPUSH', KEYS[2], ARGV[i])
    moved = moved + 1
  end
end
return moved
"""

_REMOVE = """
-- Drop a job that is waiting (pending or delayed); claimed and dead jobs stay.
-- KEYS: jobs, pending, delayed, attempts; ARGV: id
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local removed = redis.call('LREM', KEYS[2], 0, raw) + redis.call('ZREM', KEYS[3], raw)
if removed > 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[1])
end
return removed
"""

_REVIVE = """
-- A dead job back to the queue with its attempts reset.
-- KEYS: jobs, dead, dead_entries, attempts, pending; ARGV: id
local entry = redis.call('HGET', KEYS[3], ARGV[1])
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not entry or not raw then return 0 end
redis.call('LREM', KEYS[2], 1, entry)
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('LPUSH', KEYS[5], raw)
return 1
"""


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class ClaimedJob:
    """A job as claimed: `raw` is the exact queued value, needed to ack or fail it."""
    raw: str
    data: dict[str, Any] = field(compare=False)
    attempts: int = 0  # failed attempts before this one

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def max_attempts(self) -> int:
        return int(self.data["max_attempts"])

    @property
    def attempt(self) -> int:
        """The number of the attempt this claim starts (1-based)."""
        return self.attempts + 1


@dataclass(frozen=True)
class FailOutcome:
    action: str            # retry | dead | lost
    attempts: int          # failed attempts so far
    delay_seconds: float = 0.0


@dataclass(frozen=True)
class Reaped:
    worker: str
    requeued: list[dict[str, Any]]
    dead: list[dict[str, Any]]


class ReliableQueue:
    def __init__(self, redis: Redis, *, prefix: str = DEFAULT_PREFIX,
                 heartbeat_seconds: float = 15.0, backoff_base_seconds: float = 2.0,
                 max_backoff_seconds: float = MAX_BACKOFF_SECONDS):
        self.redis = redis
        self.prefix = prefix
        self.heartbeat_seconds = heartbeat_seconds
        self.backoff_base_seconds = backoff_base_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.pending = prefix
        self.delayed = f"{prefix}:delayed"
        self.dead = f"{prefix}:dead"
        self.workers = f"{prefix}:workers"
        self.jobs = f"{prefix}:jobs"
        self.attempts = f"{prefix}:attempts"
        self.dead_entries = f"{prefix}:dead_entries"
        self._scripts = {name: redis.register_script(src) for name, src in (
            ("enqueue", _ENQUEUE), ("ack", _ACK), ("fail", _FAIL), ("bury", _BURY),
            ("promote", _PROMOTE), ("reap", _REAP), ("orphans", _REQUEUE_ORPHANS),
            ("remove", _REMOVE), ("revive", _REVIVE))}

    @classmethod
    def from_settings(cls, redis: Redis, settings: Any) -> "ReliableQueue":
        return cls(redis, heartbeat_seconds=settings.sim_heartbeat_seconds,
                   backoff_base_seconds=settings.sim_backoff_base_seconds)

    def processing(self, worker: str) -> str:
        return f"{self.prefix}:processing:{worker}"

    def heartbeat_key(self, worker: str) -> str:
        return f"{self.prefix}:heartbeat:{worker}"

    @staticmethod
    def new_worker_id(label: str = "worker") -> str:
        return f"{label}-{uuid.uuid4().hex[:12]}"

    # -- producers --

    async def enqueue(self, job: dict[str, Any]) -> bool:
        """Queue a job (needs `id` and `max_attempts`). A job the queue already owns is not
        queued twice: returns False then."""
        if "id" not in job or "max_attempts" not in job:
            raise ValueError("a queued job needs 'id' and 'max_attempts'")
        raw = json.dumps(job, sort_keys=True, separators=(",", ":"))
        return bool(await self._scripts["enqueue"](keys=[self.pending, self.jobs],
                                                   args=[job["id"], raw]))

    async def remove(self, job_id: str) -> bool:
        """Drop a waiting job (e.g. cancelled). Claimed or dead jobs are left alone."""
        return bool(await self._scripts["remove"](
            keys=[self.jobs, self.pending, self.delayed, self.attempts], args=[job_id]))

    async def revive(self, job_id: str) -> bool:
        """A dead job back to the queue with a fresh attempt budget."""
        return bool(await self._scripts["revive"](
            keys=[self.jobs, self.dead, self.dead_entries, self.attempts, self.pending],
            args=[job_id]))

    # -- workers --

    async def register(self, worker: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(self.workers, worker)
            pipe.set(self.heartbeat_key(worker), str(time.time()),
                     px=int(self.heartbeat_seconds * 1000))
            await pipe.execute()

    async def heartbeat(self, worker: str) -> None:
        await self.register(worker)

    async def unregister(self, worker: str) -> Reaped:
        """A worker leaving cleanly: anything it still holds goes back to the queue."""
        return await self.reap_worker(worker, force=True)

    async def claim(self, worker: str, timeout: float = 1.0) -> ClaimedJob | None:
        """Wait up to `timeout` seconds for a job and move it into the worker's processing
        list in one step (`BLMOVE`)."""
        raw = await self.redis.blmove(self.pending, self.processing(worker), timeout,
                                      src="RIGHT", dest="LEFT")
        if raw is None:
            return None
        data = json.loads(raw)
        attempts = int(await self.redis.hget(self.attempts, data["id"]) or 0)
        return ClaimedJob(raw=raw, data=data, attempts=attempts)

    async def ack(self, worker: str, job: ClaimedJob) -> bool:
        """The job is finished (whatever its outcome): the queue forgets it."""
        return bool(await self._scripts["ack"](
            keys=[self.processing(worker), self.jobs, self.attempts, self.dead_entries],
            args=[job.raw, job.id]))

    def backoff_seconds(self, failed_attempts: int) -> float:
        return min(self.backoff_base_seconds * 2 ** (failed_attempts - 1), self.max_backoff_seconds)

    async def fail(self, worker: str, job: ClaimedJob, error: str, *,
                   retryable: bool = True) -> FailOutcome:
        """Record a failed attempt: retry after an exponential backoff, or dead-letter the job
        once `max_attempts` attempts have failed (or at once when not retryable)."""
        action, attempts, delay_ms = await self._scripts["fail"](
            keys=[self.processing(worker), self.delayed, self.dead, self.attempts,
                  self.dead_entries],
            args=[job.raw, job.id, job.max_attempts, error[:4000], _now_ms(),
                  int(self.backoff_base_seconds * 1000), int(self.max_backoff_seconds * 1000),
                  "1" if retryable else "0"])
        return FailOutcome(action=action, attempts=int(attempts),
                           delay_seconds=float(delay_ms) / 1000)

    async def bury(self, worker: str, job: ClaimedJob, error: str) -> None:
        """Dead-letter a claimed job whose death is already decided elsewhere."""
        await self._scripts["bury"](
            keys=[self.processing(worker), self.dead, self.attempts, self.dead_entries],
            args=[job.raw, job.id, error[:4000], _now_ms()])

    async def held(self, worker: str) -> list[str]:
        return await self.redis.lrange(self.processing(worker), 0, -1)

    async def requeue_orphans(self, worker: str, raws: list[str]) -> int:
        if not raws:
            return 0
        return int(await self._scripts["orphans"](keys=[self.processing(worker), self.pending],
                                                  args=raws))

    # -- housekeeping (the pool supervisor) --

    async def promote_due(self) -> int:
        """Move delayed jobs whose backoff has passed back onto the queue."""
        return int(await self._scripts["promote"](keys=[self.delayed, self.pending],
                                                  args=[_now_ms(), PROMOTE_BATCH]))

    async def reap_worker(self, worker: str, *, force: bool = False) -> Reaped:
        """Return a worker's jobs to the queue if its heartbeat has expired (or `force`)."""
        out = await self._scripts["reap"](
            keys=[self.heartbeat_key(worker), self.processing(worker), self.workers,
                  self.pending, self.dead, self.attempts, self.dead_entries],
            args=[worker, _now_ms(), "1" if force else "0"])
        requeued, dead = [], []
        for action, raw in zip(out[::2], out[1::2]):
            (dead if action == "dead" else requeued).append(json.loads(raw))
        return Reaped(worker, requeued, dead)

    async def reap(self) -> list[Reaped]:
        """Reap every registered worker whose heartbeat has expired."""
        reaped = []
        for worker in await self.redis.smembers(self.workers):
            result = await self.reap_worker(worker)
            if result.requeued or result.dead:
                reaped.append(result)
        return reaped

    # -- inspection --

    async def depth(self) -> dict[str, int]:
        workers = sorted(await self.redis.smembers(self.workers))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(self.pending)
            pipe.zcard(self.delayed)
            pipe.llen(self.dead)
            for worker in workers:
                pipe.llen(self.processing(worker))
            pending, delayed, dead, *held = await pipe.execute()
        return {"pending": pending, "delayed": delayed, "processing": sum(held), "dead": dead,
                "workers": len(workers)}

    async def owned(self, job_ids: list[str]) -> dict[str, str | None]:
        """For each id: None if the queue does not hold it, 'dead' if dead-lettered, else 'live'."""
        if not job_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.jobs, job_ids)
            pipe.hmget(self.dead_entries, job_ids)
            raws, entries = await pipe.execute()
        return {job_id: (None if raw is None else "dead" if entry is not None else "live")
                for job_id, raw, entry in zip(job_ids, raws, entries)}

    async def dead_entry(self, job_id: str) -> dict[str, Any] | None:
        entry = await self.redis.hget(self.dead_entries, job_id)
        return json.loads(entry) if entry else None

    async def dead_letters(self, start: int = 0, stop: int = -1) -> list[dict[str, Any]]:
        return [json.loads(e) for e in await self.redis.lrange(self.dead, start, stop)]
