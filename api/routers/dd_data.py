"""Don't Die data cache of the profile app (SPEC §4.10): linking, sync, status, logs, UI data.

Sync and read routes open short transactions of their own instead of the `Session`
dependency, so no database connection is held while a sync waits on the upstream.
"""
from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, status
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse
from pydantic import Field, SecretStr

from api.dd_context import DDRuntimeDep, DDSyncDep
from api.deps import Ctx, CurrentPrincipal, Session
from api.envelope import Envelope, Page, ok
from api.schemas_common import Limit, Model, Name, Offset, Request
from core.errors import AppError, DependencyUnavailable
from services import dd_data, dd_link, dd_sync

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dd-data", tags=["dd-data"])


class LinkIn(Request):
    user_id: uuid.UUID
    dd_token: Annotated[SecretStr, Field(min_length=1, max_length=4096)]
    dd_client_id: Name


class LinkOut(Model):
    user_id: uuid.UUID
    dontdie_uid: str
    client_id: str
    linked: bool
    linked_at: datetime
    replaced_account: bool


class UnlinkOut(Model):
    user_id: uuid.UUID
    linked: bool
    dontdie_uid: str


class SyncResultOut(Model):
    sync_status: str = Field(description="success | partial | error")
    last_synced: datetime | None
    records_synced: int
    errors: dict[str, str] = Field(description="endpoint → message, for endpoints that failed")
    refreshed: bool = Field(description="false when throttled: synced recently, nothing fetched")
    throttled: bool = False
    coalesced: bool = Field(False, description="joined a sync that was already running")
    duration_ms: int | None = None


class SyncAcceptedOut(Model):
    user_id: uuid.UUID
    sync: str = Field(description="started | in_progress (joined) | fresh (synced recently)")
    status_url: str


class StatusOut(Model):
    sync_status: str
    last_synced: datetime | None
    sync_error: str | None
    linked: bool
    data_available: dict[str, bool]


class SyncLogOut(Model):
    id: uuid.UUID
    sync_type: str
    status: str
    endpoint: str | None
    records_synced: int
    duration_ms: int | None
    error_message: str | None
    created_at: datetime


class ChecklistItemDataOut(Model):
    type: str
    title: str
    data: Any
    last_synced: datetime | None
    stale: bool
    available: bool = True
    sync: str | None = Field(None, description="the refresh this request started or joined, if any")
    message: str | None = None


@router.post("/link", operation_id="linkDontDie", response_model=Envelope[LinkOut],
             summary="Link the user's own Don't Die account (verified upstream, stored encrypted)")
async def link_dontdie(body: LinkIn, ctx: Ctx, principal: CurrentPrincipal, runtime: DDRuntimeDep,
                       sync: DDSyncDep):
    principal.ensure_user(body.user_id)
    async with ctx.db.transaction() as session:
        linked = await dd_link.link_account(session, runtime, user_id=body.user_id,
                                            dd_token=body.dd_token.get_secret_value(),
                                            dd_client_id=body.dd_client_id)
    if linked["replaced_account"]:
        await dd_data.clear_cache(ctx.redis, body.user_id)
    await sync.forget(body.user_id)
    return Envelope(data=LinkOut(**linked))


@router.delete("/link", operation_id="unlinkDontDie", response_model=Envelope[UnlinkOut],
               summary="Unlink the Don't Die account and drop its synced data")
async def unlink_dontdie(user_id: uuid.UUID, ctx: Ctx, principal: CurrentPrincipal,
                         sync: DDSyncDep):
    principal.ensure_user(user_id)
    async with ctx.db.transaction() as session:
        unlinked = await dd_link.unlink_account(session, user_id)
    await dd_data.clear_cache(ctx.redis, user_id)
    await sync.forget(user_id)
    return Envelope(data=UnlinkOut(**unlinked))


@router.post("/sync/{user_id}", operation_id="syncDdData", response_model=Envelope[SyncResultOut],
             responses={202: {"model": Envelope[SyncAcceptedOut],
                              "description": "background=true: the sync runs on; poll the status"}},
             summary="Sync the user's Don't Die data (throttled to once per 5 minutes unless force)")
async def sync_dd_data(user_id: uuid.UUID, request: HttpRequest, ctx: Ctx,
                       principal: CurrentPrincipal, sync: DDSyncDep,
                       force: bool = False, background: bool = False):
    principal.ensure_user(user_id)
    async with ctx.db.transaction() as session:
        await dd_link.require_link(session, user_id)
    if background:
        started = await sync.start(user_id, force=force, trigger="background")
        status_url = request.url_for("get_dd_sync_status", user_id=str(user_id)).path
        accepted = SyncAcceptedOut(user_id=user_id, sync=started, status_url=status_url)
        return JSONResponse(ok(accepted.model_dump(mode="json")), status_code=status.HTTP_202_ACCEPTED)
    result = await sync.sync(user_id, force=force, trigger="manual")
    failure = dd_sync.failure_of(result)
    if failure is not None:
        raise failure
    return Envelope(data=SyncResultOut.model_validate(result))


@router.get("/status/{user_id}", operation_id="getDdSyncStatus", response_model=Envelope[StatusOut],
            summary="Sync status and which data is available")
async def get_dd_sync_status(user_id: uuid.UUID, session: Session, principal: CurrentPrincipal):
    principal.ensure_user(user_id)
    return Envelope(data=StatusOut(**await dd_sync.get_status(session, user_id)))


@router.get("/sync-logs/{user_id}", operation_id="getDdSyncLogs",
            response_model=Envelope[Page[SyncLogOut]], summary="Sync history, newest first")
async def get_dd_sync_logs(user_id: uuid.UUID, session: Session, principal: CurrentPrincipal,
                           limit: Limit = 10, offset: Offset = 0):
    principal.ensure_user(user_id)
    rows, total = await dd_sync.list_sync_logs(session, user_id, limit=limit, offset=offset)
    return Envelope(data=Page(items=[SyncLogOut.model_validate(r) for r in rows], total=total,
                              limit=limit, offset=offset))


@router.get("/checklist-item-data", operation_id="getChecklistItemData",
            response_model=Envelope[ChecklistItemDataOut],
            summary="UI-ready Don't Die data for one checklist bucket, from the cache")
async def get_checklist_item_data(
        bucket_code: Annotated[str, Query(max_length=64)], ctx: Ctx,
        principal: CurrentPrincipal, sync: DDSyncDep, user_id: uuid.UUID | None = None):
    dd_data.validate_item_bucket(bucket_code)
    target = principal.default_user(user_id)
    payload = await dd_data.read_item(ctx.redis, ctx.db, target, bucket_code)
    if payload is None:
        async with ctx.db.transaction() as session:
            await dd_link.require_link(session, target)
        try:
            started = await sync.start(target, trigger="auto")
        except DependencyUnavailable as exc:
            log.warning("Don't Die sync not started: %s", exc.message)
            started = "unavailable"
        return Envelope(data=ChecklistItemDataOut(**dd_data.fallback_payload(bucket_code, sync=started)))
    payload = dd_data.with_staleness(payload, ctx.settings.dd_freshness_seconds)
    if payload["stale"]:
        try:
            payload["sync"] = await sync.start(target, trigger="auto")
        except AppError as exc:  # the cached data is still worth serving
            log.warning("background Don't Die refresh not started: %s", exc.message)
    return Envelope(data=ChecklistItemDataOut(**payload))
