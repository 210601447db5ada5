"""The dontdie app's logic (SPEC §5): whose Don't Die credentials a call uses, and score dates.

Credentials are the caller's linked account or explicit per-request credentials; there is
no operator-wide Don't Die account to fall back on.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from clients.dontdie import DontDieClient
from core.errors import Conflict, UpstreamError, ValidationFailed
from core.principal import Principal
from services import dd_link
from services.dd_runtime import DDRuntime
from services.users import get_user

MAX_SCORE_DAYS = 366
NO_CREDENTIALS_MESSAGE = (
    "No Don't Die credentials for this call: link the user's account (POST /profile/dd-data/link) "
    "and name the user (user tokens use their own), or send X-DD-Token and X-DD-Client-Id")


@dataclass
class DDCaller:
    """A Don't Die client acting for one account, and that account's id when known."""
    client: DontDieClient
    dontdie_uid: str | None = None

    async def uid(self) -> str:
        if self.dontdie_uid is None:
            self.dontdie_uid = await self.client.get_user_id()
        return self.dontdie_uid


async def resolve_caller(runtime: DDRuntime, principal: Principal, *, user_id: uuid.UUID | None,
                         dd_token: str | None, dd_client_id: str | None) -> DDCaller:
    if user_id is not None:
        principal.ensure_user(user_id)
    if dd_token or dd_client_id:
        if not (dd_token and dd_client_id):
            missing = "X-DD-Client-Id" if dd_token else "X-DD-Token"
            raise ValidationFailed(f"X-DD-Token and X-DD-Client-Id go together: {missing} is missing",
                                   details=[{"loc": ["header", missing], "msg": "field required"}])
        return DDCaller(runtime.client(dd_token, dd_client_id))
    target = user_id or principal.user_id
    if target is None:
        raise Conflict(NO_CREDENTIALS_MESSAGE, code="dontdie_credentials_missing")
    try:
        async with runtime.db.transaction() as session:
            await get_user(session, target)
            account = await dd_link.load_linked_account(session, runtime.settings, target)
    except Conflict:
        raise Conflict(NO_CREDENTIALS_MESSAGE, code="dontdie_credentials_missing") from None
    return DDCaller(runtime.client(account.token, account.client_id), account.dontdie_uid)


def _invalid(message: str, *fields: str) -> ValidationFailed:
    return ValidationFailed(message, details=[{"loc": ["query", f], "msg": message} for f in fields])


def score_dates(*, day: date | None, start_date: date | None, end_date: date | None,
                days: int | None) -> list[date]:
    """Exactly one of `date`, `start_date&end_date` or `date&days` (the days ending on date)."""
    if start_date is not None or end_date is not None:
        if day is not None or days is not None:
            raise _invalid("Use exactly one of: date, start_date&end_date, date&days",
                           "date", "start_date", "end_date", "days")
        if start_date is None or end_date is None:
            raise _invalid("start_date and end_date go together", "start_date", "end_date")
        if end_date < start_date:
            raise _invalid("end_date is before start_date", "end_date")
        count = (end_date - start_date).days + 1
        if count > MAX_SCORE_DAYS:
            raise _invalid(f"At most {MAX_SCORE_DAYS} days per request ({count} asked)",
                           "start_date", "end_date")
        return [start_date + timedelta(days=i) for i in range(count)]
    if day is None:
        raise _invalid("Give date, start_date&end_date, or date&days", "date")
    if days is None:
        return [day]
    if not 1 <= days <= MAX_SCORE_DAYS:
        raise _invalid(f"days must be between 1 and {MAX_SCORE_DAYS}", "days")
    if (day - date.min).days < days - 1:
        raise _invalid("date&days reaches before the first representable date", "date", "days")
    return [day - timedelta(days=i) for i in range(days - 1, -1, -1)]


async def get_scores(caller: DDCaller, dates: list[date]) -> dict[str, Any]:
    uid = await caller.uid()
    scores = await caller.client.get_scores(uid, dates)
    return {"start_date": dates[0].isoformat(), "end_date": dates[-1].isoformat(),
            "days": len(dates), "scores": scores}


def expect_records(value: Any) -> list[dict[str, Any]]:
    """An upstream list of objects, or 502: a changed upstream shape is not our caller's 500."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise UpstreamError("Don't Die API returned an unexpected response shape")
    return value


def expect_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UpstreamError("Don't Die API returned an unexpected response shape")
    return value
