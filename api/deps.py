"""FastAPI dependencies: the app context, a transaction, and the authenticated principal."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from api.context import AppContext
from core.errors import RateLimited, Unauthorized
from core.principal import Principal, TokenKind
from core.request_context import principal_kind_var
from services import tokens


# Dependencies are `async def` even when they do no I/O: FastAPI runs a plain `def`
# dependency in a worker thread, a thread hop per request on every route.
async def get_ctx(request: Request) -> AppContext:
    return request.app.state.ctx


Ctx = Annotated[AppContext, Depends(get_ctx)]


async def _session(ctx: Ctx) -> AsyncIterator[AsyncSession]:
    # scope="function": the commit happens before the response is sent, so a failed commit
    # becomes an error response, never a success for data that was not saved.
    async with ctx.db.transaction() as session:
        yield session


Session = Annotated[AsyncSession, Depends(_session, scope="function")]


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Missing bearer token")
    token = token.strip()
    if len(token) > 512:
        raise Unauthorized("Invalid token")
    return token


async def _rate_limit(ctx: AppContext, request: Request, principal: Principal) -> None:
    limit = ctx.settings.rate_limit_per_minute
    if limit <= 0:
        return
    window = int(time.time() // 60)
    key = f"sma:rl:{ctx.name}:{principal.token_id}:{window}"
    pipe = ctx.redis.pipeline(transaction=True)
    pipe.incr(key)
    pipe.expire(key, 61)
    count, _ = await pipe.execute()
    reset = (window + 1) * 60
    request.scope["state"]["rate_limit"] = (limit, max(0, limit - count), reset)
    if count > limit:
        retry_after = max(1, reset - int(time.time()))
        raise RateLimited(f"Rate limit of {limit} requests per minute exceeded", retry_after)


async def get_principal(request: Request, ctx: Ctx) -> Principal:
    cached = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    principal = await tokens.resolve(ctx.db.sessions, ctx.redis, _bearer(request),
                                     cache_seconds=ctx.settings.auth_cache_seconds)
    principal_kind_var.set(principal.kind.value)
    await _rate_limit(ctx, request, principal)
    request.state.principal = principal
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def require_kinds(*kinds: TokenKind):
    async def _dep(principal: CurrentPrincipal) -> Principal:
        principal.require(*kinds)
        return principal
    return _dep


AdminPrincipal = Annotated[Principal, Depends(require_kinds(TokenKind.admin))]
PrivilegedPrincipal = Annotated[Principal, Depends(require_kinds(TokenKind.service, TokenKind.admin))]
