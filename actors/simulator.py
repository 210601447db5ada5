"""The supervised pool of simulator actors (SPEC §1, §4.9, §7).

`SimulatorActor` is a Ray actor that claims jobs from the `simulation_jobs` queue and runs up
to `sim_jobs_per_actor` of them at once (they mostly wait on the LLM): each on a worker
thread with its own asyncio loop, outside any uvloop. It heartbeats while alive; if it dies
mid-job, its heartbeat expires (or the pool notices at once) and the job goes back to the
queue.

`SimulatorPool` owns the actors: it restarts dead ones, scales their number between
`sim_min_actors` and `sim_max_actors` by queue depth, reaps the jobs of dead workers, promotes
delayed retries, reconciles the queue with the `simulation_job` table and exports queue
metrics. It is hosted by the Serve deployment in `deployments/simulator.py`, so Serve restarts
it if it dies; the actors it created die with it (Ray fate-sharing) and the next pool reclaims
their jobs through the expired heartbeats.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.metrics import Gauge

from core.metrics import metrics
from core.settings import Settings, get_settings
from services import simulation_jobs
from services.simulation_runner import JobProcessor, JobReport
from storage.db import Database
from storage.queue import ClaimedJob, ReliableQueue, Reaped
from storage.redis import REDIS_ERRORS, make_redis

os.environ.setdefault("DEEPEVAL_TELEMETRY_OPT_OUT", "1")
os.environ.setdefault("DEEPEVAL_DISABLE_DOTENV", "1")

log = logging.getLogger(__name__)

NAMESPACE = "sma"
ACTOR_NAME = "simulator-{worker_id}"
CLAIM_TIMEOUT_SECONDS = 1.0  # below the Redis client's socket timeout
LLM_ROLES = ("coach", "simulated_user", "judge")


def observe_job(report: JobReport) -> None:
    """Project metrics for one processed job: outcome, duration and LLM tokens."""
    m = metrics()
    m.sim_jobs.inc(1, tags={"outcome": report.outcome})
    if report.outcome in ("succeeded", "retry", "dead"):
        m.sim_job_duration.observe(report.duration_seconds, tags={"template": report.template})
    result = report.result
    if result is None:
        return
    for role, usage in result.usage.items():
        model = str(result.models.get(role) or role)
        for kind in ("prompt", "completion"):
            tokens = usage.get(f"{kind}_tokens", 0)
            if tokens:
                m.llm_tokens.inc(tokens, tags={"model": model, "kind": kind})


@ray.remote(max_restarts=0)
class SimulatorActor:
    """One worker of the queue. `run` is its life: it returns after `drain` once its jobs are
    done; the pool watches the call to learn that the actor died."""

    def __init__(self, worker_id: str, concurrency: int):
        self.worker_id = worker_id
        self.concurrency = max(1, concurrency)
        self.settings: Settings = get_settings()
        self.inflight: dict[str, str] = {}  # raw queue item -> job id
        self.processed = 0
        self._draining = asyncio.Event()

    async def run(self) -> dict[str, Any]:
        settings = self.settings
        db = Database(settings.resolved_database_url())
        redis = make_redis(settings.redis_url)
        queue = ReliableQueue.from_settings(redis, settings)
        processor = JobProcessor(db, queue, settings, self.worker_id,
                                 concurrency=self.concurrency, observer=observe_job)
        if settings.llm_configured:  # import DeepEval (~1.5 s) before the first job needs it
            asyncio.get_running_loop().run_in_executor(
                processor.executor, importlib.import_module, "deepeval.simulator")
        await self._register(queue)
        heartbeat = asyncio.create_task(self._heartbeat(queue))
        try:
            await asyncio.gather(*(self._work(queue, processor) for _ in range(self.concurrency)))
        finally:
            heartbeat.cancel()
            try:
                await queue.unregister(self.worker_id)
            except REDIS_ERRORS:
                log.warning("worker %s could not unregister; its heartbeat will expire",
                            self.worker_id)
            processor.close()
            await redis.aclose()
            await db.dispose()
        return {"worker_id": self.worker_id, "processed": self.processed}

    async def _register(self, queue: ReliableQueue) -> None:
        while True:
            try:
                await queue.register(self.worker_id)
                return
            except REDIS_ERRORS:
                await asyncio.sleep(1)

    async def _work(self, queue: ReliableQueue, processor: JobProcessor) -> None:
        while not self._draining.is_set():
            try:
                claimed = await queue.claim(self.worker_id, timeout=CLAIM_TIMEOUT_SECONDS)
            except REDIS_ERRORS:
                await asyncio.sleep(1)
                continue
            if claimed is None:
                continue
            await self._process(processor, claimed)

    async def _process(self, processor: JobProcessor, claimed: ClaimedJob) -> None:
        self.inflight[claimed.raw] = claimed.id
        try:
            await processor.process(claimed)
        except Exception:
            # Redis or the database failed while recording the outcome: the job stays in our
            # processing list and returns to the queue if we stop heartbeating.
            log.exception("simulation job %s: outcome not recorded", claimed.id)
        finally:
            self.inflight.pop(claimed.raw, None)
            self.processed += 1

    async def _heartbeat(self, queue: ReliableQueue) -> None:
        interval = max(0.2, queue.heartbeat_seconds / 3)
        suspects: set[str] = set()
        while True:
            try:
                await queue.heartbeat(self.worker_id)
                # Items we hold but are not working on (a claim whose reply was lost) go back
                # once seen twice in a row, so a claim that is just arriving is never touched.
                idle = {raw for raw in await queue.held(self.worker_id) if raw not in self.inflight}
                await queue.requeue_orphans(self.worker_id, sorted(idle & suspects))
                suspects = idle - suspects
            except REDIS_ERRORS:
                log.warning("worker %s: heartbeat failed (Redis unavailable)", self.worker_id)
            await asyncio.sleep(interval)

    async def drain(self) -> None:
        """Stop claiming; `run` returns when the jobs in flight are done."""
        self._draining.set()

    async def status(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "inflight": sorted(self.inflight.values()),
                "processed": self.processed, "draining": self._draining.is_set(),
                "pid": os.getpid()}


@dataclass
class ActorSlot:
    worker_id: str
    handle: Any
    run: Any  # concurrent.futures.Future of `SimulatorActor.run`
    started: float = field(default_factory=time.monotonic)
    draining: bool = False

    @property
    def name(self) -> str:
        return ACTOR_NAME.format(worker_id=self.worker_id)


class SimulatorPool:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or get_settings()
        self.db = Database(self.settings.resolved_database_url())
        self.redis = make_redis(self.settings.redis_url)
        self.queue = ReliableQueue.from_settings(self.redis, self.settings)
        self.slots: dict[str, ActorSlot] = {}
        self.interval = min(1.0, max(0.2, self.settings.sim_heartbeat_seconds / 4))
        self.restarts = 0
        self.scale_events: list[dict[str, Any]] = []
        self.last_depth: dict[str, int] = {}
        self._low_since: float | None = None
        self._last_reconcile = 0.0
        self._actors_gauge = Gauge("sma_sim_actors", description="Simulator actors in the pool",
                                   tag_keys=("state",))

    # -- the loop --

    async def run_forever(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("simulator pool tick failed")
            await asyncio.sleep(self.interval)

    async def tick(self) -> None:
        await self._collect_finished()
        for reaped in await self.queue.reap():
            await self._record_reaped(reaped)
        await self.queue.promote_due()
        depth = await self.queue.depth()
        self.last_depth = depth
        for name in ("pending", "delayed", "processing", "dead"):
            metrics().sim_queue_depth.set(depth[name], tags={"queue": name})
        self._scale(depth)
        active = sum(1 for s in self.slots.values() if not s.draining)
        self._actors_gauge.set(active, tags={"state": "active"})
        self._actors_gauge.set(len(self.slots) - active, tags={"state": "draining"})
        now = time.monotonic()
        if now - self._last_reconcile >= self.settings.sim_reconcile_seconds:
            self._last_reconcile = now
            result = await simulation_jobs.reconcile(
                self.db, self.queue, grace_seconds=self.settings.sim_reconcile_seconds)
            if result.enqueued or result.marked_dead:
                log.info("reconciled simulation jobs: %s", result)

    # -- actors --

    def _spawn(self) -> ActorSlot:
        worker_id = ReliableQueue.new_worker_id("sim")
        handle = SimulatorActor.options(
            name=ACTOR_NAME.format(worker_id=worker_id), namespace=NAMESPACE,
            num_cpus=self.settings.sim_actor_num_cpus, max_concurrency=1000,
        ).remote(worker_id, self.settings.sim_jobs_per_actor)
        slot = ActorSlot(worker_id, handle, handle.run.remote().future())
        self.slots[worker_id] = slot
        return slot

    async def _collect_finished(self) -> None:
        """Actors whose `run` ended: drained ones are released; any other died (or broke),
        so their jobs go back to the queue now rather than when the heartbeat expires."""
        for slot in [s for s in self.slots.values() if s.run.done()]:
            error = slot.run.exception()
            if error is not None:
                log.warning("simulator actor %s died: %s", slot.worker_id, type(error).__name__)
            clean = error is None and slot.draining
            del self.slots[slot.worker_id]
            ray.kill(slot.handle, no_restart=True)
            if not clean:
                self.restarts += 1
                await self._record_reaped(await self.queue.reap_worker(slot.worker_id, force=True))

    async def _record_reaped(self, reaped: Reaped) -> None:
        if reaped.requeued:
            log.warning("returned %d job(s) of worker %s to the queue", len(reaped.requeued),
                        reaped.worker)
        for job in reaped.dead:
            entry = await self.queue.dead_entry(job["id"]) or {}
            async with self.db.transaction() as session:
                await simulation_jobs.record_dead(session, uuid.UUID(job["id"]),
                                                  entry.get("attempts"),
                                                  entry.get("error") or "worker lost")

    def desired_actors(self, depth: dict[str, int]) -> int:
        s = self.settings
        backlog = depth["pending"] + depth["processing"]
        wanted = math.ceil(backlog / max(1, s.sim_jobs_per_actor))
        return max(s.sim_min_actors, min(s.sim_max_actors, wanted))

    def _scale(self, depth: dict[str, int]) -> None:
        active = [s for s in self.slots.values() if not s.draining]
        desired = self.desired_actors(depth)
        if desired > len(active):
            for _ in range(desired - len(active)):
                self._spawn()
            self._low_since = None
            self._note_scale(len(active), desired, depth)
        elif desired < len(active):
            now = time.monotonic()
            if self._low_since is None:
                self._low_since = now
            elif now - self._low_since >= self.settings.sim_scale_down_seconds:
                for slot in sorted(active, key=lambda s: s.started)[desired:]:
                    slot.draining = True
                    slot.handle.drain.remote()
                self._low_since = None
                self._note_scale(len(active), desired, depth)
        else:
            self._low_since = None

    def _note_scale(self, before: int, after: int, depth: dict[str, int]) -> None:
        log.info("simulator pool: %d -> %d actors (queue %s)", before, after, depth)
        self.scale_events = [*self.scale_events[-49:],
                             {"at": time.time(), "from": before, "to": after,
                              "pending": depth["pending"], "processing": depth["processing"]}]

    # -- inspection --

    async def status(self) -> dict[str, Any]:
        return {"actors": [{"worker_id": s.worker_id, "name": s.name, "draining": s.draining}
                           for s in self.slots.values()],
                "active": sum(1 for s in self.slots.values() if not s.draining),
                "restarts": self.restarts, "queue": self.last_depth,
                "scale_events": self.scale_events,
                "limits": {"min": self.settings.sim_min_actors, "max": self.settings.sim_max_actors,
                           "jobs_per_actor": self.settings.sim_jobs_per_actor}}
