"""Onboarding checklist and profile completeness (SPEC §4.4, getProgress of §4.2)."""
from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timedelta

from sqlalchemy import func, select

from _profile_helpers import data, error
from storage.models import ChecklistItem

BUCKETS = ["health_device", "dd_score", "measurements", "capabilities", "biomarkers",
           "demographics", "protocols"]


async def test_progress_creates_the_seven_items_in_bucket_order(alice):
    progress = data(await alice.client.get("/getChecklistProgress"))  # own by default
    assert [i["bucket_code"] for i in progress["items"]] == BUCKETS
    assert progress["items"][1]["label"] == "Don't Die Score"
    assert all(i["status"] == "pending" and i["source"] is None for i in progress["items"])
    assert datetime.fromisoformat(progress["items"][0]["updated_at"]).utcoffset() == timedelta(0)
    assert (progress["completed"], progress["total"], progress["percent"]) == (0, 7, 0)
    again = data(await alice.client.get("/getChecklistProgress", params={"user_id": str(alice.user_id)}))
    assert [i["bucket_code"] for i in again["items"]] == BUCKETS


async def test_mark_by_json_body_and_percent(alice):
    item = data(await alice.client.post("/markChecklistItem", json={
        "bucket_code": "measurements", "status": "completed", "source": "manual",
        "data_ref": {"count": 3}}))
    assert item == {**item, "bucket_code": "measurements", "label": "Measurements",
                    "status": "completed", "source": "manual", "data_ref": {"count": 3}}
    data(await alice.client.post("/markChecklistItem", json={
        "user_id": str(alice.user_id), "bucket_code": "dd_score", "status": "completed"}))
    data(await alice.client.post("/markChecklistItem", json={
        "bucket_code": "demographics", "status": "skipped"}))
    progress = data(await alice.client.get("/getChecklistProgress"))
    assert progress["completed"] == 2 and progress["percent"] == round(200 / 7) == 29
    statuses = {i["bucket_code"]: i["status"] for i in progress["items"]}
    assert statuses["demographics"] == "skipped" and statuses["biomarkers"] == "pending"
    # getProgress: completed in bucket order; skipped counts as missing
    summary = data(await alice.client.get("/getProgress"))
    assert summary == {"percent": 29, "completed": ["dd_score", "measurements"],
                       "missing": ["health_device", "capabilities", "biomarkers", "demographics",
                                   "protocols"]}


async def test_mark_by_query_parameters_the_original_form(alice, service):
    item = data(await alice.client.post("/markChecklistItem", params={
        "bucket_code": "biomarkers", "status": "in_progress", "source": "lab",
        "data_ref": json.dumps({"file": "a.pdf"})}))
    assert item["status"] == "in_progress" and item["data_ref"] == {"file": "a.pdf"}
    item = data(await service.client.post("/markChecklistItem", params={
        "user_id": str(alice.user_id), "bucket_code": "biomarkers", "status": "completed"}))
    assert item["status"] == "completed" and item["source"] is None  # a mark replaces source


async def test_mark_updates_in_place(alice, profile_ctx):
    for status in ("in_progress", "completed", "pending"):
        data(await alice.client.post("/markChecklistItem", json={"bucket_code": "protocols",
                                                                  "status": status}))
    async with profile_ctx.db.transaction() as session:
        rows = list(await session.scalars(select(ChecklistItem).where(
            ChecklistItem.user_id == alice.user_id)))
    assert len(rows) == 1 and rows[0].status == "pending"


async def test_twenty_concurrent_marks_make_one_row(alice, profile_ctx):
    statuses = ["in_progress", "completed"] * 10
    responses = await asyncio.gather(*(
        alice.client.post("/markChecklistItem", json={"bucket_code": "capabilities", "status": s,
                                                      "data_ref": {"n": n}})
        for n, s in enumerate(statuses)))
    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses if r.status_code != 200]
    async with profile_ctx.db.transaction() as session:
        count = await session.scalar(select(func.count()).select_from(ChecklistItem).where(
            ChecklistItem.user_id == alice.user_id, ChecklistItem.bucket_code == "capabilities"))
    assert count == 1
    progress = data(await alice.client.get("/getChecklistProgress"))
    assert len(progress["items"]) == 7


async def test_validation(alice, service):
    for body in ({"bucket_code": "nope", "status": "completed"},
                 {"bucket_code": "dd_score", "status": "done"},
                 {"bucket_code": "dd_score"},
                 {"bucket_code": "dd_score", "status": "completed", "extra": 1},
                 {"bucket_code": "dd_score", "status": "completed", "data_ref": [1, 2]},
                 {"bucket_code": "dd_score", "status": "completed", "source": "a\x00b"},
                 {"user_id": "not-a-uuid", "bucket_code": "dd_score", "status": "completed"}):
        err = error(await alice.client.post("/markChecklistItem", json=body), 422, "validation_error")
        assert err["details"], body
    for params in ({"bucket_code": "nope", "status": "completed"},
                   {"bucket_code": "dd_score", "status": "done"},
                   {"status": "completed"},
                   {"bucket_code": "dd_score", "status": "completed", "data_ref": "{not json"},
                   {"bucket_code": "dd_score", "status": "completed", "data_ref": "[1]"}):
        error(await alice.client.post("/markChecklistItem", params=params), 422, "validation_error")
    error(await alice.client.post("/markChecklistItem"), 422)  # neither form
    error(await alice.client.post("/markChecklistItem", params={"bucket_code": "dd_score"},
                                  json={"bucket_code": "dd_score", "status": "completed"}), 422)
    # a service token must name the user
    error(await service.client.get("/getChecklistProgress"), 422)
    error(await service.client.get("/getProgress"), 422)
    error(await service.client.post("/markChecklistItem", json={"bucket_code": "dd_score",
                                                                 "status": "completed"}), 422)
    error(await alice.client.get("/getChecklistProgress", params={"user_id": "x"}), 422)


async def test_other_users_are_forbidden(alice, bob):
    theirs = {"user_id": str(bob.user_id)}
    error(await alice.client.get("/getChecklistProgress", params=theirs), 403, "forbidden")
    error(await alice.client.get("/getProgress", params=theirs), 403, "forbidden")
    error(await alice.client.post("/markChecklistItem", json={**theirs, "bucket_code": "dd_score",
                                                              "status": "completed"}), 403)
    error(await alice.client.post("/markChecklistItem", params={**theirs, "bucket_code": "dd_score",
                                                                "status": "completed"}), 403)


async def test_service_acts_on_any_user_and_unknown_users_are_404(service, alice):
    progress = data(await service.client.get("/getChecklistProgress", params={"user_id": str(alice.user_id)}))
    assert progress["total"] == 7
    unknown = {"user_id": str(uuid.uuid4())}
    error(await service.client.get("/getChecklistProgress", params=unknown), 404, "not_found")
    error(await service.client.get("/getProgress", params=unknown), 404)
    error(await service.client.post("/markChecklistItem", json={**unknown, "bucket_code": "dd_score",
                                                                "status": "completed"}), 404)


async def test_get_progress_does_not_write(alice, profile_ctx):
    summary = data(await alice.client.get("/getProgress"))
    assert summary == {"percent": 0, "completed": [], "missing": BUCKETS}
    async with profile_ctx.db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(ChecklistItem)) == 0


async def test_anonymous_is_401(anonymous):
    for method, path in (("GET", "/getChecklistProgress"), ("GET", "/getProgress"),
                         ("POST", "/markChecklistItem")):
        r = await anonymous.request(method, path)
        error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
