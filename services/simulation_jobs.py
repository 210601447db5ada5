"""Simulation jobs (SPEC §4.8): the `simulation_job` rows and their place in the queue.

The table is the source of truth for a job's outcome; the Redis queue (`storage.queue`) is
the source of truth for who runs it next. A job row is committed before its JSON is pushed,
so a push that fails (Redis down) never loses the job: `reconcile` re-enqueues every live row
the queue does not hold, and mirrors dead letters the table has not caught up with.

Functions that name a `principal` check it; `principal=None` is a trusted internal caller
(simulator workers, bulk batches).
"""
from __future__ import annotations

import logging
import random
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import Conflict, NotFound, ValidationFailed
from core.principal import Principal
from services.simulation_templates import SimulationConfig, resolve_template
from services.users import get_user
from storage.db import Database
from storage.models import SimulationJob
from storage.queue import ReliableQueue
from storage.redis import REDIS_ERRORS
from storage.types import utcnow

log = logging.getLogger(__name__)

STATUSES = ("queued", "running", "succeeded", "failed", "dead", "cancelled")
# `failed`: the last attempt failed and a retry is scheduled; `dead`: no attempts left.
LIVE_STATUSES = ("queued", "running", "failed")
TERMINAL_STATUSES = ("succeeded", "dead", "cancelled")
RECONCILE_BATCH = 500


def validate_status(status: str | None) -> str | None:
    if status is not None and status not in STATUSES:
        raise ValidationFailed(f"Unknown status {status!r}",
                               details=[{"loc": ["status"], "msg": f"must be one of {list(STATUSES)}"}])
    return status


def job_payload(job: SimulationJob) -> dict[str, Any]:
    """The JSON pushed onto `simulation_jobs`."""
    return {"id": str(job.id), "user_id": str(job.user_id), "template": job.template,
            "config": job.config, "priority": job.priority, "max_attempts": job.max_attempts,
            "created_at": job.created_at.isoformat()}


@dataclass
class Submitted:
    job: SimulationJob
    created: bool  # False: an earlier job with the same idempotency key


def _resolved_config(config: SimulationConfig | None, seed: int | None) -> dict[str, Any]:
    data = (config or SimulationConfig()).model_dump(mode="json")
    if data["seed"] is None:
        data["seed"] = seed if seed is not None else random.SystemRandom().randrange(2**31)
    return data


def _check_replay(job: SimulationJob, template: str, config: SimulationConfig | None,
                  priority: int) -> None:
    """A reused idempotency key must come with the same request."""
    same = (job.template == template and job.priority == priority
            and job.config == _resolved_config(config, job.config.get("seed")))
    if not same:
        raise Conflict("This idempotency key was already used for a different simulation request",
                       code="idempotency_key_reused", details={"job_id": str(job.id)})


async def _by_key(session: AsyncSession, user_id: uuid.UUID, key: str) -> SimulationJob | None:
    return await session.scalar(select(SimulationJob).where(
        SimulationJob.user_id == user_id, SimulationJob.idempotency_key == key))


async def submit_job(db: Database, queue: ReliableQueue, principal: Principal | None, *,
                     user_id: uuid.UUID, template: str = "default",
                     config: SimulationConfig | None = None, priority: int = 0,
                     idempotency_key: str | None = None, max_attempts: int = 3) -> Submitted:
    """Record the job, commit, then queue it. Unknown user → 404, unknown template → 422;
    a known idempotency key returns the first job (409 if the request differs)."""
    if principal is not None:
        principal.ensure_user(user_id)
    name = resolve_template(template).name
    async with db.transaction() as session:
        await get_user(session, user_id)
        existing = await _by_key(session, user_id, idempotency_key) if idempotency_key else None
        if existing is not None:
            _check_replay(existing, name, config, priority)
            return Submitted(existing, created=False)
        job = SimulationJob(user_id=user_id, template=name, config=_resolved_config(config, None),
                            priority=priority, idempotency_key=idempotency_key,
                            status="queued", attempts=0, max_attempts=max_attempts)
        try:
            async with session.begin_nested():
                session.add(job)
                await session.flush()
        except IntegrityError:  # a concurrent submission with the same key won
            existing = await _by_key(session, user_id, idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            _check_replay(existing, name, config, priority)
            return Submitted(existing, created=False)
    await _push(queue, job)
    return Submitted(job, created=True)


async def _push(queue: ReliableQueue, job: SimulationJob) -> None:
    try:
        await queue.enqueue(job_payload(job))
    except REDIS_ERRORS:
        # The row is committed as `queued`: the pool's reconciler pushes it once Redis is back.
        log.warning("simulation job %s recorded but not queued (Redis unavailable); "
                    "the reconciler will queue it", job.id)


async def get_job(session: AsyncSession, principal: Principal | None,
                  job_id: uuid.UUID) -> SimulationJob:
    job = await session.get(SimulationJob, job_id, populate_existing=True)
    if job is None:
        raise NotFound("Unknown simulation job", details={"job_id": str(job_id)})
    if principal is not None:
        principal.ensure_owner(job.user_id, "simulation job")
    return job


async def list_jobs(session: AsyncSession, *, user_id: uuid.UUID | None, status: str | None,
                    limit: int, offset: int) -> tuple[list[SimulationJob], int]:
    conditions = []
    if user_id is not None:
        conditions.append(SimulationJob.user_id == user_id)
    if validate_status(status) is not None:
        conditions.append(SimulationJob.status == status)
    total = await session.scalar(select(func.count()).select_from(SimulationJob).where(*conditions))
    rows = await session.scalars(select(SimulationJob).where(*conditions)
                                 .order_by(SimulationJob.created_at.desc(), SimulationJob.id)
                                 .limit(limit).offset(offset))
    return list(rows), total or 0


async def list_dead(session: AsyncSession, *, limit: int, offset: int) -> tuple[list[SimulationJob], int]:
    condition = SimulationJob.status == "dead"
    total = await session.scalar(select(func.count()).select_from(SimulationJob).where(condition))
    rows = await session.scalars(select(SimulationJob).where(condition)
                                 .order_by(SimulationJob.finished_at.desc(), SimulationJob.id)
                                 .limit(limit).offset(offset))
    return list(rows), total or 0


async def _transition(session: AsyncSession, job_id: uuid.UUID, from_statuses: tuple[str, ...],
                      **values: Any) -> bool:
    """Conditional update: also the row lock that serialises concurrent writers of a job."""
    result = await session.execute(
        update(SimulationJob).where(SimulationJob.id == job_id,
                                    SimulationJob.status.in_(from_statuses))
        .values(**values).execution_options(synchronize_session=False))
    return result.rowcount == 1


async def cancel_job(db: Database, queue: ReliableQueue, principal: Principal | None,
                     job_id: uuid.UUID) -> SimulationJob:
    """Queued, waiting-for-retry and running jobs can be cancelled (a running one's result is
    discarded); a finished job → 409."""
    async with db.transaction() as session:
        job = await get_job(session, principal, job_id)
        if not await _transition(session, job_id, LIVE_STATUSES, status="cancelled",
                                 finished_at=utcnow()):
            job = await get_job(session, None, job_id)
            raise Conflict(f"The simulation job is already {job.status}",
                           code="simulation_job_finished",
                           details={"job_id": str(job_id), "status": job.status})
        job = await get_job(session, None, job_id)
    try:
        await queue.remove(str(job_id))
    except REDIS_ERRORS:
        log.warning("cancelled job %s left in the queue; workers skip it", job_id)
    return job


async def retry_job(db: Database, queue: ReliableQueue, job_id: uuid.UUID) -> SimulationJob:
    """A dead job back to the queue with a fresh attempt budget (admin)."""
    async with db.transaction() as session:
        job = await get_job(session, None, job_id)
        if not await _transition(session, job_id, ("dead",), status="queued", attempts=0,
                                 started_at=None, finished_at=None):
            raise Conflict(f"Only dead jobs can be retried; this one is {job.status}",
                           code="simulation_job_not_dead",
                           details={"job_id": str(job_id), "status": job.status})
        job = await get_job(session, None, job_id)
    try:
        if not await queue.revive(str(job_id)):
            await queue.enqueue(job_payload(job))
    except REDIS_ERRORS:
        log.warning("retried job %s not queued yet (Redis unavailable)", job_id)
    return job


# -- transitions made by simulator workers --

async def begin_attempt(session: AsyncSession, job_id: uuid.UUID, attempt: int) -> SimulationJob | None:
    """Mark the job running for this attempt. Returns the row; its status tells the worker
    whether to run it (`running`) or not (finished, cancelled). None: the row is gone."""
    await _transition(session, job_id, LIVE_STATUSES, status="running", attempts=attempt,
                      started_at=utcnow())
    return await session.get(SimulationJob, job_id, populate_existing=True)


async def record_retry(session: AsyncSession, job_id: uuid.UUID, attempts: int, error: str) -> None:
    await _transition(session, job_id, LIVE_STATUSES, status="failed", attempts=attempts,
                      last_error=error)


async def record_dead(session: AsyncSession, job_id: uuid.UUID, attempts: int | None,
                      error: str) -> None:
    values: dict[str, Any] = {"status": "dead", "last_error": error, "finished_at": utcnow()}
    if attempts is not None:
        values["attempts"] = attempts
    await _transition(session, job_id, LIVE_STATUSES, **values)


@dataclass
class Reconciled:
    enqueued: int = 0
    marked_dead: int = 0


async def reconcile(db: Database, queue: ReliableQueue, *, grace_seconds: float = 30.0) -> Reconciled:
    """Make the queue and the table agree: a live row the queue does not hold (its push was
    lost, or Redis lost its data) is queued again; a row whose job was dead-lettered (by the
    reaper, say) is marked dead. Rows younger than `grace_seconds` are left to their
    submitter, whose push may still be on its way."""
    outcome = Reconciled()
    cutoff = utcnow() - timedelta(seconds=grace_seconds)
    async with db.transaction() as session:
        rows = list(await session.scalars(
            select(SimulationJob).where(SimulationJob.status.in_(LIVE_STATUSES),
                                        SimulationJob.created_at <= cutoff)
            .order_by(SimulationJob.created_at).limit(RECONCILE_BATCH)))
    owned = await queue.owned([str(r.id) for r in rows])
    for row in rows:
        state = owned.get(str(row.id))
        if state is None:
            if await queue.enqueue(job_payload(row)):
                outcome.enqueued += 1
        elif state == "dead":
            entry = await queue.dead_entry(str(row.id)) or {}
            async with db.transaction() as session:
                await record_dead(session, row.id, entry.get("attempts"),
                                  entry.get("error") or "dead-lettered")
            outcome.marked_dead += 1
    return outcome
