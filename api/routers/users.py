"""Users (SPEC §4.2)."""
from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, status

from api.deps import CurrentPrincipal, PrivilegedPrincipal, Session
from api.envelope import Envelope, Page
from api.schemas_common import Limit, Model, Name, Offset, Request
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
