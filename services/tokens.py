"""API tokens: issue, resolve (Redis-cached by hash), list, revoke."""
from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from redis.asyncio import Redis
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import NotFound, Unauthorized, ValidationFailed
from core.principal import Principal, TokenKind
from storage.models import ApiToken, User
from storage.redis import REDIS_ERRORS
from storage.types import utcnow

TOKEN_PREFIX = "sma_"
MAX_CACHE_SECONDS = 24 * 3600
# How long a revoked token's hash stays marked in Redis: longer than any request can take
# between reading the token row and caching it.
REVOKED_MARK_SECONDS = 600

# Cache a resolved token unless it was revoked meanwhile, in one atomic step: a request that
# read the row just before a revocation committed must not put the token back in the cache.
_CACHE_UNLESS_REVOKED = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
end
return false
"""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def cache_key(token_hash: str) -> str:
    return f"sma:auth:{token_hash}"


def revoked_key(token_hash: str) -> str:
    return f"sma:auth-revoked:{token_hash}"


@dataclass
class IssuedToken:
    token: str
    record: ApiToken


async def issue_token(session: AsyncSession, kind: TokenKind, *, user_id: uuid.UUID | None = None,
                      name: str = "", expires_in: timedelta | None = None) -> IssuedToken:
    if kind == TokenKind.user and user_id is None:
        raise ValidationFailed("A user token needs a user_id")
    if kind != TokenKind.user and user_id is not None:
        raise ValidationFailed("Only user tokens belong to a user")
    if user_id is not None and await session.get(User, user_id) is None:
        raise NotFound("Unknown user")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    record = ApiToken(token_hash=hash_token(token), kind=kind.value, user_id=user_id, name=name,
                      expires_at=utcnow() + expires_in if expires_in else None)
    session.add(record)
    await session.flush()
    return IssuedToken(token, record)


async def list_tokens(session: AsyncSession, *, limit: int = 50, offset: int = 0) -> tuple[list[ApiToken], int]:
    total = await session.scalar(select(func.count()).select_from(ApiToken))
    rows = await session.scalars(
        select(ApiToken).order_by(ApiToken.created_at.desc()).limit(limit).offset(offset))
    return list(rows), total or 0


async def revoke_token(session: AsyncSession, redis: Redis | None, token_id: uuid.UUID) -> ApiToken:
    record = await session.get(ApiToken, token_id)
    if record is None:
        raise NotFound("Unknown token")
    if record.revoked_at is None:
        record.revoked_at = utcnow()
    await evict(redis, [record.token_hash])
    return record


async def evict(redis: Redis | None, token_hashes: list[str]) -> None:
    """Drop revoked tokens from the cache and mark them, so that no request re-caches them."""
    if redis is None or not token_hashes:
        return
    pipe = redis.pipeline(transaction=True)
    for token_hash in token_hashes:
        pipe.set(revoked_key(token_hash), "1", ex=REVOKED_MARK_SECONDS)
    pipe.delete(*(cache_key(h) for h in token_hashes))
    await pipe.execute()


def _principal_from(record: ApiToken) -> Principal:
    return Principal(token_id=record.id, kind=TokenKind(record.kind), user_id=record.user_id)


async def resolve(session_factory, redis: Redis, token: str, *,
                  cache_seconds: int = MAX_CACHE_SECONDS) -> Principal:
    """Bearer token → principal. Redis-cached under the token's hash, never the token itself."""
    token_hash = hash_token(token)
    key = cache_key(token_hash)
    cached = await redis.get(key)
    if cached:
        data = json.loads(cached)
        expires_at = data.get("expires_at")
        if expires_at and datetime.fromisoformat(expires_at) <= utcnow():
            await redis.delete(key)
            raise Unauthorized("Token expired")
        return Principal(token_id=uuid.UUID(data["id"]), kind=TokenKind(data["kind"]),
                         user_id=uuid.UUID(data["user_id"]) if data["user_id"] else None)

    async with session_factory() as session:
        record = await session.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash))
        if record is None or record.revoked_at is not None:
            raise Unauthorized("Invalid or revoked token")
        now = utcnow()
        if record.expires_at is not None and record.expires_at <= now:
            raise Unauthorized("Token expired")
        await session.execute(update(ApiToken).where(ApiToken.id == record.id).values(last_used_at=now))
        await session.commit()

    ttl = min(cache_seconds, MAX_CACHE_SECONDS)
    if record.expires_at is not None:
        ttl = min(ttl, int((record.expires_at - now).total_seconds()))
    if ttl > 0:
        payload = {"id": str(record.id), "kind": record.kind,
                   "user_id": str(record.user_id) if record.user_id else None,
                   "expires_at": record.expires_at.isoformat() if record.expires_at else None}
        try:
            await redis.eval(_CACHE_UNLESS_REVOKED, 2, key, revoked_key(token_hash),
                             json.dumps(payload), ttl)
        except REDIS_ERRORS:
            pass
    return _principal_from(record)
