"""A local stand-in for the Don't Die API (https://api.dontdie.com).

It speaks the paths and shapes the real API uses, so `clients.dontdie` cannot tell the
difference. Conventions:

- Auth: `Authorization: Bearer <token>` and `x-dd-client-id` are required (401 otherwise).
  Any token starting with `sandbox-` is valid and maps deterministically to its own account,
  so different tokens are different users. `sandbox-empty-...` tokens get an account with no
  data at all (no scores, readings or protocols). Other tokens → 401.
- A uid in the path that is not the caller's → 403; an unknown protocol → 404.
- Data is generated from the uid (same uid, same data) and labelled: account names start
  with "Sandbox User", objects carry `"_sandbox": true` or `"source": "sandbox"`.
- Scores exist from the account's creation date up to today, except about one day in six
  (and every future day), which have `"score": null` as days without device data do.
- Created protocols and sections live in memory for the life of the app.
- `install_faults` knobs apply (`/_sandbox/faults`); `GET /_sandbox/headers` lists the
  client-identifying headers of recent requests so tests can check what was sent.
"""
from __future__ import annotations

import asyncio
import hashlib
import math
import random
import uuid
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse

from sandbox.faults import install_faults

SANDBOX_NS = uuid.UUID("5a1d0b0e-d0d1-4e5a-9b0c-5a4db0c0ffee")
EMPTY_TOKEN_PREFIX = "sandbox-empty"
PROTOCOL_STATUSES = ("Draft", "Active", "Paused", "Completed")


def _uuid(*parts: object) -> str:
    return str(uuid.uuid5(SANDBOX_NS, ":".join(str(p) for p in parts)))


def _rng(*parts: object) -> random.Random:
    seed = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(seed[:8], "big"))


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _today() -> date:
    return datetime.now(timezone.utc).date()


class ApiError(Exception):
    """Answered in the NestJS-style error shape the real API uses."""

    _names = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message

    def response(self) -> JSONResponse:
        return JSONResponse({"statusCode": self.status, "message": self.message,
                             "error": self._names.get(self.status, "Error")},
                            status_code=self.status)


# --- deterministic account data -------------------------------------------------------

CATEGORIES = [
    {"id": _uuid("category", "Measurements"), "name": "Measurements"},
    {"id": _uuid("category", "Capabilities"), "name": "Capabilities"},
    {"id": _uuid("category", "Biomarkers"), "name": "Biomarkers"},
]
_CATEGORY_ID = {c["name"]: c["id"] for c in CATEGORIES}

# name, unit, typical low, typical high, decimals, self-reported, readings, days between
_BIOMARKERS: dict[str, list[tuple[str, str, float, float, int, bool, int, int]]] = {
    "Measurements": [
        ("Weight", "lbs", 140, 210, 1, True, 4, 30),
        ("Height", "in", 62, 75, 1, True, 1, 0),
        ("Body Fat", "%", 12, 30, 1, False, 3, 45),
        ("Waist Circumference", "in", 28, 40, 1, True, 2, 60),
        ("Resting Heart Rate", "bpm", 50, 75, 0, False, 4, 14),
        ("Blood Pressure Systolic", "mmHg", 105, 135, 0, False, 3, 30),
        ("Blood Pressure Diastolic", "mmHg", 65, 88, 0, False, 3, 30),
    ],
    "Capabilities": [
        ("Grip Strength", "kg", 28, 55, 1, True, 2, 90),
        ("Push-ups", "reps", 10, 45, 0, True, 2, 90),
        ("VO2 Max", "mL/kg/min", 32, 52, 1, False, 3, 60),
        ("Plank Hold", "s", 45, 180, 0, True, 2, 90),
        ("Single Leg Stand", "s", 15, 60, 0, True, 1, 0),
        ("Reaction Time", "ms", 220, 320, 0, False, 2, 120),
    ],
    "Biomarkers": [
        ("LDL Cholesterol", "mg/dL", 70, 150, 0, False, 2, 180),
        ("HDL Cholesterol", "mg/dL", 40, 75, 0, False, 2, 180),
        ("Triglycerides", "mg/dL", 60, 160, 0, False, 2, 180),
        ("ApoB", "mg/dL", 60, 120, 0, False, 2, 180),
        ("HbA1c", "%", 4.8, 5.9, 1, False, 2, 180),
        ("Fasting Glucose", "mg/dL", 78, 105, 0, False, 2, 180),
        ("hs-CRP", "mg/L", 0.3, 3.0, 2, False, 2, 180),
        ("Vitamin D (25-OH)", "ng/mL", 22, 60, 0, False, 2, 180),
    ],
}

_SEED_PROTOCOLS = [
    ("Consistent Sleep Window", "Sleep", "Habit",
     "Same bedtime and wake time every day, within 30 minutes.", "Active",
     [("Wind-down", "Dim lights and stop screens 60 minutes before bed."),
      ("Fixed wake time", "Wake at the same time, weekends included.")]),
    ("Zone 2 Cardio", "Exercise", "Habit",
     "Three 45-minute sessions a week at a conversational pace.", "Active",
     [("Schedule", "Monday, Wednesday, Friday mornings."),
      ("Intensity", "Keep heart rate at 60-70% of maximum.")]),
    ("Last Meal Four Hours Before Bed", "Nutrition", "Habit",
     "Finish eating at least four hours before going to sleep.", "Completed",
     [("Cut-off", "Kitchen closes at 6 pm.")]),
]


def account_for(token: str) -> dict[str, Any]:
    uid = _uuid("account", token)
    rng = _rng("account", uid)
    created = datetime(2023, 1, 1, tzinfo=timezone.utc) + timedelta(
        days=rng.randrange(0, 540), seconds=rng.randrange(0, 86400))
    short = uid[:8]
    return {
        "id": uid,
        "email": f"sandbox+{short}@sandbox.dontdie.invalid",
        "name": f"Sandbox User {short}",
        "firstName": "Sandbox",
        "lastName": f"User {short}",
        "createdAt": _iso(created),
        "_sandbox": True,
        "_empty": token.startswith(EMPTY_TOKEN_PREFIX),
    }


def score_for(account: dict[str, Any], day: date) -> dict[str, Any] | None:
    created = datetime.fromisoformat(account["createdAt"].replace("Z", "+00:00")).date()
    if account["_empty"] or day > _today() or day < created:
        return None
    rng = _rng("score", account["id"], day.isoformat())
    if rng.random() < 1 / 6:
        return None  # the device sent nothing that day
    base = 55 + _rng("score-base", account["id"]).random() * 25
    # a slow seasonal drift plus day-to-day noise, so trends look like a real person's
    points = base + 6 * math.sin(day.toordinal() / 23) + rng.gauss(0, 2.5)
    points = round(min(100.0, max(0.0, points)), 1)
    parts = {k: round(min(100.0, max(0.0, points + rng.gauss(0, 6))), 1)
             for k in ("sleep", "activity", "heart", "nutrition")}
    return {"points": points, "maxPoints": 100, "breakdown": parts, "source": "sandbox"}


def readings_for(account: dict[str, Any], category: str) -> list[dict[str, Any]]:
    if account["_empty"]:
        return []
    uid, today = account["id"], _today()
    out = []
    for name, unit, low, high, decimals, self_reported, count, every in _BIOMARKERS[category]:
        rng = _rng("biomarker", uid, name)
        level = low + rng.random() * (high - low)
        offset = rng.randrange(1, 10)
        for i in range(count):
            value = level * (1 + rng.gauss(0, 0.02))
            measured = datetime.combine(today - timedelta(days=offset + i * every),
                                        time(7 + rng.randrange(0, 4), rng.randrange(0, 60)),
                                        tzinfo=timezone.utc)
            out.append({
                "id": _uuid("reading", uid, name, i),
                "biomarkerId": _uuid("biomarker", name),
                "biomarkerName": name,
                "categoryId": _CATEGORY_ID[category],
                "value": round(value, decimals) if decimals else int(round(value)),
                "measurementUnit": unit,
                "dateMeasured": _iso(measured),
                "isSelfReported": self_reported,
                "source": "sandbox",
            })
    out.sort(key=lambda r: r["dateMeasured"], reverse=True)
    return out


def _seed_protocols(account: dict[str, Any]) -> tuple[list[dict], dict[str, list[dict]]]:
    if account["_empty"]:
        return [], {}
    uid = account["id"]
    created = datetime.fromisoformat(account["createdAt"].replace("Z", "+00:00"))
    protocols, sections = [], {}
    for i, (name, category, kind, description, status, secs) in enumerate(_SEED_PROTOCOLS):
        pid = _uuid("protocol", uid, i)
        at = _iso(created + timedelta(days=7 * (i + 1)))
        protocols.append({"id": pid, "userId": uid, "name": name, "description": description,
                          "type": kind, "category": category, "status": status,
                          "createdAt": at, "updatedAt": at, "source": "sandbox"})
        sections[pid] = [{"id": _uuid("section", pid, j), "protocolId": pid, "title": title,
                          "content": content, "order": j, "status": status,
                          "createdAt": at, "updatedAt": at, "source": "sandbox"}
                         for j, (title, content) in enumerate(secs)]
    return protocols, sections


# --- the app ----------------------------------------------------------------------------

class CancelOnDisconnect:
    """Cancel a request's handler once its client has gone, as a real server would.

    Without it an injected hang outlives the client that gave up on it and holds the
    server's graceful shutdown until it times out.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        pending = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            pending.append(message)
            if not message.get("more_body"):
                break
        gone = asyncio.Event()
        finished = False

        async def replay():
            if pending:
                return pending.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def tracked_send(message):
            nonlocal finished
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, replay, tracked_send))
        # with the body read, the server's receive() returns only on disconnect or completion
        watcher = asyncio.ensure_future(receive())
        try:
            await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher.done() and not finished:
                gone.set()
                handler.cancel()
            await asyncio.gather(handler, return_exceptions=True)
            if not handler.cancelled() and handler.exception():
                raise handler.exception()
        finally:
            watcher.cancel()


def create_app() -> FastAPI:
    app = FastAPI(title="Don't Die API (local sandbox)",
                  description="Sandbox data only: nothing here comes from a real account.")
    install_faults(app)
    app.add_middleware(CancelOnDisconnect)
    seen_headers: list[dict[str, Any]] = []
    # uid -> {"protocols": [...], "sections": {protocol_id: [...]}}, seeded on first use
    stores: dict[str, dict[str, Any]] = {}

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return exc.response()

    async def caller(request: Request) -> dict[str, Any]:
        seen_headers.append({
            "method": request.method, "path": request.url.path,
            "authorization": request.headers.get("authorization"),
            "x-dd-client-id": request.headers.get("x-dd-client-id"),
            "x-client-id": request.headers.get("x-client-id"),
        })
        del seen_headers[:-200]
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "Missing bearer token")
        if not token.startswith("sandbox-"):
            raise ApiError(401, "Invalid or expired token")
        if not request.headers.get("x-dd-client-id"):
            raise ApiError(401, "Missing x-dd-client-id header")
        return account_for(token)

    def owner(uid: str, account: dict[str, Any]) -> dict[str, Any]:
        if uid != account["id"]:
            raise ApiError(403, "Forbidden resource")
        if uid not in stores:
            protocols, sections = _seed_protocols(account)
            stores[uid] = {"protocols": protocols, "sections": sections}
        return stores[uid]

    def find_protocol(store: dict[str, Any], protocol_id: str) -> dict[str, Any]:
        for p in store["protocols"]:
            if p["id"] == protocol_id:
                return p
        raise ApiError(404, f"Protocol {protocol_id} not found")

    async def json_object(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "Body must be JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "Body must be a JSON object")
        return body

    def check_status(body: dict[str, Any]) -> str:
        status = body.get("status") or "Draft"
        if status not in PROTOCOL_STATUSES:
            raise ApiError(400, f"status must be one of {', '.join(PROTOCOL_STATUSES)}")
        return status

    @app.get("/_sandbox/headers", include_in_schema=False)
    async def recent_headers():
        return {"requests": seen_headers}

    @app.get("/account")
    async def get_account(account=Depends(caller)):
        # JSONResponse directly: FastAPI's encoder drops keys starting with "_sa"
        return JSONResponse({k: v for k, v in account.items() if k != "_empty"})

    @app.get("/user-profile/{uid}/score-v2")
    async def get_score(uid: str, day: str | None = Query(None, alias="date"),
                        account=Depends(caller)):
        owner(uid, account)
        try:
            parsed = datetime.strptime(day or "", "%Y-%m-%d").date()
        except ValueError:
            raise ApiError(400, "date must be YYYY-MM-DD") from None
        return JSONResponse({"date": parsed.isoformat(), "score": score_for(account, parsed),
                             "_sandbox": True})

    @app.get("/system/biomarker-categories")
    async def list_categories(_=Depends(caller)):
        return CATEGORIES

    @app.get("/account/biomarkers")
    async def list_readings(categoryId: str | None = None, account=Depends(caller)):
        if categoryId is None:
            return [r for c in CATEGORIES for r in readings_for(account, c["name"])]
        for c in CATEGORIES:
            if c["id"] == categoryId:
                return readings_for(account, c["name"])
        raise ApiError(404, f"Biomarker category {categoryId} not found")

    @app.get("/user-health/{uid}/protocols")
    async def list_protocols(uid: str, account=Depends(caller)):
        return owner(uid, account)["protocols"]

    @app.get("/user-health/{uid}/protocols/{protocol_id}/sections")
    async def list_sections(uid: str, protocol_id: str, account=Depends(caller)):
        store = owner(uid, account)
        find_protocol(store, protocol_id)
        return store["sections"].get(protocol_id, [])

    @app.post("/user-health/{uid}/protocols", status_code=201)
    async def create_protocol(uid: str, request: Request, account=Depends(caller)):
        store = owner(uid, account)
        body = await json_object(request)
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, "name should not be empty")
        now = _iso(datetime.now(timezone.utc))
        protocol = {**body, "id": str(uuid.uuid4()), "userId": uid, "name": name.strip(),
                    "status": check_status(body), "createdAt": now, "updatedAt": now,
                    "source": "sandbox"}
        store["protocols"].append(protocol)
        store["sections"][protocol["id"]] = []
        return protocol

    @app.post("/user-health/{uid}/protocols/{protocol_id}/sections", status_code=201)
    async def create_section(uid: str, protocol_id: str, request: Request,
                             account=Depends(caller)):
        store = owner(uid, account)
        find_protocol(store, protocol_id)
        body = await json_object(request)
        title = body.get("title") or body.get("name")
        if not isinstance(title, str) or not title.strip():
            raise ApiError(400, "title should not be empty")
        sections = store["sections"].setdefault(protocol_id, [])
        now = _iso(datetime.now(timezone.utc))
        section = {"order": len(sections), **body, "id": str(uuid.uuid4()),
                   "protocolId": protocol_id, "title": title.strip(),
                   "status": check_status(body), "createdAt": now, "updatedAt": now,
                   "source": "sandbox"}
        sections.append(section)
        return section

    return app
