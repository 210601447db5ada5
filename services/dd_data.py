"""UI-ready Don't Die data for the onboarding checklist (SPEC §4.10), served from a cache.

A user's synced snapshots live in `dd_user_data` (one JSON document per endpoint, each with
its own `fetched_at`). After every refresh the per-bucket payloads are formatted once and
written to the Redis hash `sma:dd:{user_id}:items`, so a read costs one HMGET and no
upstream call; on a cache miss they are rebuilt from the database.
"""
from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime, timedelta
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import select

from core.errors import ValidationFailed
from core.metrics import metrics
from storage.db import Database
from storage.models import DDUserData
from storage.redis import REDIS_ERRORS
from storage.types import as_utc, utcnow

log = logging.getLogger(__name__)

# bucket → (title, dd_user_data column it is built from)
ITEM_BUCKETS: dict[str, tuple[str, str]] = {
    "health_device": ("Health Devices", "dd_scores"),
    "dd_score": ("Don't Die Score", "dd_scores"),
    "measurements": ("Physical Measurements", "measurements"),
    "capabilities": ("Physical & Cognitive Capabilities", "capabilities"),
    "biomarkers": ("Lab Results & Biomarkers", "biomarkers"),
    "protocols": ("Health Optimization Protocols", "protocols"),
}
SNAPSHOT_COLUMNS = ("measurements", "capabilities", "biomarkers", "protocols", "dd_scores")
CACHE_TTL_SECONDS = 7 * 24 * 3600
META_FIELD = "_meta"
CACHE_NAME = "dd_items"


def user_prefix(user_id: uuid.UUID) -> str:
    """Every Redis key this feature keeps for a user starts with this (deleteUser clears it)."""
    return f"sma:dd:{user_id}:"


def items_key(user_id: uuid.UUID) -> str:
    return f"{user_prefix(user_id)}items"


def validate_item_bucket(bucket_code: str) -> str:
    if bucket_code not in ITEM_BUCKETS:
        raise ValidationFailed(
            f"No Don't Die data for bucket_code {bucket_code!r}",
            details=[{"loc": ["query", "bucket_code"], "msg": f"must be one of {list(ITEM_BUCKETS)}"}])
    return bucket_code


# --- formatting --------------------------------------------------------------------------

def score_points(score: Any) -> float | None:
    if isinstance(score, (int, float)) and not isinstance(score, bool):
        return float(score)
    if isinstance(score, dict):
        value = score.get("points")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def score_series(doc: dict[str, Any] | None) -> list[dict[str, Any]]:
    days = (doc or {}).get("days") or {}
    return [{"date": day, "score": score_points(days[day])} for day in sorted(days)]


def trend(values: list[float]) -> str:
    """From the last two days with a score; equal values (or fewer than two) are stable."""
    if len(values) < 2 or values[-1] == values[-2]:
        return "stable"
    return "improving" if values[-1] > values[-2] else "declining"


def format_scores(doc: dict[str, Any]) -> dict[str, Any]:
    series = score_series(doc)
    values = [s["score"] for s in series if s["score"] is not None]
    return {"scores": series,
            "current_score": values[-1] if values else None,
            "previous_score": values[-2] if len(values) > 1 else None,
            "trend": trend(values),
            "average": round(sum(values) / len(values), 1) if values else None,
            "days_with_data": len(values)}


def format_health_device(doc: dict[str, Any]) -> dict[str, Any]:
    series = score_series(doc)
    with_data = [s["date"] for s in series if s["score"] is not None]
    return {"connected": bool(with_data), "source": "Don't Die",
            "days_with_data": len(with_data), "days_checked": len(series),
            "last_data_date": with_data[-1] if with_data else None}


def format_readings(doc: dict[str, Any], *, key: str, noun: str) -> dict[str, Any]:
    """Latest reading per biomarker, by name (the original service's `{key: [...]}` shape)."""
    readings = [r for r in doc.get("items") or [] if isinstance(r, dict)]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for reading in readings:
        by_name.setdefault(str(reading.get("biomarkerName") or "Unknown"), []).append(reading)
    items = []
    for name in sorted(by_name, key=str.lower):
        history = sorted(by_name[name], key=lambda r: str(r.get("dateMeasured") or ""), reverse=True)
        latest = history[0]
        item = {"type": name, "value": latest.get("value"), "unit": latest.get("measurementUnit"),
                "date": latest.get("dateMeasured"), "self_reported": latest.get("isSelfReported"),
                "readings": len(history)}
        if len(history) > 1:
            item["previous_value"] = history[1].get("value")
        items.append(item)
    dates = [str(r["dateMeasured"]) for r in readings if r.get("dateMeasured")]
    count = len(items)
    return {key: items, "summary": f"{count} recent {noun}{'' if count == 1 else 's'}",
            "total_readings": len(readings), "last_updated": max(dates) if dates else None}


def format_protocols(doc: dict[str, Any]) -> dict[str, Any]:
    protocols = [p for p in doc.get("items") or [] if isinstance(p, dict)]

    def summary(p: dict[str, Any]) -> dict[str, Any]:
        return {"id": p.get("id"), "name": p.get("name"), "status": p.get("status"),
                "category": p.get("category"), "type": p.get("type"),
                "description": p.get("description")}

    groups: dict[str, list[dict[str, Any]]] = {"active": [], "completed": [], "other": []}
    for p in protocols:
        status = str(p.get("status") or "").lower()
        groups[status if status in ("active", "completed") else "other"].append(summary(p))
    return {**groups, "total": len(protocols), "active_count": len(groups["active"]),
            "completed_count": len(groups["completed"])}


_FORMATTERS = {
    "health_device": format_health_device,
    "dd_score": format_scores,
    "measurements": lambda doc: format_readings(doc, key="measurements", noun="measurement"),
    "capabilities": lambda doc: format_readings(doc, key="capabilities", noun="capability"),
    "biomarkers": lambda doc: format_readings(doc, key="biomarkers", noun="biomarker"),
    "protocols": format_protocols,
}


def format_items(snapshots: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Payloads `{type, title, data, last_synced}` for every bucket that has a snapshot."""
    out = {}
    for bucket, (title, column) in ITEM_BUCKETS.items():
        doc = snapshots.get(column)
        if not isinstance(doc, dict) or not doc.get("fetched_at"):
            continue
        out[bucket] = {"type": bucket, "title": title, "data": _FORMATTERS[bucket](doc),
                       "last_synced": doc["fetched_at"]}
    return out


def snapshots_of(row: DDUserData) -> dict[str, Any]:
    return {column: getattr(row, column) for column in SNAPSHOT_COLUMNS}


def with_staleness(payload: dict[str, Any], freshness_seconds: int,
                   now: datetime | None = None) -> dict[str, Any]:
    synced = as_utc(datetime.fromisoformat(payload["last_synced"]))
    stale = (now or utcnow()) - synced > timedelta(seconds=freshness_seconds)
    return {**payload, "stale": stale}


AVAILABLE_WHEN_SYNCED = {
    "health_device": ["daily Don't Die scores from a connected device"],
    "dd_score": ["daily scores", "current score", "trend"],
    "measurements": ["weight", "height", "body composition", "heart rate", "blood pressure"],
    "capabilities": ["strength", "fitness", "balance", "cognitive tests"],
    "biomarkers": ["lab results", "lipids", "glucose", "inflammation markers"],
    "protocols": ["active and completed health protocols"],
}


def fallback_payload(bucket: str, *, sync: str) -> dict[str, Any]:
    """What the UI shows while nothing is cached for the bucket; `sync` says what was done."""
    title = ITEM_BUCKETS[bucket][0]
    if sync == "fresh":
        message = (f"No {title} data is cached yet: the last Don't Die sync did not return it. "
                   "It will appear after a sync that does.")
    elif sync == "unavailable":
        message = ("No Don't Die data is cached for this user yet, and a sync cannot be started "
                   "right now. Try again shortly.")
    else:
        message = ("No Don't Die data is cached for this user yet: a sync has been started. "
                   "Check GET /dd-data/status/{user_id} or ask again in a few seconds.")
    return {"type": bucket, "title": title, "last_synced": None, "stale": False,
            "available": False, "sync": sync, "message": message,
            "data": {"message": message, "available_when_synced": AVAILABLE_WHEN_SYNCED[bucket]}}


# --- cache -------------------------------------------------------------------------------

async def write_cache(redis: Redis | None, user_id: uuid.UUID, row: DDUserData) -> None:
    if redis is None:
        return
    payloads = format_items(snapshots_of(row))
    meta = {"sync_status": row.sync_status,
            "last_synced": row.last_synced.isoformat() if row.last_synced else None}
    key = items_key(user_id)
    try:
        pipe = redis.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping={META_FIELD: json.dumps(meta),
                                **{b: json.dumps(p, default=str) for b, p in payloads.items()}})
        pipe.expire(key, CACHE_TTL_SECONDS)
        await pipe.execute()
    except REDIS_ERRORS as exc:
        log.warning("could not cache Don't Die data: %s", type(exc).__name__)


async def clear_cache(redis: Redis | None, user_id: uuid.UUID) -> None:
    if redis is None:
        return
    try:
        keys = [k async for k in redis.scan_iter(match=f"{user_prefix(user_id)}*", count=100)]
        if keys:
            await redis.delete(*keys)
    except REDIS_ERRORS as exc:
        log.warning("could not clear cached Don't Die data: %s", type(exc).__name__)


async def read_item(redis: Redis | None, db: Database, user_id: uuid.UUID,
                    bucket: str) -> dict[str, Any] | None:
    """The cached payload for one bucket, or None when nothing is synced for it yet."""
    if redis is not None:
        try:
            raw, meta = await redis.hmget(items_key(user_id), [bucket, META_FIELD])
            metrics().cache(CACHE_NAME, meta is not None)
            if meta is not None:
                return json.loads(raw) if raw is not None else None
        except REDIS_ERRORS as exc:
            log.warning("Don't Die cache unavailable, reading the database: %s", type(exc).__name__)
            redis = None
    async with db.transaction() as session:
        row = await session.scalar(select(DDUserData).where(DDUserData.user_id == user_id))
    if row is None:
        return None
    await write_cache(redis, user_id, row)
    return format_items(snapshots_of(row)).get(bucket)
