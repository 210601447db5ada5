"""Token management for admins (SPEC §3)."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from fastapi import APIRouter, status
from pydantic import Field

from api.deps import AdminPrincipal, Ctx, Session
from api.envelope import Envelope, Page
from api.schemas_common import Limit, Model, Name, Offset, Request
from core.principal import TokenKind
from services import tokens

router = APIRouter(prefix="/admin", tags=["admin"])


class TokenOut(Model):
    id: uuid.UUID
    kind: str
    user_id: uuid.UUID | None
    name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class IssuedTokenOut(TokenOut):
    token: str = Field(description="Shown once; only its hash is stored")


class CreateTokenIn(Request):
    kind: TokenKind
    user_id: uuid.UUID | None = None
    name: Name = "api"
    expires_in_days: int | None = Field(None, ge=1, le=3650)


@router.post("/tokens", operation_id="createApiToken", status_code=status.HTTP_201_CREATED,
             response_model=Envelope[IssuedTokenOut], summary="Issue a token (admin); shown once")
async def create_token(body: CreateTokenIn, session: Session, _: AdminPrincipal):
    issued = await tokens.issue_token(
        session, body.kind, user_id=body.user_id, name=body.name,
        expires_in=timedelta(days=body.expires_in_days) if body.expires_in_days else None)
    out = TokenOut.model_validate(issued.record).model_dump()
    return Envelope(data=IssuedTokenOut(**out, token=issued.token))


@router.get("/tokens", operation_id="listApiTokens", response_model=Envelope[Page[TokenOut]],
            summary="List tokens without their secrets (admin)")
async def list_tokens(session: Session, _: AdminPrincipal, limit: Limit = 50, offset: Offset = 0):
    rows, total = await tokens.list_tokens(session, limit=limit, offset=offset)
    return Envelope(data=Page(items=[TokenOut.model_validate(r) for r in rows], total=total,
                              limit=limit, offset=offset))


@router.post("/tokens/{token_id}/revoke", operation_id="revokeApiToken",
             response_model=Envelope[TokenOut], summary="Revoke a token at once (admin)")
async def revoke_token(token_id: uuid.UUID, session: Session, ctx: Ctx, _: AdminPrincipal):
    record = await tokens.revoke_token(session, ctx.redis, token_id)
    return Envelope(data=TokenOut.model_validate(record))
