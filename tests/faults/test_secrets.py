"""Secrets never leak (issue 8, secrets): API tokens (valid and invalid) and Don't Die tokens
(linked, sent as X-DD-Token, invalid) do not appear in the logs, in any Redis key or value, in
any response body (error bodies included), or in any database column; the stored Don't Die
credential is ciphertext that does not contain the token."""
from __future__ import annotations

import io
import logging
import uuid

import httpx
from sqlalchemy import select

from core.logging import JsonFormatter
from services.tokens import cache_key, hash_token
from storage.models import Base, DDCredential
from tests.faults.conftest import err

# Transport libraries below our code log protocol frames at DEBUG; they are not our logs.
THIRD_PARTY_DEBUG = ("httpcore", "hpack", "h11", "aiosqlite", "asyncio", "urllib3", "asyncpg")


class _ProductRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.INFO or not record.name.startswith(THIRD_PARTY_DEBUG)


class LogCapture:
    """Every record that reaches the `sma` logger or the root logger, JSON-formatted."""

    def __init__(self):
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(JsonFormatter())
        self.handler.addFilter(_ProductRecords())
        self.handler.setLevel(logging.DEBUG)
        self._saved: list[tuple[logging.Logger, int]] = []

    def __enter__(self) -> "LogCapture":
        for logger in (logging.getLogger(), logging.getLogger("sma")):
            self._saved.append((logger, logger.level))
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc) -> None:
        for logger, level in self._saved:
            logger.removeHandler(self.handler)
            logger.setLevel(level)

    @property
    def text(self) -> str:
        return self.stream.getvalue()


async def _redis_dump(redis) -> str:
    """Every key and every value of the test Redis db, whatever its type."""
    parts: list[str] = []
    async for key in redis.scan_iter(count=500):
        parts.append(key)
        kind = await redis.type(key)
        if kind == "string":
            parts.append(str(await redis.get(key)))
        elif kind == "hash":
            for field, value in (await redis.hgetall(key)).items():
                parts += [field, value]
        elif kind == "list":
            parts += await redis.lrange(key, 0, -1)
        elif kind == "set":
            parts += list(await redis.smembers(key))
        elif kind == "zset":
            parts += await redis.zrange(key, 0, -1)
        elif kind == "stream":
            parts.append(repr(await redis.xrange(key)))
    return "\n".join(parts)


async def _database_dump(db) -> str:
    """Every value of every table (small: one test's rows)."""
    parts: list[str] = []
    async with db.transaction() as session:
        for table in Base.metadata.sorted_tables:
            for row in (await session.execute(select(table))).all():
                parts.append(f"{table.name}: " + " | ".join(map(str, row)))
    return "\n".join(parts)


async def test_no_token_or_dd_credential_leaks_anywhere(profile_app, profile_ctx, dontdie_app, alice,
                                                        redis, client_for, dd_sandbox):
    suffix = uuid.uuid4().hex
    linked_dd_token = f"sandbox-secret-{suffix}"
    header_dd_token = f"sandbox-secret-hdr-{suffix}"
    bogus_dd_token = f"bogus-secret-dd-{suffix}"
    invalid_api_tokens = ["sma_" + ("Q" * 11 + suffix)[:43], f"not-a-token-{suffix}"]
    secrets = {"alice API token": alice.token, "linked DD token": linked_dd_token,
               "X-DD-Token": header_dd_token, "invalid DD token": bogus_dd_token,
               **{f"invalid API token {i}": t for i, t in enumerate(invalid_api_tokens)}}

    bodies: list[str] = []

    async def keep_body(response: httpx.Response) -> None:
        await response.aread()
        bodies.append(f"{response.request.method} {response.request.url} {response.status_code} "
                      f"{response.headers!r} {response.text}")

    profile = alice.client
    dontdie = client_for(dontdie_app, alice)
    strangers = [client_for(profile_app, t) for t in invalid_api_tokens]
    strangers += [client_for(dontdie_app, t) for t in invalid_api_tokens]
    for client in (profile, dontdie, *strangers):
        client.event_hooks["response"].append(keep_body)
    uid = str(alice.user_id)
    headers = {"X-DD-Client-Id": "sma-faults", "X-DD-Token": header_dd_token}

    with LogCapture() as logs:
        # A valid API token, on both apps.
        assert (await profile.get("/getUser", params={"user_id": uid})).status_code in (200, 404)
        assert (await dontdie.get("/health")).status_code == 200
        # Invalid API tokens: 401, logged as such.
        for client in strangers:
            err(await client.get("/listUsers" if client in strangers[:2] else "/getAccount"), 401)
        # Link a sandbox Don't Die account (stored encrypted), then sync it (Redis UI cache).
        linked = await profile.post("/dd-data/link", json={
            "user_id": uid, "dd_token": linked_dd_token, "dd_client_id": "sma-faults"})
        assert linked.status_code == 200, linked.text
        synced = await profile.post(f"/dd-data/sync/{uid}", params={"force": "true"})
        assert synced.status_code == 200, synced.text
        assert (await profile.get("/dd-data/checklist-item-data",
                                  params={"user_id": uid})).status_code in (200, 404, 422)
        # Don't Die calls: through the linked account and with an explicit X-DD-Token.
        assert (await dontdie.get("/getAccount")).status_code == 200
        assert (await dontdie.get("/getAccount", headers=headers)).status_code == 200
        # A Don't Die token the upstream rejects (its 4xx is passed through).
        rejected = await dontdie.get("/getAccount", headers={**headers, "X-DD-Token": bogus_dd_token})
        assert 400 <= rejected.status_code < 500, rejected.text
        # Upstream errors: 5xx → 502, for both ways of naming the account, and a failed sync.
        httpx.post(f"{dd_sandbox.url}/_sandbox/faults", json={"path_prefix": "/", "fail_status": 500},
                   timeout=10).raise_for_status()
        err(await dontdie.get("/getAccount", headers=headers), 502)
        err(await dontdie.get("/getAccount"), 502)
        failed_sync = await profile.post(f"/dd-data/sync/{uid}", params={"force": "true"})
        assert failed_sync.status_code >= 400, failed_sync.text
        httpx.delete(f"{dd_sandbox.url}/_sandbox/faults", timeout=10)
        facade = profile_ctx.extras.get("dd_sync")
        if facade is not None:
            await facade.drain()

    log_text = logs.text
    assert '"route"' in log_text and "/getAccount" in log_text  # the capture did see requests
    assert '"status": 401' in log_text and '"status": 502' in log_text
    redis_text = await _redis_dump(redis)
    # The dumps really cover what they should: the token cache (by hash), the UI cache.
    assert cache_key(hash_token(alice.token)) in redis_text
    assert f"sma:dd:{uid}:items" in redis_text, redis_text[:2000]
    db_text = await _database_dump(profile_ctx.db)
    body_text = "\n".join(bodies)
    assert len(bodies) >= 10

    for name, secret in secrets.items():
        for where, text in (("logs", log_text), ("redis", redis_text),
                            ("response bodies", body_text), ("database", db_text)):
            assert secret not in text, f"{name} found in {where}"

    async with profile_ctx.db.transaction() as session:
        credential = await session.scalar(select(DDCredential).where(
            DDCredential.user_id == alice.user_id))
    assert credential is not None
    assert credential.token_ciphertext and credential.token_ciphertext != linked_dd_token
    assert linked_dd_token not in credential.token_ciphertext
    assert suffix not in credential.token_ciphertext  # not even the random part
    assert credential.token_ciphertext in db_text  # the database dump did include it
