"""The seven-bucket onboarding checklist (SPEC §4.4)."""
from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import ValidationFailed
from services.users import get_user
from storage.models import ChecklistItem
from storage.types import utcnow
from storage.upsert import insert_ignore, upsert

BUCKETS: dict[str, str] = {
    "health_device": "Health Device",
    "dd_score": "Don't Die Score",
    "measurements": "Measurements",
    "capabilities": "Capabilities",
    "biomarkers": "Biomarkers",
    "demographics": "Demographics",
    "protocols": "Protocols",
}
STATUSES = ("pending", "in_progress", "completed", "skipped")


def validate_bucket(bucket_code: str) -> str:
    if bucket_code not in BUCKETS:
        raise ValidationFailed(f"Unknown bucket_code {bucket_code!r}",
                               details=[{"loc": ["bucket_code"], "msg": f"must be one of {list(BUCKETS)}"}])
    return bucket_code


def validate_status(status: str) -> str:
    if status not in STATUSES:
        raise ValidationFailed(f"Unknown status {status!r}",
                               details=[{"loc": ["status"], "msg": f"must be one of {list(STATUSES)}"}])
    return status


async def ensure_items(session: AsyncSession, user_id: uuid.UUID) -> None:
    """Create any missing items as pending; safe under concurrency (unique key, do nothing)."""
    now = utcnow()
    rows = [dict(id=uuid.uuid4(), user_id=user_id, bucket_code=code, status="pending",
                 updated_at=now) for code in BUCKETS]
    await insert_ignore(session, ChecklistItem, rows, ["user_id", "bucket_code"])


async def mark_item(session: AsyncSession, user_id: uuid.UUID, bucket_code: str, status: str,
                    *, source: str | None = None, data_ref: dict[str, Any] | None = None) -> ChecklistItem:
    """Upsert by (user_id, bucket_code): concurrent calls never create duplicates.
    Unknown bucket or status → 422; unknown user → 404."""
    validate_bucket(bucket_code)
    validate_status(status)
    await get_user(session, user_id)
    values = dict(id=uuid.uuid4(), user_id=user_id, bucket_code=bucket_code, status=status,
                  source=source, data_ref=data_ref, updated_at=utcnow())
    await upsert(session, ChecklistItem, values, ["user_id", "bucket_code"],
                 ["status", "source", "data_ref", "updated_at"])
    return await session.scalar(
        select(ChecklistItem).where(ChecklistItem.user_id == user_id,
                                    ChecklistItem.bucket_code == bucket_code)
        .execution_options(populate_existing=True))


async def items_in_order(session: AsyncSession, user_id: uuid.UUID) -> list[ChecklistItem]:
    rows = {item.bucket_code: item for item in await session.scalars(
        select(ChecklistItem).where(ChecklistItem.user_id == user_id)
        .execution_options(populate_existing=True))}
    return [rows[code] for code in BUCKETS if code in rows]


def progress(items: list[ChecklistItem]) -> dict[str, Any]:
    completed = [i.bucket_code for i in items if i.status == "completed"]
    total = len(BUCKETS)
    return {"completed": len(completed), "total": total,
            "percent": round(100 * len(completed) / total),
            "completed_buckets": completed,
            "missing_buckets": [code for code in BUCKETS if code not in completed]}


async def checklist_progress(session: AsyncSession, user_id: uuid.UUID) -> dict[str, Any]:
    """The progress document of getChecklistProgress; creates missing items as pending."""
    await get_user(session, user_id)
    await ensure_items(session, user_id)
    items = await items_in_order(session, user_id)
    summary = progress(items)
    return {"items": [{"bucket_code": i.bucket_code, "label": BUCKETS[i.bucket_code],
                       "status": i.status, "source": i.source, "data_ref": i.data_ref,
                       "updated_at": i.updated_at} for i in items],
            "completed": summary["completed"], "total": summary["total"],
            "percent": summary["percent"]}


async def profile_progress(session: AsyncSession, user_id: uuid.UUID) -> dict[str, Any]:
    """getProgress: completeness from the checklist, without writing anything. Buckets with
    no item yet count as missing; `skipped` is not completed."""
    await get_user(session, user_id)
    summary = progress(await items_in_order(session, user_id))
    return {"percent": summary["percent"], "completed": summary["completed_buckets"],
            "missing": summary["missing_buckets"]}


async def gaps(session: AsyncSession, user_id: uuid.UUID) -> dict[str, str]:
    """Buckets not completed, in bucket order, with their status (`pending` when no item)."""
    status = {i.bucket_code: i.status for i in await items_in_order(session, user_id)}
    return {code: status.get(code, "pending") for code in BUCKETS
            if status.get(code) != "completed"}
