"""Mirroring Epistemic Me into the profile store: idempotent by EM id (SPEC §6)."""
from __future__ import annotations

import asyncio
import uuid

from sqlalchemy import func, select

from clients.epistemic import EpistemicClient
from services import epistemic_mirror
from storage.models import Belief, BeliefSystem, Dialectic, DialecticInteraction, SelfModel
from tests.support.envelope import data


def uid(caller) -> str:
    return str(caller.user_id)


async def em_beliefs_in_profile(db, user_id) -> list[Belief]:
    async with db.transaction() as session:
        rows = await session.scalars(
            select(Belief).join(BeliefSystem, Belief.belief_system_id == BeliefSystem.id)
            .join(SelfModel, BeliefSystem.self_model_id == SelfModel.id)
            .where(SelfModel.user_id == uuid.UUID(str(user_id)),
                   BeliefSystem.name == epistemic_mirror.EM_SYSTEM)
            .order_by(Belief.created_at))
        return list(rows)


async def profile_dialectics(db, user_id) -> list[Dialectic]:
    async with db.transaction() as session:
        rows = await session.scalars(select(Dialectic).where(
            Dialectic.user_id == uuid.UUID(str(user_id))).order_by(Dialectic.started_at))
        return list(rows)


async def transcript_from_db(db, dialectic_id) -> list[dict]:
    async with db.transaction() as session:
        rows = await session.scalars(
            select(DialecticInteraction)
            .where(DialecticInteraction.dialectic_id == uuid.UUID(str(dialectic_id)))
            .order_by(DialecticInteraction.seq, DialecticInteraction.created_at))
        return [{"role": r.role, "content": r.content, "extra_json": r.extra_json} for r in rows]


async def interaction_count(db) -> int:
    async with db.transaction() as session:
        return await session.scalar(select(func.count()).select_from(DialecticInteraction))


def has_route(app, path: str) -> bool:
    return any(getattr(route, "path", None) == path for route in app.routes)


async def profile_transcript(alice, profile_app, db, dialectic_id) -> list[dict]:
    """Through the profile app's getDialectic when it exists, else from the database."""
    if has_route(profile_app, "/getDialectic"):
        body = data(await alice.client.get("/getDialectic", params={"dialectic_id": str(dialectic_id)}))
        items = body.get("interactions") or body.get("turns") or []
        return [{"role": i["role"], "content": i["content"], "extra_json": i.get("extra_json")}
                for i in items]
    return await transcript_from_db(db, dialectic_id)


# --- upstream state made behind our back (e.g. by another app of the same developer) ------

async def seed_upstream(em_sandbox, em_key, user_id: str) -> dict:
    async with EpistemicClient(em_sandbox.url, em_key, timeout=5) as client:
        await client.create_self_model(user_id)
        for text, kind in (("I sleep better without screens.", "STATEMENT"),
                           ("Running makes me happier.", "CAUSAL")):
            await client.create_belief(user_id, text, kind)
        dialectic = await client.create_dialectic(user_id, "DEFAULT")
        dialectic = await client.update_dialectic(dialectic.id, user_id,
                                                  "I feel best after long walks outside.")
        model = await client.get_self_model(user_id)
    return {"beliefs": model.belief_system.beliefs, "dialectic": dialectic}


async def test_sync_mirrors_everything_once(alice_em, alice, em_sandbox, em_key, profile_ctx):
    user_id = uid(alice)
    upstream = await seed_upstream(em_sandbox, em_key, user_id)
    assert len(upstream["beliefs"]) == 3  # two created + one extracted from the answer

    first = data(await alice_em.post("/syncSelfModelToProfile", json={"user_id": user_id}))
    assert first["belief_system_name"] == "epistemic_me"
    assert first["beliefs"] == {"seen": 3, "created": 3, "updated": 0, "unchanged": 0, "skipped": 0}
    assert first["dialectics"] == {"seen": 1, "created": 1, "updated": 0, "interactions_created": 3}

    second = data(await alice_em.post("/syncSelfModelToProfile", json={"user_id": user_id}))
    assert second["beliefs"] == {"seen": 3, "created": 0, "updated": 0, "unchanged": 3, "skipped": 0}
    assert second["dialectics"] == {"seen": 1, "created": 0, "updated": 0, "interactions_created": 0}
    assert second["profile_self_model_id"] == first["profile_self_model_id"]

    beliefs = await em_beliefs_in_profile(profile_ctx.db, user_id)
    assert sorted(b.external_id for b in beliefs) == sorted(b.id for b in upstream["beliefs"])
    assert {b.statement: (b.belief_type, b.confidence) for b in beliefs} == {
        "I sleep better without screens.": ("STATEMENT", 0.5),
        "Running makes me happier.": ("CAUSAL", 0.5),
        "I feel best after long walks outside.": ("STATEMENT", 0.5)}
    [dialectic] = await profile_dialectics(profile_ctx.db, user_id)
    assert dialectic.external_id == upstream["dialectic"].id
    assert dialectic.self_model_id == uuid.UUID(first["profile_self_model_id"])
    transcript = await transcript_from_db(profile_ctx.db, dialectic.id)
    assert [t["role"] for t in transcript] == ["question", "answer", "question"]
    assert transcript[1]["content"] == "I feel best after long walks outside."


async def test_concurrent_syncs_leave_one_copy(alice_em, alice, em_sandbox, em_key, profile_ctx):
    user_id = uid(alice)
    await seed_upstream(em_sandbox, em_key, user_id)
    responses = await asyncio.gather(*(alice_em.post("/syncSelfModelToProfile",
                                                     json={"user_id": user_id}) for _ in range(4)))
    for response in responses:
        data(response)
    assert len(await em_beliefs_in_profile(profile_ctx.db, user_id)) == 3
    [dialectic] = await profile_dialectics(profile_ctx.db, user_id)
    assert len(await transcript_from_db(profile_ctx.db, dialectic.id)) == 3


async def test_sync_keeps_given_confidence_and_adds_new_beliefs(alice_em, alice, em_sandbox, em_key,
                                                                 profile_ctx):
    user_id = uid(alice)
    data(await alice_em.post("/createSelfModel", json={"user_id": user_id}))
    mine = data(await alice_em.post("/updateBelief", json={
        "user_id": user_id, "statement": "Fasting sharpens my focus", "confidence": 0.9}))
    async with EpistemicClient(em_sandbox.url, em_key, timeout=5) as client:
        await client.create_belief(user_id, "Cold showers wake me up", "STATEMENT")
    report = data(await alice_em.post("/syncSelfModelToProfile", json={"user_id": user_id}))
    assert report["beliefs"] == {"seen": 2, "created": 1, "updated": 0, "unchanged": 1, "skipped": 0}
    beliefs = {b.statement: b for b in await em_beliefs_in_profile(profile_ctx.db, user_id)}
    assert beliefs["Fasting sharpens my focus"].confidence == 0.9
    assert beliefs["Fasting sharpens my focus"].id == uuid.UUID(mine["profile_belief"]["id"])
    assert beliefs["Cold showers wake me up"].confidence == 0.5


async def test_profile_get_self_model_shows_mirrored_beliefs(alice_em, alice, em_sandbox, em_key):
    user_id = uid(alice)
    await seed_upstream(em_sandbox, em_key, user_id)
    data(await alice_em.post("/syncSelfModelToProfile", json={"user_id": user_id}))
    data(await alice_em.post("/updateBelief", json={"user_id": user_id,
                                                    "statement": "Stretching helps my back"}))
    tree = data(await alice.client.get("/getSelfModel", params={"user_id": user_id}))
    systems = {s["name"]: s for s in tree["belief_systems"]}
    assert set(systems) == {"default", "epistemic_me"}
    assert systems["default"]["beliefs"] == []
    statements = [b["statement"] for b in systems["epistemic_me"]["beliefs"]]
    assert sorted(statements) == sorted([
        "I sleep better without screens.", "Running makes me happier.",
        "I feel best after long walks outside.", "Stretching helps my back"])
    assert all(b["external_id"].startswith("bl_") for b in systems["epistemic_me"]["beliefs"])


async def test_full_dialectic_of_three_answers_is_the_profile_transcript(
        alice_em, alice, profile_app, profile_ctx):
    user_id = uid(alice)
    data(await alice_em.post("/createSelfModel", json={"user_id": user_id}))
    dialectic = data(await alice_em.post("/createDialectic", json={
        "user_id": user_id, "dialectic_type": "SLEEP_DIET_EXERCISE"}))
    profile_id = dialectic["profile_dialectic_id"]
    questions = [dialectic["pending_question"]]
    answers = ["I need about eight hours of sleep to feel rested.",
               "Vegetables and enough protein make a healthy weekday diet.",
               "Thirty minutes of brisk walking a day keeps me fit."]
    for answer in answers:
        updated = data(await alice_em.post("/updateDialectic", json={
            "user_id": user_id, "dialectic_id": dialectic["id"], "answer": answer}))
        assert updated["profile_dialectic_id"] == profile_id
        questions.append(updated["pending_question"])
    assert len(set(questions)) == 4

    transcript = await profile_transcript(alice, profile_app, profile_ctx.db, profile_id)
    assert [(t["role"], t["content"]) for t in transcript] == [
        ("question", questions[0]), ("answer", answers[0]),
        ("question", questions[1]), ("answer", answers[1]),
        ("question", questions[2]), ("answer", answers[2]),
        ("question", questions[3])]
    em_ids = [t["extra_json"]["em_interaction_id"] for t in transcript]
    assert em_ids[0] == em_ids[1] and em_ids[2] == em_ids[3] and em_ids[4] == em_ids[5]
    assert len(set(em_ids)) == 4
    assert [t["extra_json"]["em_status"] for t in transcript] == [
        "ANSWERED", "ANSWERED", "ANSWERED", "ANSWERED", "ANSWERED", "ANSWERED", "PENDING_ANSWER"]
    assert transcript[1]["extra_json"]["extracted_beliefs"][0]["statement"] == answers[0]
    assert all(t["extra_json"]["source"] == "epistemic_me" for t in transcript)

    # Syncing afterwards adds nothing: the dialectic and every interaction exist once.
    before = await interaction_count(profile_ctx.db)
    report = data(await alice_em.post("/syncSelfModelToProfile", json={"user_id": user_id}))
    assert report["dialectics"] == {"seen": 1, "created": 0, "updated": 0, "interactions_created": 0}
    assert report["beliefs"]["created"] == 3  # the extracted beliefs arrive with the sync
    assert await interaction_count(profile_ctx.db) == before == 7
    assert len(await profile_dialectics(profile_ctx.db, user_id)) == 1


async def test_dry_run_mirrors_nothing(alice_em, alice, profile_ctx):
    user_id = uid(alice)
    data(await alice_em.post("/createSelfModel", json={"user_id": user_id}))
    dialectic = data(await alice_em.post("/createDialectic", json={"user_id": user_id}))
    preview = data(await alice_em.post("/updateDialectic", json={
        "user_id": user_id, "dialectic_id": dialectic["id"], "answer": "Just trying this out.",
        "dry_run": True}))
    assert len(preview["interactions"]) == 2
    transcript = await transcript_from_db(profile_ctx.db, dialectic["profile_dialectic_id"])
    assert [t["role"] for t in transcript] == ["question"]
    listed = data(await alice_em.get("/listDialectics", params={"user_id": user_id}))
    assert len(listed["items"][0]["interactions"]) == 1  # not stored upstream either


async def test_closed_profile_dialectic_refuses_answers_before_upstream(
        alice_em, alice, profile_app, profile_ctx, em_upstream):
    user_id = uid(alice)
    data(await alice_em.post("/createSelfModel", json={"user_id": user_id}))
    dialectic = data(await alice_em.post("/createDialectic", json={"user_id": user_id}))
    profile_id = dialectic["profile_dialectic_id"]
    if has_route(profile_app, "/closeDialectic"):
        data(await alice.client.post("/closeDialectic", json={"dialectic_id": profile_id}))
    else:
        async with profile_ctx.db.transaction() as session:
            (await session.get(Dialectic, uuid.UUID(profile_id))).closed = True
    await em_upstream.clear_requests()
    response = await alice_em.post("/updateDialectic", json={
        "user_id": user_id, "dialectic_id": dialectic["id"], "answer": "Too late for this."})
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "dialectic_closed"
    assert "POST /EpistemicMeService/UpdateDialectic" not in await em_upstream.requests()
    data(await alice_em.post("/syncSelfModelToProfile", json={"user_id": user_id}))
    assert [t["role"] for t in await transcript_from_db(profile_ctx.db, profile_id)] == ["question"]
