"""Refreshing a user's Don't Die data (SPEC §4.10), and the per-user coordination around it.

`refresh` is one refresh: the five upstream fetches run concurrently with the user's own
linked credentials; an endpoint that fails keeps its previous snapshot and is reported in
`errors`; a `dd_sync_log` row goes from `started` to success/partial/error; the checklist is
updated. No transaction is held while upstream calls are in flight.

`SyncCoordinator` is the per-user owner: it serialises a user's refreshes, folds concurrent
requests into the refresh in flight, applies the throttle (a user synced within
`dd_sync_throttle_seconds` is not re-fetched unless forced; a never-synced user always is) and
caches each user's sync state in a bounded LRU, reloading it from the database on a miss.
It has no Ray in it: `actors.dd_sync` hosts coordinators in a few Ray actor processes and
runs one in-process when there is no Ray.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Awaitable, Callable

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import (AppError, Conflict, DependencyUnavailable, NotFound, UpstreamError,
                         UpstreamTimeout)
from core.metrics import metrics
from services import checklist, dd_data, dd_link
from services.dd_runtime import DDRuntime
from services.users import get_user
from storage.models import DDCredential, DDSyncLog, DDUserData
from storage.types import utcnow
from storage.upsert import insert_ignore

log = logging.getLogger(__name__)

ENDPOINTS = ("measurements", "capabilities", "biomarkers", "protocols", "dd_scores")
CATEGORY_OF = {"measurements": "Measurements", "capabilities": "Capabilities",
               "biomarkers": "Biomarkers"}
SCORE_DAYS = 7
CHECKLIST_SOURCE = "Don't Die API"
CHECKLIST_FROM = {"dd_score": "dd_scores", "measurements": "measurements",
                  "capabilities": "capabilities", "biomarkers": "biomarkers",
                  "protocols": "protocols"}
DEFAULT_STATE_CACHE_SIZE = 10_000
_ERRORS_TEXT = re.compile(rf"({'|'.join(ENDPOINTS)}): (.*?)(?=; (?:{'|'.join(ENDPOINTS)}): |$)")


def score_days(today: date | None = None) -> list[date]:
    """The 7 days ending today (UTC), oldest first."""
    today = today or datetime.now(timezone.utc).date()
    return [today - timedelta(days=i) for i in range(SCORE_DAYS - 1, -1, -1)]


def errors_text(errors: dict[str, str]) -> str | None:
    return "; ".join(f"{k}: {v}" for k, v in errors.items()) or None


def parse_errors_text(text: str | None) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in _ERRORS_TEXT.finditer(text or "")}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# --- one refresh --------------------------------------------------------------------------

async def _fetch(client, account: dd_link.LinkedAccount, endpoint: str, days: list[date]) -> Any:
    if endpoint in CATEGORY_OF:
        readings = await client.get_category_readings(CATEGORY_OF[endpoint])
        if not isinstance(readings, list):
            raise AppError("Don't Die returned malformed readings")
        return readings
    if endpoint == "protocols":
        protocols = await client.list_protocols(account.dontdie_uid)
        if not isinstance(protocols, list):
            raise AppError("Don't Die returned malformed protocols")
        return protocols
    return await client.get_scores(account.dontdie_uid, days)


async def _fetch_all(runtime: DDRuntime, account: dd_link.LinkedAccount,
                     days: list[date]) -> tuple[dict[str, Any], dict[str, str], dict[str, int]]:
    """Snapshots fetched, and for failed endpoints their message and HTTP status."""
    client = runtime.client(account.token, account.client_id)
    results = await asyncio.gather(*(_fetch(client, account, ep, days) for ep in ENDPOINTS),
                                   return_exceptions=True)
    fetched, errors, statuses = {}, {}, {}
    for endpoint, result in zip(ENDPOINTS, results):
        if isinstance(result, AppError):
            errors[endpoint], statuses[endpoint] = result.message, result.status_code
        elif isinstance(result, BaseException):
            if isinstance(result, asyncio.CancelledError):
                raise result
            log.error("Don't Die %s fetch failed unexpectedly", endpoint, exc_info=result)
            errors[endpoint], statuses[endpoint] = "internal error while fetching", 500
        else:
            fetched[endpoint] = result
    return fetched, errors, statuses


def _merge_scores(previous: dict[str, Any] | None, per_day: dict[str, Any], fetched_at: str,
                  days: list[date]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """New score snapshot for the window (failed days keep their previous value) and the
    failure (`{"error", "status_code"}`) if any day failed; no snapshot if every day failed."""
    old_days = (previous or {}).get("days") or {}
    new_days, failures = {}, []
    for day in (d.isoformat() for d in days):
        result = per_day.get(day)
        if isinstance(result, dict) and "error" in result and "score" not in result:
            failures.append(result)
            if day in old_days:
                new_days[day] = old_days[day]
        else:
            new_days[day] = result.get("score") if isinstance(result, dict) else None
    if not failures:
        return {"days": new_days, "fetched_at": fetched_at}, None
    first = failures[0]
    if len(failures) == len(days):
        return None, first
    return ({"days": new_days, "fetched_at": fetched_at},
            {"error": f"{len(failures)} of {len(days)} days failed: {first.get('error')}",
             "status_code": first.get("status_code")})


def _record_count(endpoint: str, snapshot: dict[str, Any]) -> int:
    if endpoint == "dd_scores":
        return sum(1 for v in snapshot["days"].values() if dd_data.score_points(v) is not None)
    return len(snapshot["items"])


def _has_data(column: str, doc: Any) -> bool:
    if not isinstance(doc, dict):
        return False
    if column == "dd_scores":
        return any(dd_data.score_points(v) is not None for v in (doc.get("days") or {}).values())
    return bool(doc.get("items"))


async def _ensure_row(session: AsyncSession, user_id: uuid.UUID, dontdie_uid: str) -> DDUserData:
    await insert_ignore(session, DDUserData, {"id": uuid.uuid4(), "user_id": user_id,
                                              "dontdie_uid": dontdie_uid, "sync_status": "not_synced"},
                        ["user_id"])
    return await session.scalar(select(DDUserData).where(DDUserData.user_id == user_id)
                                .execution_options(populate_existing=True))


async def _update_checklist(session: AsyncSession, user_id: uuid.UUID, row: DDUserData) -> None:
    """Buckets with Don't Die data become completed; buckets without data are left as they are
    (a user's own answer is never downgraded). Unchanged items are not rewritten."""
    wanted = {bucket: {"dd_user_data": column, "records": _record_count(column, getattr(row, column))}
              for bucket, column in CHECKLIST_FROM.items() if _has_data(column, getattr(row, column))}
    if "dd_score" in wanted:
        wanted["health_device"] = {"dd_user_data": "dd_scores", "device_data": "daily scores"}
    if not wanted:
        return
    await checklist.ensure_items(session, user_id)
    current = {item.bucket_code: item for item in await checklist.items_in_order(session, user_id)}
    for bucket, data_ref in wanted.items():
        item = current.get(bucket)
        if item is not None and (item.status, item.source, item.data_ref) == (
                "completed", CHECKLIST_SOURCE, data_ref):
            continue
        await checklist.mark_item(session, user_id, bucket, "completed", source=CHECKLIST_SOURCE,
                                  data_ref=data_ref)


async def refresh(runtime: DDRuntime, user_id: uuid.UUID, *, trigger: str = "manual",
                  today: date | None = None) -> dict[str, Any]:
    """One refresh. Raises NotFound (unknown user) or Conflict (no linked account)."""
    started = time.perf_counter()
    async with runtime.db.transaction() as session:
        await get_user(session, user_id)
        account = await dd_link.load_linked_account(session, runtime.settings, user_id)
        row = await _ensure_row(session, user_id, account.dontdie_uid)
        row.sync_status = "syncing"
        entry = DDSyncLog(user_id=user_id, sync_type="full", status="started",
                          endpoint=",".join(ENDPOINTS), records_synced=0)
        session.add(entry)
        await session.flush()
        log_id = entry.id

    days = score_days(today)
    fetched, errors, statuses = await _fetch_all(runtime, account, days)
    now = utcnow()
    duration_ms = int((time.perf_counter() - started) * 1000)

    async with runtime.db.transaction() as session:
        entry = await session.get(DDSyncLog, log_id)
        credential = await session.scalar(select(DDCredential).where(DDCredential.user_id == user_id))
        row = await session.scalar(select(DDUserData).where(DDUserData.user_id == user_id))
        unlinked = (credential is None or row is None
                    or credential.dontdie_uid != account.dontdie_uid)
        if unlinked:
            # Unlinked, relinked or deleted while the fetches ran: keep nothing that was fetched.
            if entry is not None:
                entry.status, entry.duration_ms = "error", duration_ms
                entry.error_message = "the Don't Die account was unlinked during the sync"
        else:
            records, refreshed = 0, []
            for endpoint in ENDPOINTS:
                if endpoint not in fetched:
                    continue
                if endpoint == "dd_scores":
                    snapshot, failure = _merge_scores(row.dd_scores, fetched[endpoint],
                                                      now.isoformat(), days)
                    if failure:
                        errors[endpoint] = str(failure["error"])
                        statuses[endpoint] = int(failure.get("status_code") or 502)
                    if snapshot is None:
                        continue
                else:
                    snapshot = {"items": fetched[endpoint], "fetched_at": now.isoformat()}
                setattr(row, endpoint, snapshot)
                refreshed.append(endpoint)
                records += _record_count(endpoint, snapshot)
            status = "success" if not errors else ("partial" if refreshed else "error")
            row.sync_status = status
            row.sync_error = errors_text(errors)
            row.dontdie_uid = account.dontdie_uid
            if status != "error":
                row.last_synced = now
            if entry is not None:
                entry.status, entry.records_synced = status, records
                entry.duration_ms, entry.error_message = duration_ms, errors_text(errors)
            await _update_checklist(session, user_id, row)
            await session.flush()
    if unlinked:
        metrics().dd_syncs.inc(1, tags={"outcome": "unlinked"})
        raise Conflict("The Don't Die account was unlinked during the sync",
                       code="dontdie_not_linked")
    metrics().dd_syncs.inc(1, tags={"outcome": status})
    metrics().dd_sync_duration.observe(duration_ms / 1000, tags={"outcome": status})
    await dd_data.write_cache(runtime.redis, user_id, row)
    log.info("Don't Die %s sync for %s: %s, %d records in %d ms", trigger, user_id, status,
             records, duration_ms)
    return {"sync_status": status, "last_synced": row.last_synced, "records_synced": records,
            "errors": errors, "error_status": statuses, "refreshed": True,
            "duration_ms": duration_ms}


# --- reads ---------------------------------------------------------------------------------

async def get_status(session: AsyncSession, user_id: uuid.UUID) -> dict[str, Any]:
    await get_user(session, user_id)
    row = await session.scalar(select(DDUserData).where(DDUserData.user_id == user_id))
    linked = await dd_link.is_linked(session, user_id)
    if row is None:
        return {"sync_status": "not_synced", "last_synced": None, "sync_error": None,
                "linked": linked, "data_available": {c: False for c in dd_data.SNAPSHOT_COLUMNS}}
    return {"sync_status": row.sync_status, "last_synced": row.last_synced,
            "sync_error": row.sync_error, "linked": linked,
            "data_available": {c: _has_data(c, getattr(row, c)) for c in dd_data.SNAPSHOT_COLUMNS}}


async def list_sync_logs(session: AsyncSession, user_id: uuid.UUID, *, limit: int = 10,
                         offset: int = 0) -> tuple[list[DDSyncLog], int]:
    await get_user(session, user_id)
    total = await session.scalar(select(func.count()).select_from(DDSyncLog)
                                 .where(DDSyncLog.user_id == user_id))
    rows = await session.scalars(select(DDSyncLog).where(DDSyncLog.user_id == user_id)
                                 .order_by(DDSyncLog.created_at.desc(), DDSyncLog.id)
                                 .limit(limit).offset(offset))
    return list(rows), total or 0


# --- coordination ----------------------------------------------------------------------------

@dataclass
class SyncState:
    """What the owner remembers about a user between refreshes."""
    last_synced: datetime | None = None
    sync_status: str = "not_synced"
    records_synced: int = 0
    errors: dict[str, str] = field(default_factory=dict)

    def is_fresh(self, throttle_seconds: int, now: datetime) -> bool:
        """Synced within the throttle window by a refresh that finished and did not fail
        outright (`syncing` with nothing in flight means a refresh died half-way)."""
        return (self.last_synced is not None and self.sync_status in ("success", "partial")
                and now - self.last_synced < timedelta(seconds=throttle_seconds))

    def as_result(self) -> dict[str, Any]:
        return {"sync_status": self.sync_status, "last_synced": self.last_synced,
                "records_synced": self.records_synced, "errors": dict(self.errors),
                "error_status": {}, "refreshed": False, "throttled": True}


async def load_state(runtime: DDRuntime, user_id: uuid.UUID) -> SyncState:
    async with runtime.db.transaction() as session:
        row = await session.scalar(select(DDUserData).where(DDUserData.user_id == user_id))
        if row is None:
            return SyncState()
        records = await session.scalar(
            select(DDSyncLog.records_synced).where(DDSyncLog.user_id == user_id,
                                                   DDSyncLog.status.in_(("success", "partial")))
            .order_by(DDSyncLog.created_at.desc()).limit(1))
    return SyncState(last_synced=row.last_synced, sync_status=row.sync_status,
                     records_synced=records or 0, errors=parse_errors_text(row.sync_error))


Refresh = Callable[..., Awaitable[dict[str, Any]]]
LoadState = Callable[[DDRuntime, uuid.UUID], Awaitable[SyncState]]


class SyncCoordinator:
    def __init__(self, runtime: DDRuntime, *, throttle_seconds: int | None = None,
                 max_users: int = DEFAULT_STATE_CACHE_SIZE, refresh_fn: Refresh = refresh,
                 load_fn: LoadState = load_state):
        self.runtime = runtime
        self.throttle_seconds = (runtime.settings.dd_sync_throttle_seconds
                                 if throttle_seconds is None else throttle_seconds)
        self.max_users = max_users
        self._refresh = refresh_fn
        self._load = load_fn
        self._states: OrderedDict[uuid.UUID, SyncState] = OrderedDict()
        self._inflight: dict[uuid.UUID, asyncio.Task] = {}
        self.refreshes = 0

    async def sync(self, user_id: uuid.UUID, *, force: bool = False,
                   trigger: str = "manual") -> dict[str, Any]:
        """The result of the refresh this request ran or joined, or the cached state if fresh."""
        outcome, value = await self._begin(user_id, force, trigger)
        if outcome == "fresh":
            return value.as_result()
        result = dict(await asyncio.shield(value))
        result["coalesced"] = outcome == "in_progress"
        return result

    async def start(self, user_id: uuid.UUID, *, force: bool = False,
                    trigger: str = "background") -> str:
        """Start a refresh without waiting: `started`, `in_progress` (joined) or `fresh`."""
        outcome, _ = await self._begin(user_id, force, trigger)
        return outcome

    def forget(self, user_id: uuid.UUID) -> None:
        """Drop cached state (after link/unlink); the next request reloads it from the database."""
        self._states.pop(user_id, None)

    def stats(self) -> dict[str, int]:
        return {"users_cached": len(self._states), "inflight": len(self._inflight),
                "refreshes": self.refreshes}

    async def drain(self) -> None:
        while self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        await self.drain()

    async def _begin(self, user_id: uuid.UUID, force: bool, trigger: str):
        while True:
            task = self._inflight.get(user_id)
            if task is not None:
                return "in_progress", task
            state = self._states.get(user_id)
            if state is None:
                self._remember(user_id, await self._load(self.runtime, user_id))
                continue  # something may have started while the state was loading
            self._states.move_to_end(user_id)
            if not force and state.is_fresh(self.throttle_seconds, utcnow()):
                return "fresh", state
            task = asyncio.get_running_loop().create_task(self._run(user_id, trigger))
            self._inflight[user_id] = task
            task.add_done_callback(_log_failure)
            return "started", task

    async def _run(self, user_id: uuid.UUID, trigger: str) -> dict[str, Any]:
        self.refreshes += 1
        try:
            result = await self._refresh(self.runtime, user_id, trigger=trigger)
        except (NotFound, Conflict):
            self.forget(user_id)
            raise
        finally:
            self._inflight.pop(user_id, None)
        previous = self._states.get(user_id) or SyncState()
        self._remember(user_id, SyncState(
            last_synced=result["last_synced"] or previous.last_synced,
            sync_status=result["sync_status"], records_synced=result["records_synced"],
            errors=dict(result["errors"])))
        return result

    def _remember(self, user_id: uuid.UUID, state: SyncState) -> None:
        self._states[user_id] = state
        self._states.move_to_end(user_id)
        while len(self._states) > self.max_users:
            self._states.popitem(last=False)


def _log_failure(task: asyncio.Task) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, AppError):
        log.error("Don't Die sync failed", exc_info=exc)


def failure_of(result: dict[str, Any]) -> AppError | None:
    """For a sync in which every endpoint failed: the error to answer with (502/503/504)."""
    if result["sync_status"] != "error":
        return None
    statuses = set((result.get("error_status") or {}).values())
    details = {"sync_status": "error", "last_synced": _iso(result.get("last_synced")),
               "records_synced": 0, "errors": result.get("errors") or {}}
    if statuses & {401, 403}:
        return UpstreamError("Don't Die rejected the linked credentials: link the account again",
                             code="dontdie_credentials_rejected", details=details)
    if statuses == {504}:
        return UpstreamTimeout("Don't Die did not answer in time; nothing was synced", details=details)
    if statuses == {503}:
        return DependencyUnavailable("Don't Die API is unreachable; nothing was synced",
                                     details=details)
    return UpstreamError("Don't Die sync failed for every endpoint", details=details)
