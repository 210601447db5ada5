"""Users (SPEC §4.2)."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Response, status

from api.deps import CurrentPrincipal, Ctx, PrivilegedPrincipal, Session
from api.envelope import Envelope, Page
from api.schemas_common import Limit, Model, Name, Offset, Request
from core.errors import Forbidden
from core.principal import TokenKind
from services import users

router = APIRouter(tags=["users"])


class UserOut(Model):
    id: uuid.UUID
    dontdie_uid: str | None
    created_at: datetime


class CreateUserIn(Request):
    user_id: uuid.UUID | None = None
    dontdie_uid: Name | None = None


@router.post("/createUser", operation_id="createUser", status_code=status.HTTP_201_CREATED,
             response_model=Envelope[UserOut], summary="Create a user (service, admin)")
async def create_user(body: CreateUserIn, session: Session, _: PrivilegedPrincipal):
    user = await users.create_user(session, user_id=body.user_id, dontdie_uid=body.dontdie_uid)
    return Envelope(data=UserOut.model_validate(user))


@router.get("/getUser", operation_id="getUser", response_model=Envelope[UserOut],
            summary="Get a user (own, service)")
async def get_user(user_id: uuid.UUID, session: Session, principal: CurrentPrincipal):
    principal.ensure_user(user_id)
    return Envelope(data=UserOut.model_validate(await users.get_user(session, user_id)))


@router.get("/listUsers", operation_id="listUsers", response_model=Envelope[Page[UserOut]],
            summary="List users, newest first (service, admin)")
async def list_users(session: Session, _: PrivilegedPrincipal, limit: Limit = 50, offset: Offset = 0):
    rows, total = await users.list_users(session, limit=limit, offset=offset)
    return Envelope(data=Page(items=[UserOut.model_validate(u) for u in rows], total=total,
                              limit=limit, offset=offset))


class UserExportOut(Model):
    """Everything stored about one user. Nested records carry every column of their table,
    except secrets (token hashes, the encrypted Don't Die token) and storage keys."""
    format_version: int
    exported_at: datetime
    user: UserOut
    self_model: dict[str, Any] | None
    measurements: list[dict[str, Any]]
    files: list[dict[str, Any]]
    checklist_items: list[dict[str, Any]]
    conversations: list[dict[str, Any]]
    dialectics: list[dict[str, Any]]
    simulation_jobs: list[dict[str, Any]]
    dd_user_data: dict[str, Any] | None
    dd_sync_log: list[dict[str, Any]]
    dd_credential: dict[str, Any] | None
    api_tokens: list[dict[str, Any]]


@router.delete("/deleteUser", operation_id="deleteUser", status_code=status.HTTP_204_NO_CONTENT,
               response_class=Response,
               summary="Delete a user and all of their data: rows, files, cached data, tokens "
                       "(own, admin)")
async def delete_user(user_id: uuid.UUID, session: Session, principal: CurrentPrincipal, ctx: Ctx):
    if principal.kind == TokenKind.service:
        raise Forbidden("Deleting a user needs the user's own token or an admin token")
    principal.ensure_user(user_id)
    await users.delete_user(session, ctx.objects, ctx.redis, user_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/exportUserData", operation_id="exportUserData", response_model=Envelope[UserExportOut],
            summary="All of a user's data as one JSON document (own, service)")
async def export_user_data(user_id: uuid.UUID, session: Session, principal: CurrentPrincipal):
    principal.ensure_user(user_id)
    return Envelope(data=UserExportOut.model_validate(await users.export_user_data(session, user_id)))
