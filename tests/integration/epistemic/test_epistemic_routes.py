"""The epistemic app's routes end to end against the Epistemic Me sandbox (SPEC §6)."""
from __future__ import annotations

import time
import uuid
from datetime import datetime, timedelta

import pytest

from tests.support.envelope import data, error

from api.routers.epistemic import EXTRAS_KEY
from sandbox.server import free_port






def uid(caller) -> str:
    return str(caller.user_id)


# One call per route (deleteBelief is tested on its own): method, path, request builder.
ROUTES = {
    "createSelfModel": ("POST", "/createSelfModel", lambda u: {"json": {"user_id": u}}),
    "getSelfModel": ("GET", "/getSelfModel", lambda u: {"params": {"user_id": u}}),
    "syncSelfModelToProfile": ("POST", "/syncSelfModelToProfile", lambda u: {"json": {"user_id": u}}),
    "updateBelief": ("POST", "/updateBelief",
                     lambda u: {"json": {"user_id": u, "statement": "Sleep matters"}}),
    "listBeliefSystems": ("GET", "/listBeliefSystems", lambda u: {"params": {"user_id": u}}),
    "listBeliefs": ("GET", "/listBeliefs", lambda u: {"params": {"user_id": u}}),
    "createDialectic": ("POST", "/createDialectic", lambda u: {"json": {"user_id": u}}),
    "updateDialectic": ("POST", "/updateDialectic",
                        lambda u: {"json": {"user_id": u, "dialectic_id": "di_x", "answer": "Yes."}}),
    "listDialectics": ("GET", "/listDialectics", lambda u: {"params": {"user_id": u}}),
}


async def call(client, route: str, user_id: str):
    method, path, build = ROUTES[route]
    return await client.request(method, path, **build(user_id))


async def create_self_model(client, user_id: str, **extra):
    response = await client.post("/createSelfModel", json={"user_id": user_id, **extra})
    assert response.status_code in (200, 201), response.text
    return data(response)


# --- operation ids -------------------------------------------------------------------------

def test_operation_ids_are_prefixed_and_unique_across_apps(em_app, profile_app):
    from api.dontdie_app import build_dontdie_app

    em_ops = {op["operationId"]: path for path, ops in em_app.openapi()["paths"].items()
              for op in ops.values()}
    expected = {f"em{name[0].upper()}{name[1:]}": f"/{name}" for name in [*ROUTES, "deleteBelief"]}
    assert {k: v for k, v in em_ops.items() if k not in ("health", "ready")} == expected
    all_ids: list[str] = []
    for app in (em_app, profile_app, build_dontdie_app(em_app.state.ctx.settings,
                                                       ctx=em_app.state.ctx)):
        all_ids += [op["operationId"] for ops in app.openapi()["paths"].values()
                    for op in ops.values() if op["operationId"] not in ("health", "ready")]
    assert all(len(op) <= 64 for op in all_ids)
    duplicates = {op for op in all_ids if all_ids.count(op) > 1}
    assert not duplicates, duplicates


# --- auth and ownership, every route --------------------------------------------------------
# Each check loops over every route inside one test (an app per test is costly to build); the
# route is named in every assertion message.

def error_for(route: str, response, status: int, code: str | None = None):
    assert response.status_code == status, f"{route}: {response.status_code} {response.text}"
    return error(response, status, code)


async def test_missing_or_bad_token_is_401_on_every_route(anon_em, em_client_for, alice, em_upstream):
    bad = em_client_for("sma_not-a-real-token")
    for client in (anon_em, bad):
        for route in ROUTES:
            response = await call(client, route, uid(alice))
            error_for(route, response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer", route
        response = await client.delete("/deleteBelief", params={"belief_id": "bl_1"})
        error_for("deleteBelief", response, 401, "unauthorized")
    assert await em_upstream.requests() == []


async def test_user_token_on_another_user_is_403_on_every_route(alice_em, bob, em_upstream):
    for route in ROUTES:
        error_for(route, await call(alice_em, route, uid(bob)), 403, "forbidden")
    response = await alice_em.delete("/deleteBelief", params={"belief_id": "bl_1", "user_id": uid(bob)})
    error_for("deleteBelief", response, 403, "forbidden")
    assert await em_upstream.requests() == []


async def test_unknown_user_is_404_on_every_route_without_calling_upstream(service_em, em_upstream):
    for route in ROUTES:
        error_for(route, await call(service_em, route, str(uuid.uuid4())), 404, "not_found")
    assert await em_upstream.requests() == []


async def test_service_and_admin_act_on_any_user(service_em, admin_em, bob):
    created = await service_em.post("/createSelfModel", json={"user_id": uid(bob)})
    assert created.status_code == 201, created.text
    assert data(await admin_em.get("/getSelfModel", params={"user_id": uid(bob)}))["id"] == uid(bob)


INVALID_INPUTS = [
    ("createSelfModel", {"json": {"user_id": "not-a-uuid"}}),
    ("createSelfModel", {"json": {"user_id": None}}),
    ("createSelfModel", {"json": {"philosophies": ["x"]}}),
    ("createSelfModel", {"json": {"user_id": "{alice}", "philosophies": "stoic"}}),
    ("createSelfModel", {"json": {"user_id": "{alice}", "unexpected": 1}}),
    ("getSelfModel", {"params": {"user_id": "nope"}}),
    ("getSelfModel", {"params": {}}),
    ("syncSelfModelToProfile", {"json": {}}),
    ("updateBelief", {"json": {"user_id": "{alice}"}}),
    ("updateBelief", {"json": {"user_id": "{alice}", "statement": "   "}}),
    ("updateBelief", {"json": {"user_id": "{alice}", "statement": "x" * 2001}}),
    ("updateBelief", {"json": {"user_id": "{alice}", "statement": "x", "confidence": 1.5}}),
    ("updateBelief", {"json": {"user_id": "{alice}", "statement": "x", "confidence": -0.1}}),
    ("updateBelief", {"json": {"user_id": "{alice}", "statement": "x", "belief_type": "OPINION"}}),
    ("updateBelief", {"json": {"user_id": "{alice}", "statement": "nul\u0000byte"}}),
    ("listBeliefSystems", {"params": {"user_id": "{alice}", "limit": 0}}),
    ("listBeliefs", {"params": {"user_id": "{alice}", "limit": 101}}),
    ("listBeliefs", {"params": {"user_id": "{alice}", "offset": -1}}),
    ("createDialectic", {"json": {"user_id": "{alice}", "dialectic_type": "SOCRATIC"}}),
    ("createDialectic", {"json": {"user_id": "{alice}", "learning_objective": {
        "completion_percentage": 101}}}),
    ("createDialectic", {"json": {"user_id": "{alice}", "learning_objective": {
        "target_belief_type": "WRONG"}}}),
    ("createDialectic", {"json": {"user_id": "{alice}", "learning_objective": {"topics": "sleep"}}}),
    ("updateDialectic", {"json": {"user_id": "{alice}", "dialectic_id": "di_x", "answer": "  "}}),
    ("updateDialectic", {"json": {"user_id": "{alice}", "dialectic_id": "", "answer": "a"}}),
    ("updateDialectic", {"json": {"user_id": "{alice}", "answer": "a"}}),
    ("updateDialectic", {"json": {"user_id": "{alice}", "dialectic_id": "di_x", "answer": "a",
                                  "dry_run": "maybe"}}),
    ("listDialectics", {"params": {"user_id": "{alice}", "limit": "many"}}),
]


async def test_invalid_input_is_422_with_field_details(alice_em, alice, em_upstream):
    def fill(value):
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return uid(alice) if value == "{alice}" else value

    assert {route for route, _ in INVALID_INPUTS} == set(ROUTES)
    for route, request_kwargs in INVALID_INPUTS:
        method, path, _ = ROUTES[route]
        response = await alice_em.request(method, path, **fill(request_kwargs))
        err = error_for(f"{route} {request_kwargs}", response, 422, "validation_error")
        assert err["details"] and all("loc" in d for d in err["details"]), route
    assert await em_upstream.requests() == []


# --- upstream failures, every route --------------------------------------------------------

async def test_rejected_api_key_is_502_naming_the_setting(em_app_with, em_client_for, alice):
    for key in (str(uuid.uuid4()), "not-a-uuid", ""):
        client = em_client_for(alice, app=em_app_with(key=key))
        for route in ROUTES:
            err = error_for(f"{route} key={key!r}", await call(client, route, uid(alice)),
                            502, "upstream_error")
            assert "SMA_EPISTEMIC_API_KEY" in err["message"], route
            assert err["details"]["upstream_code"] == "unauthenticated", route


async def test_upstream_invalid_argument_is_422(alice_em, alice, em_upstream):
    await em_upstream.fault(path_prefix="/EpistemicMeService/", fail_status=400,
                            fail_body={"code": "invalid_argument", "message": "bad field"})
    for route in ROUTES:
        err = error_for(route, await call(alice_em, route, uid(alice)), 422, "validation_error")
        assert "bad field" in err["message"], route
        assert err["details"]["upstream_code"] == "invalid_argument", route


async def test_upstream_internal_error_is_502(alice_em, alice, em_upstream):
    await em_upstream.fault(path_prefix="/EpistemicMeService/", fail_status=500,
                            fail_body={"code": "internal", "message": "database exploded"})
    for route in ROUTES:
        err = error_for(route, await call(alice_em, route, uid(alice)), 502, "upstream_error")
        assert "database exploded" in err["message"], route
        assert err["details"]["upstream_code"] == "internal", route
    # A failing lookup is never taken for an absent self-model: nothing was (re)created.
    assert "POST /EpistemicMeService/CreateSelfModel" not in await em_upstream.requests()


async def test_upstream_other_errors_are_502(alice_em, alice, em_upstream):
    for status, body in ((500, None), (503, {"code": "unavailable", "message": "overloaded"}),
                         (403, {"code": "permission_denied", "message": "no"})):
        await em_upstream.fault(path_prefix="/EpistemicMeService/", fail_status=status,
                                fail_body=body)
        for route in ROUTES:
            error_for(f"{route} {status}", await call(alice_em, route, uid(alice)), 502,
                      "upstream_error")


async def test_unreachable_upstream_is_503(em_app_with, em_client_for, alice):
    client = em_client_for(alice, app=em_app_with(url=f"http://127.0.0.1:{free_port()}"))
    for route in ROUTES:
        err = error_for(route, await call(client, route, uid(alice)), 503, "dependency_unavailable")
        assert "unreachable" in err["message"], route


async def test_unconfigured_upstream_is_503(em_app_with, em_client_for, alice):
    client = em_client_for(alice, app=em_app_with(url=""))
    for route in ROUTES:
        err = error_for(route, await call(client, route, uid(alice)), 503, "dependency_unavailable")
        assert "SMA_EPISTEMIC_BASE_URL" in err["message"], route


async def test_hanging_upstream_is_504_quickly(em_app_with, em_client_for, alice, em_upstream):
    client = em_client_for(alice, app=em_app_with(epistemic_timeout_seconds=0.5))
    await em_upstream.fault(path_prefix="/EpistemicMeService/", hang=True)
    for route in ROUTES:
        started = time.monotonic()
        err = error_for(route, await call(client, route, uid(alice)), 504, "upstream_timeout")
        assert time.monotonic() - started < 3, route
        assert "0.5s" in err["message"], route


# --- self-models ---------------------------------------------------------------------------

async def test_create_self_model_then_get_it(alice_em, alice):
    user_id = uid(alice)
    error(await alice_em.get("/getSelfModel", params={"user_id": user_id}), 404, "not_found")
    response = await alice_em.post("/createSelfModel",
                                   json={"user_id": user_id, "philosophies": ["stoicism"]})
    assert response.status_code == 201
    created = data(response)
    assert created["id"] == user_id and created["user_id"] == user_id
    assert created["created"] is True and created["philosophies"] == ["stoicism"]
    assert created["belief_system"] == {"self_model_id": user_id, "belief_count": 0, "beliefs": []}
    assert created["dialectics"] == []
    uuid.UUID(created["profile_self_model_id"])
    fetched = data(await alice_em.get("/getSelfModel", params={"user_id": user_id}))
    assert fetched["philosophies"] == ["stoicism"] and "created" not in fetched


async def test_create_self_model_again_never_wipes_upstream(alice_em, alice, em_upstream):
    user_id = uid(alice)
    first = await create_self_model(alice_em, user_id)
    data(await alice_em.post("/updateBelief", json={"user_id": user_id, "statement": "Walks help"}))
    await em_upstream.clear_requests()
    again = await alice_em.post("/createSelfModel", json={"user_id": user_id, "philosophies": ["x"]})
    assert again.status_code == 200
    body = data(again)
    assert body["created"] is False
    assert body["profile_self_model_id"] == first["profile_self_model_id"]
    assert [b["statement"] for b in body["belief_system"]["beliefs"]] == ["Walks help"]
    assert "POST /EpistemicMeService/CreateSelfModel" not in await em_upstream.requests()


async def test_create_self_model_mirrors_the_profile_self_model(alice_em, alice):
    created = await create_self_model(alice_em, uid(alice))
    tree = data(await alice.client.get("/getSelfModel", params={"user_id": uid(alice)}))
    assert tree["id"] == created["profile_self_model_id"]
    assert {s["name"] for s in tree["belief_systems"]} == {"default", "epistemic_me"}


async def test_get_self_model_of_user_without_one_says_how_to_create_it(alice_em, alice):
    err = error(await alice_em.get("/getSelfModel", params={"user_id": uid(alice)}), 404)
    assert "createSelfModel" in err["message"]
    for route in ("listBeliefs", "listBeliefSystems", "listDialectics", "updateBelief",
                  "createDialectic", "syncSelfModelToProfile"):
        error(await call(alice_em, route, uid(alice)), 404, "not_found")


# --- beliefs -------------------------------------------------------------------------------

async def test_update_belief_sends_a_type_and_mirrors(alice_em, alice):
    user_id = uid(alice)
    await create_self_model(alice_em, user_id)
    response = await alice_em.post("/updateBelief", json={"user_id": user_id,
                                                          "statement": "  Sleep drives my mood  "})
    assert response.status_code == 201, response.text
    result = data(response)
    belief, mirrored = result["belief"], result["profile_belief"]
    assert belief["id"].startswith("bl_") and belief["belief_type"] == "STATEMENT"
    assert belief["statement"] == "Sleep drives my mood" and belief["version"] == 1
    assert mirrored["external_id"] == belief["id"] and mirrored["confidence"] == 0.5
    assert mirrored["statement"] == "Sleep drives my mood" and mirrored["belief_type"] == "STATEMENT"
    typed = data(await alice_em.post("/updateBelief", json={
        "user_id": user_id, "statement": "Coffee late ruins my sleep", "confidence": 0.9,
        "belief_type": "causal"}))
    assert typed["belief"]["belief_type"] == "CAUSAL"
    assert typed["profile_belief"]["confidence"] == 0.9
    assert typed["profile_belief"]["belief_system_id"] == mirrored["belief_system_id"]
    tree = data(await alice.client.get("/getSelfModel", params={"user_id": user_id}))
    em_system = next(s for s in tree["belief_systems"] if s["name"] == "epistemic_me")
    assert [(b["statement"], b["confidence"], b["external_id"]) for b in em_system["beliefs"]] == [
        ("Sleep drives my mood", 0.5, belief["id"]),
        ("Coffee late ruins my sleep", 0.9, typed["belief"]["id"])]


async def test_list_beliefs_and_belief_systems(alice_em, alice):
    user_id = uid(alice)
    await create_self_model(alice_em, user_id)
    statements = ["First belief", "Second belief", "Third belief"]
    for statement in statements:
        data(await alice_em.post("/updateBelief", json={"user_id": user_id, "statement": statement}))
    page = data(await alice_em.get("/listBeliefs", params={"user_id": user_id}))
    assert page["total"] == 3 and page["limit"] == 50 and page["offset"] == 0
    assert [b["statement"] for b in page["items"]] == statements[::-1]  # newest first
    assert set(page["items"][0]) == {"id", "belief_type", "statement", "version"}
    second = data(await alice_em.get("/listBeliefs", params={"user_id": user_id, "limit": 1,
                                                              "offset": 1}))
    assert [b["statement"] for b in second["items"]] == ["Second belief"] and second["total"] == 3
    systems = data(await alice_em.get("/listBeliefSystems", params={"user_id": user_id}))
    assert systems["total"] == 1
    assert systems["items"][0]["belief_count"] == 3
    assert [b["statement"] for b in systems["items"][0]["beliefs"]] == statements


async def test_delete_belief_is_501_and_authenticated(alice_em, alice, anon_em, em_upstream):
    err = error(await alice_em.delete("/deleteBelief", params={"belief_id": "bl_1",
                                                               "user_id": uid(alice)}),
                501, "not_implemented")
    assert "cannot" in err["message"] and "delete" in err["message"]
    error(await alice_em.delete("/deleteBelief"), 501)
    error(await anon_em.delete("/deleteBelief", params={"belief_id": "bl_1"}), 401)
    assert await em_upstream.requests() == []


# --- dialectics ----------------------------------------------------------------------------

async def test_create_dialectic_with_learning_objective(alice_em, alice):
    user_id = uid(alice)
    await create_self_model(alice_em, user_id)
    response = await alice_em.post("/createDialectic", json={
        "user_id": user_id, "dialectic_type": "sleep_diet_exercise",
        "learning_objective": {"description": "Understand sleep beliefs", "topics": ["sleep"],
                               "target_belief_type": "CAUSAL", "completion_percentage": 0}})
    assert response.status_code == 201, response.text
    dialectic = data(response)
    assert dialectic["id"].startswith("di_") and dialectic["self_model_id"] == user_id
    assert dialectic["dialectic_type"] == "SLEEP_DIET_EXERCISE"
    assert dialectic["learning_objective"] == {
        "description": "Understand sleep beliefs", "topics": ["sleep"],
        "target_belief_type": "CAUSAL", "completion_percentage": 0.0}
    [interaction] = dialectic["interactions"]
    assert interaction["status"] == "PENDING_ANSWER" and interaction["type"] == "QUESTION_ANSWER"
    assert "sleep" in interaction["question"] and interaction["answer"] is None
    assert datetime.fromisoformat(interaction["asked_at"]).utcoffset() == timedelta(0)
    assert dialectic["pending_question"] == interaction["question"]
    assert dialectic["answered_count"] == 0
    uuid.UUID(dialectic["profile_dialectic_id"])


async def test_update_dialectic_answers_and_asks_the_next_question(alice_em, alice):
    user_id = uid(alice)
    await create_self_model(alice_em, user_id)
    dialectic = data(await alice_em.post("/createDialectic", json={"user_id": user_id}))
    first_question = dialectic["pending_question"]
    preview = data(await alice_em.post("/updateDialectic", json={
        "user_id": user_id, "dialectic_id": dialectic["id"], "answer": "Dry run answer here.",
        "dry_run": True}))
    assert len(preview["interactions"]) == 2
    assert preview["profile_dialectic_id"] == dialectic["profile_dialectic_id"]
    updated = data(await alice_em.post("/updateDialectic", json={
        "user_id": user_id, "dialectic_id": dialectic["id"],
        "answer": "Sleeping eight hours keeps me calm. I walk every day."}))
    first, second = updated["interactions"]
    assert first["question"] == first_question and first["status"] == "ANSWERED"
    assert first["answer"] == "Sleeping eight hours keeps me calm. I walk every day."
    assert [b["statement"] for b in first["extracted_beliefs"]] == [
        "Sleeping eight hours keeps me calm.", "I walk every day."]
    assert first["extracted_beliefs"][0]["belief_type"] == "CAUSAL"
    assert first["answered_at"] is not None
    assert second["status"] == "PENDING_ANSWER" and updated["pending_question"] == second["question"]
    assert updated["answered_count"] == 1
    assert updated["profile_dialectic_id"] == dialectic["profile_dialectic_id"]


async def test_update_unknown_or_foreign_dialectic_is_404(alice_em, bob_em, alice, bob):
    await create_self_model(alice_em, uid(alice))
    await create_self_model(bob_em, uid(bob))
    bobs = data(await bob_em.post("/createDialectic", json={"user_id": uid(bob)}))
    for dialectic_id in ("di_unknown", bobs["id"]):
        err = error(await alice_em.post("/updateDialectic", json={
            "user_id": uid(alice), "dialectic_id": dialectic_id, "answer": "Mine now."}), 404)
        assert dialectic_id in err["message"]


async def test_list_dialectics_newest_first(alice_em, alice):
    user_id = uid(alice)
    await create_self_model(alice_em, user_id)
    first = data(await alice_em.post("/createDialectic", json={"user_id": user_id}))
    second = data(await alice_em.post("/createDialectic", json={"user_id": user_id,
                                                                "dialectic_type": "HEGELIAN"}))
    page = data(await alice_em.get("/listDialectics", params={"user_id": user_id}))
    assert page["total"] == 2
    assert [d["id"] for d in page["items"]] == [second["id"], first["id"]]
    assert [d["profile_dialectic_id"] for d in page["items"]] == [
        second["profile_dialectic_id"], first["profile_dialectic_id"]]
    assert page["items"][0]["dialectic_type"] == "HEGELIAN"
    tail = data(await alice_em.get("/listDialectics", params={"user_id": user_id, "offset": 1}))
    assert [d["id"] for d in tail["items"]] == [first["id"]]
    model = data(await alice_em.get("/getSelfModel", params={"user_id": user_id}))
    assert {d["id"] for d in model["dialectics"]} == {first["id"], second["id"]}


# --- readiness and the client --------------------------------------------------------------

async def test_ready_reports_epistemic_me(anon_em):
    ready = await anon_em.get("/ready")
    assert ready.status_code == 200, ready.text
    check = ready.json()["data"]["dependencies"]["epistemic_me"]
    assert check["ok"] is True and "API key accepted" in check["detail"]


@pytest.mark.parametrize("key,expected", [
    ("", "SMA_EPISTEMIC_API_KEY is not set"),
    ("not-a-uuid", "SMA_EPISTEMIC_API_KEY is not a valid Epistemic Me API key"),
    (str(uuid.uuid4()), "SMA_EPISTEMIC_API_KEY"),
])
async def test_ready_reports_a_missing_or_bad_api_key(key, expected, em_app_with, em_client_for):
    client = em_client_for(None, app=em_app_with(key=key))
    response = await client.get("/ready")
    err = error(response, 503, "not_ready")
    check = err["details"]["dependencies"]["epistemic_me"]
    assert check["ok"] is False and expected in check["error"]
    assert err["details"]["dependencies"]["database"]["ok"] is True


async def test_ready_reports_unreachable_and_hanging_upstream(em_app_with, em_client_for, em_upstream):
    closed = em_client_for(None, app=em_app_with(url=f"http://127.0.0.1:{free_port()}"))
    check = error(await closed.get("/ready"), 503)["details"]["dependencies"]["epistemic_me"]
    assert check["ok"] is False and "unreachable" in check["error"]
    await em_upstream.fault(path_prefix="/EpistemicMeService/", hang=True)
    hanging = em_client_for(None, app=em_app_with())
    started = time.monotonic()
    check = error(await hanging.get("/ready"), 503)["details"]["dependencies"]["epistemic_me"]
    assert time.monotonic() - started < 4
    assert check["ok"] is False and "did not answer" in check["error"]


async def test_one_client_per_context_closed_with_it(em_app_with, em_client_for, alice, em_key):
    app = em_app_with()
    ctx = app.state.ctx
    client = em_client_for(alice, app=app)
    await client.get("/getSelfModel", params={"user_id": uid(alice)})
    first = ctx.extras[EXTRAS_KEY]
    await client.get("/listBeliefs", params={"user_id": uid(alice)})
    await client.get("/ready")
    assert ctx.extras[EXTRAS_KEY] is first
    assert first.base_url and em_key not in repr(first)
    await ctx.aclose()
    assert first._http.is_closed
