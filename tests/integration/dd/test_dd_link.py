"""Linking a user's own Don't Die account: verified upstream, encrypted at rest, never leaked."""
from __future__ import annotations

import logging
import uuid

from cryptography.fernet import Fernet
from pydantic import SecretStr
from sqlalchemy import select, text

from api.context import AppContext
from api.profile_app import build_profile_app
from core.principal import TokenKind
from storage.models import DDCredential, DDUserData, User
from tests.support.dd import CLIENT_ID, CREDENTIAL_KEY, dd_uid, new_dd_token
from tests.support.actors import make_caller


async def test_link_verifies_upstream_and_stores_the_token_encrypted(alice, link, profile_ctx, caplog):
    caplog.set_level(logging.DEBUG)
    response, token = await link(alice)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["dontdie_uid"] == dd_uid(token)
    assert data["user_id"] == str(alice.user_id)
    assert data["client_id"] == CLIENT_ID and data["linked"] is True
    assert token not in response.text

    async with profile_ctx.db.transaction() as session:
        user = await session.get(User, alice.user_id)
        assert user.dontdie_uid == dd_uid(token)
        raw = (await session.execute(text(
            "SELECT token_ciphertext, client_id FROM dd_credential WHERE dontdie_uid = :uid"),
            {"uid": dd_uid(token)})).one()
    assert token not in raw.token_ciphertext
    assert Fernet(CREDENTIAL_KEY.encode()).decrypt(raw.token_ciphertext.encode()).decode() == token
    assert raw.client_id == CLIENT_ID
    assert token not in caplog.text


async def test_the_token_never_reaches_redis(alice, link, redis):
    response, token = await link(alice)
    assert response.status_code == 200
    sync = await alice.client.post(f"/dd-data/sync/{alice.user_id}")
    assert sync.status_code == 200, sync.text
    keys = [k async for k in redis.scan_iter(match="*")]
    assert keys
    for key in keys:
        assert token not in key
        kind = await redis.type(key)
        value = await redis.get(key) if kind == "string" else (
            str(await redis.hgetall(key)) if kind == "hash" else "")
        assert token not in (value or "")


async def test_relinking_the_same_account_updates_the_credential(alice, link, count_rows):
    token = new_dd_token()
    first, _ = await link(alice, token=token)
    again, _ = await link(alice, token=token, client_id="other-client")
    assert first.status_code == again.status_code == 200
    assert again.json()["data"]["client_id"] == "other-client"
    assert again.json()["data"]["replaced_account"] is False
    assert await count_rows(DDCredential, DDCredential.user_id == alice.user_id) == 1


async def test_linking_another_account_drops_the_old_accounts_data(alice, link, profile_ctx):
    first, _ = await link(alice)
    assert (await alice.client.post(f"/dd-data/sync/{alice.user_id}")).status_code == 200
    second, token = await link(alice)
    assert second.status_code == 200
    assert second.json()["data"]["replaced_account"] is True
    async with profile_ctx.db.transaction() as session:
        assert await session.scalar(select(DDUserData).where(DDUserData.user_id == alice.user_id)) is None
    status = await alice.client.get(f"/dd-data/status/{alice.user_id}")
    assert status.json()["data"]["sync_status"] == "not_synced"
    # the throttle does not carry over to the new account: the next sync fetches
    synced = await alice.client.post(f"/dd-data/sync/{alice.user_id}")
    assert synced.json()["data"]["refreshed"] is True


async def test_one_dontdie_account_cannot_be_linked_to_two_users(alice, bob, link):
    token = new_dd_token()
    assert (await link(alice, token=token))[0].status_code == 200
    response, _ = await link(bob, token=token)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"
    assert str(alice.user_id) not in response.text


async def test_rejected_credentials_are_a_validation_error(alice, link):
    response, _ = await link(alice, token="not-a-sandbox-token")
    assert response.status_code == 422
    body = response.json()
    assert "rejected" in body["error"]["message"]
    assert "not-a-sandbox-token" not in response.text


async def test_link_auth_and_validation(alice, bob, service, anonymous, link):
    assert (await anonymous.post("/dd-data/link", json={
        "user_id": str(alice.user_id), "dd_token": new_dd_token(), "dd_client_id": "c"})).status_code == 401
    forbidden, _ = await link(alice, user_id=bob.user_id)
    assert forbidden.status_code == 403
    missing, _ = await link(service, user_id=uuid.uuid4())
    assert missing.status_code == 404
    by_service, _ = await link(service, user_id=alice.user_id)
    assert by_service.status_code == 200
    for body in ({"user_id": str(alice.user_id), "dd_client_id": "c"},
                 {"user_id": str(alice.user_id), "dd_token": "", "dd_client_id": "c"},
                 {"user_id": "not-a-uuid", "dd_token": "sandbox-x", "dd_client_id": "c"},
                 {"user_id": str(alice.user_id), "dd_token": "sandbox-x", "dd_client_id": "c",
                  "extra": 1}):
        response = await alice.client.post("/dd-data/link", json=body)
        assert response.status_code == 422, body
        assert "sandbox-x" not in response.text


async def test_link_without_a_credential_key_is_503_naming_the_setting(settings, profile_ctx, link):
    ctx = AppContext.from_settings("profile", settings.model_copy(update={"credential_key": SecretStr("")}))
    app = build_profile_app(ctx.settings, ctx=ctx)
    caller = await make_caller(ctx.db, app, TokenKind.user)
    try:
        response, _ = await link(caller)
        assert response.status_code == 503
        assert "SMA_CREDENTIAL_KEY" in response.json()["error"]["message"]
    finally:
        await caller.client.aclose()
        await ctx.aclose()


async def test_unlink_removes_credential_data_and_cache(alice, bob, link, redis, count_rows):
    await link(alice)
    assert (await alice.client.post(f"/dd-data/sync/{alice.user_id}")).status_code == 200
    assert [k async for k in redis.scan_iter(match=f"sma:dd:{alice.user_id}:*")]

    assert (await bob.client.delete("/dd-data/link", params={"user_id": str(alice.user_id)})).status_code == 403
    response = await alice.client.delete("/dd-data/link", params={"user_id": str(alice.user_id)})
    assert response.status_code == 200, response.text
    assert response.json()["data"]["linked"] is False
    assert await count_rows(DDCredential, DDCredential.user_id == alice.user_id) == 0
    assert await count_rows(DDUserData, DDUserData.user_id == alice.user_id) == 0
    assert [k async for k in redis.scan_iter(match=f"sma:dd:{alice.user_id}:*")] == []
    again = await alice.client.delete("/dd-data/link", params={"user_id": str(alice.user_id)})
    assert again.status_code == 404
    sync = await alice.client.post(f"/dd-data/sync/{alice.user_id}")
    assert sync.status_code == 409
