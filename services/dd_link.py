"""Linking a user's own Don't Die account (SPEC §4.10).

The token is verified upstream, then stored only as Fernet ciphertext (`dd_credential`).
It is never logged, never part of a cache key and never returned.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.crypto import cipher_from_settings
from core.errors import Conflict, NotFound, UpstreamClientError, ValidationFailed
from core.settings import Settings
from services.dd_runtime import DDRuntime
from services.users import get_user
from storage.models import DDCredential, DDUserData, User
from storage.types import utcnow

NOT_LINKED_MESSAGE = ("No Don't Die account is linked for this user: link one with "
                      "POST /profile/dd-data/link")


@dataclass(frozen=True)
class LinkedAccount:
    user_id: uuid.UUID
    dontdie_uid: str
    client_id: str
    token: str = field(repr=False)


async def link_account(session: AsyncSession, runtime: DDRuntime, *, user_id: uuid.UUID,
                       dd_token: str, dd_client_id: str) -> dict[str, Any]:
    """Verify upstream, store encrypted, set `user.dontdie_uid`. Linking a different account
    drops the previous one's synced data (`replaced_account`); the caller then clears the
    Redis cache (`dd_data.clear_cache`) once this has committed."""
    cipher = cipher_from_settings(runtime.settings)
    user = await get_user(session, user_id)
    try:
        account = await runtime.client(dd_token, dd_client_id).get_account()
    except UpstreamClientError as exc:
        if exc.status_code in (401, 403):
            raise ValidationFailed(
                f"Don't Die rejected these credentials (HTTP {exc.status_code}): check dd_token "
                "and dd_client_id", details=[{"loc": ["body", "dd_token"],
                                              "msg": "rejected by Don't Die"}]) from None
        raise
    dontdie_uid = str(account["id"])

    holder = await session.scalar(select(User.id).where(User.dontdie_uid == dontdie_uid,
                                                        User.id != user_id))
    if holder is not None:
        raise Conflict("This Don't Die account is already linked to another user")

    credential = await session.scalar(select(DDCredential).where(DDCredential.user_id == user_id))
    previous_uid = credential.dontdie_uid if credential is not None else user.dontdie_uid
    replaced = previous_uid is not None and previous_uid != dontdie_uid
    if replaced:
        # Another account's synced data must not be shown as this one's.
        await session.execute(delete(DDUserData).where(DDUserData.user_id == user_id))
    if credential is None:
        credential = DDCredential(user_id=user_id, dontdie_uid=dontdie_uid, client_id=dd_client_id,
                                  token_ciphertext=cipher.encrypt(dd_token))
        session.add(credential)
    else:
        credential.dontdie_uid = dontdie_uid
        credential.client_id = dd_client_id
        credential.token_ciphertext = cipher.encrypt(dd_token)
        credential.updated_at = utcnow()
    user.dontdie_uid = dontdie_uid
    try:
        async with session.begin_nested():
            await session.flush()
    except IntegrityError:
        raise Conflict("This Don't Die account is already linked to another user") from None
    return {"user_id": user_id, "dontdie_uid": dontdie_uid, "client_id": dd_client_id,
            "linked": True, "linked_at": credential.updated_at or credential.created_at,
            "replaced_account": replaced}


async def unlink_account(session: AsyncSession, user_id: uuid.UUID) -> dict[str, Any]:
    """Removes the credential and the account's synced data; sync logs stay as an audit trail.
    The caller clears the Redis cache (`dd_data.clear_cache`) once this has committed."""
    user = await get_user(session, user_id)
    credential = await session.scalar(select(DDCredential).where(DDCredential.user_id == user_id))
    if credential is None:
        raise NotFound("No Don't Die account is linked for this user")
    previous = credential.dontdie_uid
    await session.delete(credential)
    await session.execute(delete(DDUserData).where(DDUserData.user_id == user_id))
    user.dontdie_uid = None
    await session.flush()
    return {"user_id": user_id, "linked": False, "dontdie_uid": previous}


async def is_linked(session: AsyncSession, user_id: uuid.UUID) -> bool:
    return await session.scalar(
        select(DDCredential.id).where(DDCredential.user_id == user_id)) is not None


async def require_link(session: AsyncSession, user_id: uuid.UUID) -> None:
    """404 for an unknown user, 409 when no account is linked (no decryption needed)."""
    await get_user(session, user_id)
    if not await is_linked(session, user_id):
        raise Conflict(NOT_LINKED_MESSAGE, code="dontdie_not_linked")


async def load_linked_account(session: AsyncSession, settings: Settings,
                              user_id: uuid.UUID) -> LinkedAccount:
    credential = await session.scalar(select(DDCredential).where(DDCredential.user_id == user_id))
    if credential is None:
        raise Conflict(NOT_LINKED_MESSAGE, code="dontdie_not_linked")
    token = cipher_from_settings(settings).decrypt(credential.token_ciphertext)
    return LinkedAccount(user_id=user_id, dontdie_uid=credential.dontdie_uid,
                         client_id=credential.client_id, token=token)
