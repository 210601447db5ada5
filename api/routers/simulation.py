"""Simulation jobs (SPEC §4.8): enqueue a simulated conversation, follow it, cancel it; dead
jobs for admins."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Response, status
from pydantic import Field

from api.context import AppContext
from api.deps import AdminPrincipal, CurrentPrincipal, Ctx, Session
from api.envelope import Envelope, Page
from api.schemas_common import Limit, Model, Name, Offset, Request
from core.principal import Principal
from services import simulation_jobs
from services.simulation_templates import SimulationConfig
from storage.queue import ReliableQueue

router = APIRouter(tags=["simulations"])

JobStatus = Literal["queued", "running", "succeeded", "failed", "dead", "cancelled"]


class SimulateConversationIn(Request):
    user_id: uuid.UUID
    template: str = Field("default", max_length=64,
                          description="health_assessment, protocol_discussion, "
                                      "belief_exploration, or default (= health_assessment)")
    config: SimulationConfig | None = None
    priority: int = Field(0, ge=0, le=9)
    idempotency_key: Name | None = Field(
        None, description="Repeating a key returns the first job instead of enqueuing again")


class JobRef(Request):
    job_id: uuid.UUID


class JobAcceptedOut(Model):
    job_id: uuid.UUID
    status: JobStatus


class SimulationJobOut(Model):
    id: uuid.UUID
    user_id: uuid.UUID
    template: str
    config: dict[str, Any]
    priority: int
    idempotency_key: str | None
    status: JobStatus = Field(description="failed: the last attempt failed and a retry is "
                                          "scheduled; dead: no attempts left (see last_error)")
    attempts: int
    max_attempts: int
    last_error: str | None
    conversation_id: uuid.UUID | None
    metrics: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


def _queue(ctx: AppContext) -> ReliableQueue:
    queue = ctx.extras.get("simulation_queue")
    if queue is None:
        queue = ctx.extras["simulation_queue"] = ReliableQueue.from_settings(ctx.redis, ctx.settings)
    return queue


@router.post("/simulateConversation", operation_id="simulateConversation",
             status_code=status.HTTP_202_ACCEPTED, response_model=Envelope[JobAcceptedOut],
             summary="Queue a simulated conversation (own, service); returns the job id")
async def simulate_conversation(body: SimulateConversationIn, response: Response, ctx: Ctx,
                                principal: CurrentPrincipal):
    submitted = await simulation_jobs.submit_job(
        ctx.db, _queue(ctx), principal, user_id=body.user_id, template=body.template,
        config=body.config, priority=body.priority, idempotency_key=body.idempotency_key,
        max_attempts=ctx.settings.sim_max_attempts)
    if not submitted.created:
        response.headers["Idempotent-Replayed"] = "true"
    return Envelope(data=JobAcceptedOut(job_id=submitted.job.id, status=submitted.job.status))


@router.get("/getSimulationJob", operation_id="getSimulationJob",
            response_model=Envelope[SimulationJobOut], summary="A simulation job and its outcome")
async def get_simulation_job(job_id: uuid.UUID, session: Session, principal: CurrentPrincipal):
    job = await simulation_jobs.get_job(session, principal, job_id)
    return Envelope(data=SimulationJobOut.model_validate(job))


def _list_user(principal: Principal, user_id: uuid.UUID | None) -> uuid.UUID | None:
    """A user token lists its own jobs; service and admin tokens may list everyone's."""
    if user_id is not None:
        principal.ensure_user(user_id)
        return user_id
    return None if principal.is_privileged else principal.user_id


@router.get("/listSimulationJobs", operation_id="listSimulationJobs",
            response_model=Envelope[Page[SimulationJobOut]],
            summary="Simulation jobs, newest first (a user's own; service/admin: any user)")
async def list_simulation_jobs(session: Session, principal: CurrentPrincipal,
                               user_id: uuid.UUID | None = None, status: JobStatus | None = None,
                               limit: Limit = 50, offset: Offset = 0):
    rows, total = await simulation_jobs.list_jobs(
        session, user_id=_list_user(principal, user_id), status=status, limit=limit, offset=offset)
    return Envelope(data=Page(items=[SimulationJobOut.model_validate(r) for r in rows],
                              total=total, limit=limit, offset=offset))


@router.post("/cancelSimulationJob", operation_id="cancelSimulationJob",
             response_model=Envelope[SimulationJobOut],
             summary="Cancel a queued, retrying or running job; a finished one → 409")
async def cancel_simulation_job(body: JobRef, ctx: Ctx, principal: CurrentPrincipal):
    job = await simulation_jobs.cancel_job(ctx.db, _queue(ctx), principal, body.job_id)
    return Envelope(data=SimulationJobOut.model_validate(job))


@router.get("/listDeadSimulationJobs", operation_id="listDeadSimulationJobs",
            response_model=Envelope[Page[SimulationJobOut]],
            summary="Dead simulation jobs with their last error, newest first (admin)")
async def list_dead_simulation_jobs(session: Session, _: AdminPrincipal, limit: Limit = 50,
                                    offset: Offset = 0):
    rows, total = await simulation_jobs.list_dead(session, limit=limit, offset=offset)
    return Envelope(data=Page(items=[SimulationJobOut.model_validate(r) for r in rows],
                              total=total, limit=limit, offset=offset))


@router.post("/retrySimulationJob", operation_id="retrySimulationJob",
             status_code=status.HTTP_202_ACCEPTED, response_model=Envelope[SimulationJobOut],
             summary="Queue a dead job again with a fresh attempt budget (admin)")
async def retry_simulation_job(body: JobRef, ctx: Ctx, _: AdminPrincipal):
    job = await simulation_jobs.retry_job(ctx.db, _queue(ctx), body.job_id)
    return Envelope(data=SimulationJobOut.model_validate(job))
