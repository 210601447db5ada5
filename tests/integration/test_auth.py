"""Authentication, token lifecycle, and the HTTP conventions every app shares (SPEC §2, §3)."""
from __future__ import annotations

import asyncio
import hashlib
import uuid
from contextlib import asynccontextmanager
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from api.profile_app import build_profile_app
from core.errors import Unauthorized
from core.principal import TokenKind
from services import tokens
from services.tokens import cache_key, hash_token
from storage.models import ApiToken
from storage.types import utcnow
from tests.support.actors import asgi_client, make_token, make_user


def err(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == "error" and body["request_id"]
    return body["error"]


async def test_health_needs_no_token_and_ready_reports_dependencies(anonymous):
    assert (await anonymous.get("/health")).json()["data"]["alive"] is True
    ready = await anonymous.get("/ready")
    assert ready.status_code == 200
    deps = ready.json()["data"]["dependencies"]
    assert deps["database"]["ok"] and deps["redis"]["ok"] and deps["object_store"]["ok"]
    assert (await anonymous.get("/openapi.json")).status_code == 200
    assert (await anonymous.get("/docs")).status_code == 200


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic abc", "bearer", "Token x"])
async def test_missing_or_malformed_authorization_is_401(profile_app, header):
    headers = {"Authorization": header} if header is not None else {}
    async with asgi_client(profile_app) as client:
        response = await client.get("/listUsers", headers=headers)
    assert err(response, 401)["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


async def test_unknown_and_overlong_tokens_are_401(profile_app):
    for token in ("sma_" + "x" * 43, "y" * 600):
        async with asgi_client(profile_app, token) as client:
            err(await client.get("/listUsers"), 401)


async def test_revocation_takes_effect_at_once_even_when_cached(admin, service, redis):
    assert (await service.client.get("/listUsers")).status_code == 200
    assert await redis.exists(cache_key(hash_token(service.token)))
    revoked = await admin.client.post(f"/admin/tokens/{service.token_id}/revoke")
    assert revoked.status_code == 200 and revoked.json()["data"]["revoked_at"]
    assert not await redis.exists(cache_key(hash_token(service.token)))
    err(await service.client.get("/listUsers"), 401)


async def test_a_token_revoked_while_a_request_resolves_it_is_not_cached_again(profile_ctx, redis):
    """The race: a request reads the still-valid row, the revocation commits and evicts, then
    the request caches what it read. The cache must not bring the revoked token back."""
    db = profile_ctx.db
    token, token_id = await make_token(db, TokenKind.user, await make_user(db))

    @asynccontextmanager
    async def revoked_right_after_the_read():
        async with db.sessions() as session:
            yield session
        async with db.transaction() as other:
            await tokens.revoke_token(other, redis, token_id)

    principal = await tokens.resolve(revoked_right_after_the_read, redis, token)
    assert principal.token_id == token_id  # valid when it was read
    assert not await redis.exists(cache_key(hash_token(token)))
    with pytest.raises(Unauthorized):
        await tokens.resolve(db.sessions, redis, token)


async def test_expired_token_is_401(profile_ctx, profile_app):
    token, token_id = await make_token(profile_ctx.db, TokenKind.service, expires_in=timedelta(hours=1))
    async with asgi_client(profile_app, token) as client:
        assert (await client.get("/listUsers")).status_code == 200  # now cached
        async with profile_ctx.db.transaction() as session:
            await session.execute(update(ApiToken).where(ApiToken.id == token_id)
                                  .values(expires_at=utcnow() - timedelta(seconds=1)))
        # The cached entry carries the expiry too, so it is refused without a DB lookup.
        cached = await profile_ctx.redis.get(cache_key(hash_token(token)))
        assert cached is not None
        await profile_ctx.redis.delete(cache_key(hash_token(token)))
        err(await client.get("/listUsers"), 401)


async def test_cached_entry_expires_with_the_token(profile_ctx, profile_app):
    token, _ = await make_token(profile_ctx.db, TokenKind.service, expires_in=timedelta(seconds=30))
    async with asgi_client(profile_app, token) as client:
        assert (await client.get("/listUsers")).status_code == 200
    ttl = await profile_ctx.redis.ttl(cache_key(hash_token(token)))
    assert 0 < ttl <= 30


async def test_tokens_are_stored_and_cached_only_as_hashes(profile_ctx, service, redis):
    assert (await service.client.get("/listUsers")).status_code == 200
    keys = [k async for k in redis.scan_iter("*")]
    assert keys and not any(service.token in k for k in keys)
    for key in keys:
        value = await redis.get(key) if await redis.type(key) == "string" else ""
        assert service.token not in (value or "")
    async with profile_ctx.db.transaction() as session:
        row = await session.get(ApiToken, service.token_id)
    assert row.token_hash == hashlib.sha256(service.token.encode()).hexdigest()
    assert row.last_used_at is not None


async def test_admin_token_routes(admin, service, alice, profile_app):
    created = await admin.client.post("/admin/tokens", json={
        "kind": "user", "user_id": str(alice.user_id), "name": "alice phone", "expires_in_days": 30})
    assert created.status_code == 201
    issued = created.json()["data"]
    assert issued["token"].startswith("sma_") and issued["kind"] == "user"
    async with asgi_client(profile_app, issued["token"]) as client:
        me = await client.get("/getUser", params={"user_id": str(alice.user_id)})
        assert me.status_code == 200
    listing = (await admin.client.get("/admin/tokens")).json()["data"]
    assert issued["id"] in [t["id"] for t in listing["items"]]
    assert all("token" not in t and "token_hash" not in t for t in listing["items"])
    err(await service.client.get("/admin/tokens"), 403)
    err(await alice.client.post("/admin/tokens", json={"kind": "admin"}), 403)
    err(await admin.client.post(f"/admin/tokens/{uuid.uuid4()}/revoke"), 404)
    err(await admin.client.post("/admin/tokens/not-a-uuid/revoke"), 422)
    err(await admin.client.post("/admin/tokens", json={"kind": "user"}), 422)
    err(await admin.client.post("/admin/tokens", json={"kind": "service", "user_id": str(alice.user_id)}), 422)
    err(await admin.client.post("/admin/tokens", json={"kind": "root"}), 422)
    err(await admin.client.post("/admin/tokens", json={"kind": "user", "user_id": str(uuid.uuid4())}), 404)


async def test_request_id_is_echoed_or_generated(anonymous):
    given = await anonymous.get("/health", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    generated = await anonymous.get("/health")
    assert len(generated.headers["x-request-id"]) >= 16
    unsafe = await anonymous.get("/health", headers={"X-Request-ID": "bad id\twith spaces"})
    assert unsafe.headers["x-request-id"] != "bad id\twith spaces"
    failure = await anonymous.get("/listUsers", headers={"X-Request-ID": "req-9"})
    assert failure.json()["request_id"] == "req-9"


async def test_unknown_route_and_method_use_the_envelope(alice):
    assert err(await alice.client.get("/noSuchRoute"), 404)["code"] == "not_found"
    assert err(await alice.client.put("/getUser"), 405)["code"] == "method_not_allowed"


async def test_bodies_over_one_mebibyte_are_413(alice):
    big = {"user_id": str(alice.user_id), "statement": "x" * (1024 * 1024 + 10), "confidence": 0.5}
    response = await alice.client.post("/upsertBelief", json=big)
    assert err(response, 413)["code"] == "payload_too_large"


async def test_malformed_json_is_422_with_details(alice):
    response = await alice.client.post("/upsertBelief", content=b"{not json",
                                       headers={"Content-Type": "application/json"})
    details = err(response, 422)["details"]
    assert details and details[0]["loc"][0] == "body"


async def test_rate_limit_per_token_with_headers(profile_ctx, settings):
    limited = settings.model_copy(update={"rate_limit_per_minute": 3})
    profile_ctx.settings = limited
    app = build_profile_app(limited, ctx=profile_ctx)
    user_id = await make_user(profile_ctx.db)
    token, _ = await make_token(profile_ctx.db, TokenKind.user, user_id)
    other, _ = await make_token(profile_ctx.db, TokenKind.service)
    async with asgi_client(app, token) as client, asgi_client(app, other) as other_client:
        responses = [await client.get("/getUser", params={"user_id": str(user_id)}) for _ in range(4)]
        assert [r.status_code for r in responses] == [200, 200, 200, 429]
        assert responses[0].headers["x-ratelimit-limit"] == "3"
        assert responses[0].headers["x-ratelimit-remaining"] == "2"
        assert int(responses[0].headers["x-ratelimit-reset"]) > 0
        assert err(responses[3], 429)["code"] == "rate_limited"
        assert 1 <= int(responses[3].headers["retry-after"]) <= 60
        # Another token has its own budget.
        assert (await other_client.get("/listUsers")).status_code == 200


async def test_redis_outage_is_503_not_500(profile_ctx, profile_app, alice):
    await profile_ctx.redis.aclose()
    from storage.redis import make_redis
    profile_ctx.redis = make_redis("redis://127.0.0.1:1/0")
    response = await alice.client.get("/getUser", params={"user_id": str(alice.user_id)})
    assert err(response, 503)["code"] == "redis_unavailable"
    ready = await alice.client.get("/ready")
    assert ready.status_code == 503
    deps = ready.json()["error"]["details"]["dependencies"]
    assert deps["redis"]["ok"] is False and deps["database"]["ok"] is True


async def test_concurrent_first_use_of_a_token(profile_ctx, profile_app):
    token, _ = await make_token(profile_ctx.db, TokenKind.service)
    async with asgi_client(profile_app, token) as client:
        results = await asyncio.gather(*(client.get("/listUsers") for _ in range(10)))
    assert {r.status_code for r in results} == {200}
