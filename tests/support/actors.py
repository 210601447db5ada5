"""Authenticated HTTP clients for each kind of principal, against an in-process app."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import httpx

from core.principal import TokenKind
from services import tokens, users
from storage.db import Database


def asgi_client(app, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://testserver", headers=headers, timeout=30)


@dataclass
class Caller:
    client: httpx.AsyncClient
    token: str
    token_id: uuid.UUID
    user_id: uuid.UUID | None = None


async def make_user(db: Database, dontdie_uid: str | None = None) -> uuid.UUID:
    async with db.transaction() as session:
        return (await users.create_user(session, dontdie_uid=dontdie_uid)).id


async def make_token(db: Database, kind: TokenKind, user_id: uuid.UUID | None = None, **kw) -> tuple[str, uuid.UUID]:
    async with db.transaction() as session:
        issued = await tokens.issue_token(session, kind, user_id=user_id, **kw)
        return issued.token, issued.record.id


async def make_caller(db: Database, app, kind: TokenKind, *, with_user: bool | None = None) -> Caller:
    user_id = await make_user(db) if (kind == TokenKind.user or with_user) else None
    token, token_id = await make_token(db, kind, user_id if kind == TokenKind.user else None)
    return Caller(asgi_client(app, token), token, token_id, user_id)
