"""User data rights: deleteUser removes everything of a user (rows, stored objects, cached data,
tokens); exportUserData returns everything of a user and nothing of anyone else. Both run
against the local object store and S3 (moto)."""
from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timezone

from sqlalchemy import select

from core.principal import TokenKind
from services import tokens
from storage.models import (ApiToken, Belief, BeliefSystem, ChecklistItem, Conversation,
                            DDCredential, DDSyncLog, DDUserData, Dialectic, DialecticInteraction,
                            Measurement, SelfModel, SimulationJob, Turn, User, UserFile)
from storage.objects import ObjectStoreUnavailable, user_prefix
from tests.support.actors import asgi_client, make_token

CSV = b"date,steps\n2024-05-01,8000\n2024-05-02,9100\n"


async def build_profile(caller, profile_ctx, upload, *, label: str) -> dict:
    """Through the API: self-model with a belief, a measurement, a file. Straight into the
    database: the rows whose routes live elsewhere (conversations, dialectics, jobs, Don't Die)."""
    uid = caller.user_id
    r = await caller.client.post("/upsertSelfModel", json={"user_id": str(uid)})
    assert r.status_code == 200, r.text
    r = await caller.client.post("/upsertBelief", json={
        "user_id": str(uid), "statement": f"{label}: sleep matters", "confidence": 0.8})
    assert r.status_code == 201, r.text
    belief_id = r.json()["data"]["id"]
    r = await caller.client.post("/upsertMeasurement", json={
        "user_id": str(uid), "type": "weight", "value": 80.5, "unit": "kg",
        "captured_at": "2024-05-01T07:00:00+02:00"})
    assert r.status_code == 200, r.text
    measurement_id = r.json()["data"]["id"]
    content = CSV + label.encode() + b",1\n"
    r = await upload(caller, uid, content, f"{label}.csv", "text/csv")
    assert r.status_code == 201, r.text
    file = r.json()["data"]
    assert file["sha256"] == hashlib.sha256(content).hexdigest()

    async with profile_ctx.db.transaction() as session:
        conversation = Conversation(user_id=uid, meta={"label": label})
        session.add(conversation)
        await session.flush()
        session.add_all([Turn(conversation_id=conversation.id, seq=0, role="user", content=f"{label} hi"),
                         Turn(conversation_id=conversation.id, seq=1, role="assistant", content="hello")])
        dialectic = Dialectic(user_id=uid, learning_objective={"description": label},
                              conversation_id=conversation.id)
        session.add(dialectic)
        await session.flush()
        session.add(DialecticInteraction(dialectic_id=dialectic.id, role="question",
                                         content=f"{label}: how do you sleep?"))
        session.add(ChecklistItem(user_id=uid, bucket_code="demographics", status="completed",
                                  data_ref={"label": label}))
        job = SimulationJob(user_id=uid, template="health_assessment", config={"max_turns": 2})
        session.add(job)
        session.add(DDUserData(user_id=uid, dontdie_uid=f"dd-{label}", sync_status="success",
                               measurements={"items": [{"label": label}]}, dd_scores={"2024-05-01": 71}))
        session.add(DDSyncLog(user_id=uid, sync_type="full", status="success", records_synced=3))
        session.add(DDCredential(user_id=uid, dontdie_uid=f"dd-{label}", client_id="client",
                                 token_ciphertext=f"SECRET-{label}"))
        await session.flush()
        ids = {"conversation": conversation.id, "dialectic": dialectic.id, "job": job.id}
    return {"belief": belief_id, "measurement": measurement_id, "file": file, **ids}


# ----------------------------------------------------------------------------- deleteUser

async def test_delete_user_removes_everything(alice, bob, profile_ctx, profile_app, redis, upload,
                                              count_rows):
    made = await build_profile(alice, profile_ctx, upload, label="alice")
    await build_profile(bob, profile_ctx, upload, label="bob")
    extra_token, extra_token_id = await make_token(profile_ctx.db, TokenKind.user, alice.user_id,
                                                   name="phone")
    phone = asgi_client(profile_app, extra_token)
    r = await phone.get("/getUser", params={"user_id": str(alice.user_id)})
    assert r.status_code == 200, r.text

    # Cached data of both users; alice's goes, bob's stays.
    alice_keys = [f"sma:trend:{alice.user_id}:weight:7", f"sma:dd:{alice.user_id}:status"]
    bob_keys = [f"sma:trend:{bob.user_id}:weight:7", f"sma:dd:{bob.user_id}:status"]
    for key in alice_keys + bob_keys:
        await redis.set(key, "{}")
    async with profile_ctx.db.transaction() as session:
        hashes = list(await session.scalars(
            select(ApiToken.token_hash).where(ApiToken.user_id == alice.user_id)))
    assert len(hashes) == 2
    assert all([await redis.exists(tokens.cache_key(h)) for h in hashes])  # principals cached

    objects = profile_ctx.objects
    assert await objects.list_keys(user_prefix(alice.user_id)) != []

    r = await alice.client.delete("/deleteUser", params={"user_id": str(alice.user_id)})
    assert r.status_code == 204, r.text
    assert r.content == b""

    # Rows: every table, by the user and through their parents.
    uid = alice.user_id
    for model, condition in [
        (User, User.id == uid), (SelfModel, SelfModel.user_id == uid),
        (Belief, Belief.id == uuid.UUID(made["belief"])), (Measurement, Measurement.user_id == uid),
        (UserFile, UserFile.user_id == uid), (ChecklistItem, ChecklistItem.user_id == uid),
        (Conversation, Conversation.user_id == uid),
        (Turn, Turn.conversation_id == made["conversation"]),
        (Dialectic, Dialectic.user_id == uid),
        (DialecticInteraction, DialecticInteraction.dialectic_id == made["dialectic"]),
        (SimulationJob, SimulationJob.user_id == uid), (DDUserData, DDUserData.user_id == uid),
        (DDSyncLog, DDSyncLog.user_id == uid), (DDCredential, DDCredential.user_id == uid),
        (ApiToken, ApiToken.user_id == uid),
    ]:
        assert await count_rows(model, condition) == 0, model.__tablename__
    assert await count_rows(BeliefSystem) == 1  # bob's default system only
    # Objects, cached data and cached principals.
    assert await objects.list_keys(user_prefix(uid)) == []
    for key in alice_keys:
        assert not await redis.exists(key)
    for h in hashes:
        assert not await redis.exists(tokens.cache_key(h))
    # Both of alice's tokens are dead.
    for client in (alice.client, phone):
        r = await client.get("/getUser", params={"user_id": str(uid)})
        assert r.status_code == 401, r.text
    await phone.aclose()

    # Bob is untouched.
    for key in bob_keys:
        assert await redis.exists(key)
    assert await count_rows(Measurement, Measurement.user_id == bob.user_id) == 1
    assert await count_rows(Conversation, Conversation.user_id == bob.user_id) == 1
    assert len(await objects.list_keys(user_prefix(bob.user_id))) == 1
    r = await bob.client.get("/listUserFiles", params={"user_id": str(bob.user_id)})
    assert r.json()["data"]["total"] == 1


async def test_delete_user_authorization(alice, bob, service, admin, anonymous, profile_ctx,
                                         upload, count_rows):
    r = await upload(alice, alice.user_id, CSV, "a.csv", "text/csv")
    assert r.status_code == 201
    r = await service.client.delete("/deleteUser", params={"user_id": str(alice.user_id)})
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "forbidden"
    r = await bob.client.delete("/deleteUser", params={"user_id": str(alice.user_id)})
    assert r.status_code == 403, r.text
    r = await anonymous.delete("/deleteUser", params={"user_id": str(alice.user_id)})
    assert r.status_code == 401, r.text
    r = await admin.client.delete("/deleteUser", params={"user_id": "not-a-uuid"})
    assert r.status_code == 422, r.text
    r = await admin.client.delete("/deleteUser", params={"user_id": str(uuid.uuid4())})
    assert r.status_code == 404, r.text
    assert await count_rows(User, User.id == alice.user_id) == 1
    assert len(await profile_ctx.objects.list_keys(user_prefix(alice.user_id))) == 1

    r = await admin.client.delete("/deleteUser", params={"user_id": str(alice.user_id)})
    assert r.status_code == 204, r.text
    assert await count_rows(User, User.id == alice.user_id) == 0
    assert await profile_ctx.objects.list_keys(user_prefix(alice.user_id)) == []
    r = await admin.client.delete("/deleteUser", params={"user_id": str(alice.user_id)})
    assert r.status_code == 404, r.text
    # The admin's own token is unaffected.
    r = await admin.client.get("/getUser", params={"user_id": str(bob.user_id)})
    assert r.status_code == 200, r.text


async def test_delete_user_is_retryable_when_the_object_store_fails(alice, profile_ctx, upload,
                                                                   count_rows, monkeypatch):
    r = await upload(alice, alice.user_id, CSV, "a.csv", "text/csv")
    assert r.status_code == 201
    objects = profile_ctx.objects

    async def down(_prefix):
        raise ObjectStoreUnavailable()

    monkeypatch.setattr(objects, "delete_prefix", down)
    r = await alice.client.delete("/deleteUser", params={"user_id": str(alice.user_id)})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "object_store_unavailable"
    # Nothing was committed: the user, their file row and their token still work.
    assert await count_rows(User, User.id == alice.user_id) == 1
    assert await count_rows(UserFile, UserFile.user_id == alice.user_id) == 1
    monkeypatch.undo()

    r = await alice.client.delete("/deleteUser", params={"user_id": str(alice.user_id)})
    assert r.status_code == 204, r.text
    assert await count_rows(User, User.id == alice.user_id) == 0
    assert await objects.list_keys(user_prefix(alice.user_id)) == []


# ----------------------------------------------------------------------------- exportUserData

async def test_export_contains_everything_of_the_user_and_nothing_else(alice, bob, profile_ctx,
                                                                       upload):
    made = await build_profile(alice, profile_ctx, upload, label="alice")
    theirs = await build_profile(bob, profile_ctx, upload, label="bob")

    r = await alice.client.get("/exportUserData", params={"user_id": str(alice.user_id)})
    assert r.status_code == 200, r.text
    doc = r.json()["data"]
    assert doc["format_version"] == 1
    assert datetime.fromisoformat(doc["exported_at"]).tzinfo is not None
    assert doc["user"]["id"] == str(alice.user_id)

    systems = doc["self_model"]["belief_systems"]
    assert [s["name"] for s in systems] == ["default"]
    assert [b["id"] for b in systems[0]["beliefs"]] == [made["belief"]]
    assert systems[0]["beliefs"][0]["statement"] == "alice: sleep matters"

    assert [m["id"] for m in doc["measurements"]] == [made["measurement"]]
    assert doc["measurements"][0]["value"] == 80.5
    assert datetime.fromisoformat(doc["measurements"][0]["captured_at"]) == \
        datetime(2024, 5, 1, 5, tzinfo=timezone.utc)

    [file] = doc["files"]
    assert file["id"] == made["file"]["id"]
    assert file["sha256"] == made["file"]["sha256"]
    assert file["size_bytes"] == made["file"]["size_bytes"]
    assert file["mime"] == "text/csv" and file["filename"] == "alice.csv"
    assert "s3_key" not in file

    [conversation] = doc["conversations"]
    assert conversation["id"] == str(made["conversation"])
    assert [t["content"] for t in conversation["turns"]] == ["alice hi", "hello"]
    [dialectic] = doc["dialectics"]
    assert dialectic["id"] == str(made["dialectic"])
    assert [i["content"] for i in dialectic["interactions"]] == ["alice: how do you sleep?"]
    assert [c["bucket_code"] for c in doc["checklist_items"]] == ["demographics"]
    assert [j["id"] for j in doc["simulation_jobs"]] == [str(made["job"])]
    assert doc["dd_user_data"]["dontdie_uid"] == "dd-alice"
    assert doc["dd_user_data"]["dd_scores"] == {"2024-05-01": 71}
    assert [e["records_synced"] for e in doc["dd_sync_log"]] == [3]
    assert doc["dd_credential"]["dontdie_uid"] == "dd-alice"
    assert [t["id"] for t in doc["api_tokens"]] == [str(alice.token_id)]
    assert doc["api_tokens"][0]["kind"] == "user"

    text = json.dumps(doc)
    # No secrets...
    assert "token_hash" not in text and "token_ciphertext" not in text
    assert "SECRET-" not in text and alice.token not in text
    # ...and nothing of bob's.
    for foreign in (str(bob.user_id), theirs["belief"], theirs["measurement"],
                    theirs["file"]["id"], theirs["file"]["sha256"], str(theirs["conversation"]),
                    str(theirs["dialectic"]), str(theirs["job"]), "dd-bob", "bob"):
        assert foreign not in text, foreign


async def test_export_of_a_new_user_and_authorization(alice, bob, service, admin, anonymous):
    r = await alice.client.get("/exportUserData", params={"user_id": str(alice.user_id)})
    assert r.status_code == 200, r.text
    doc = r.json()["data"]
    assert doc["self_model"] is None and doc["dd_user_data"] is None
    assert doc["dd_credential"] is None
    for key in ("measurements", "files", "checklist_items", "conversations", "dialectics",
                "simulation_jobs", "dd_sync_log"):
        assert doc[key] == [], key

    r = await service.client.get("/exportUserData", params={"user_id": str(alice.user_id)})
    assert r.status_code == 200 and r.json()["data"]["user"]["id"] == str(alice.user_id)
    r = await bob.client.get("/exportUserData", params={"user_id": str(alice.user_id)})
    assert r.status_code == 403, r.text
    r = await anonymous.get("/exportUserData", params={"user_id": str(alice.user_id)})
    assert r.status_code == 401, r.text
    r = await service.client.get("/exportUserData", params={"user_id": "x"})
    assert r.status_code == 422, r.text
    r = await service.client.get("/exportUserData", params={"user_id": str(uuid.uuid4())})
    assert r.status_code == 404, r.text
