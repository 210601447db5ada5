"""Small helpers shared by the profile route tests in this folder."""
from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone


def data(response, status: int = 200):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert body["status"] == "ok", body
    return body["data"]


def error(response, status: int, code: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == "error", body
    assert body["request_id"]
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


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
