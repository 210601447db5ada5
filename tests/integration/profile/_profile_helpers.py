"""Small helpers shared by the profile route tests in this folder."""
from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone

from tests.support import envelope
from tests.support.envelope import error  # noqa: F401  (re-exported for the tests here)


def data(response, status: int = 200):
    return envelope.data(response, status)


def today() -> date:
    return datetime.now(timezone.utc).date()


def on_day(days_ago: int, hour: int = 12, minute: int = 0) -> str:
    """An ISO timestamp on the UTC calendar day `days_ago` days before today."""
    day = today() - timedelta(days=days_ago)
    return datetime.combine(day, time(hour, minute), tzinfo=timezone.utc).isoformat()


async def add_measurement(client, user_id, type_: str, value: float, captured_at: str,
                          unit: str = "u", source: str | None = None):
    body = {"user_id": str(user_id), "type": type_, "value": value, "unit": unit,
            "captured_at": captured_at}
    if source is not None:
        body["source"] = source
    return data(await client.post("/upsertMeasurement", json=body))
