"""The epistemic app's use cases: call Epistemic Me, then mirror the result (SPEC §6).

The EM self-model id is the profile user id. Every use case first checks that the user
exists here (unknown → 404) before anything is sent upstream. Upstream failures arrive as
`core.errors` exceptions from `clients.epistemic`; the only translation made here is that
an upstream "not found" (the platform answers `internal` for an unknown self-model or
dialectic) becomes a 404 that says what to do.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from clients import epistemic as em
from core.errors import AppError, Conflict, NotFound, UpstreamError
from services import epistemic_mirror as mirror
from services.users import get_user
from storage.models import Belief, Dialectic, SelfModel

T = TypeVar("T")
_MISSING_CODES = {"internal", "not_found", "unknown"}


def is_upstream_missing(exc: AppError) -> bool:
    """True when EM said the object does not exist (its handlers wrap "... not found")."""
    if isinstance(exc, NotFound):
        return True
    details = exc.details if isinstance(exc.details, dict) else {}
    return (isinstance(exc, UpstreamError) and details.get("upstream_code") in _MISSING_CODES
            and "not found" in exc.message.lower())


async def _upstream(call: Awaitable[T], missing: str, **details: Any) -> T:
    try:
        return await call
    except AppError as exc:
        if is_upstream_missing(exc):
            raise NotFound(missing, details={"upstream": "epistemic_me", **details}) from None
        raise


def _no_self_model(user_id: uuid.UUID) -> str:
    return (f"User {user_id} has no Epistemic Me self-model yet; create it with "
            "POST /createSelfModel")


async def _get_self_model(client: em.EpistemicClient, user_id: uuid.UUID) -> em.SelfModel:
    return await _upstream(client.get_self_model(str(user_id)), _no_self_model(user_id),
                           user_id=str(user_id))


# --- self-models -----------------------------------------------------------------------------

@dataclass
class CreatedSelfModel:
    self_model: em.SelfModel
    created: bool
    profile_self_model: SelfModel


async def create_self_model(session: AsyncSession, client: em.EpistemicClient, user_id: uuid.UUID,
                            philosophies: list[str] | None = None) -> CreatedSelfModel:
    """Idempotent. CreateSelfModel on an existing id wipes it upstream, so an existing EM
    self-model is returned as it is and only an absent one is created."""
    await get_user(session, user_id)
    created = False
    try:
        self_model = await client.get_self_model(str(user_id))
    except AppError as exc:
        if not is_upstream_missing(exc):
            raise
        self_model = await client.create_self_model(str(user_id), philosophies or [])
        created = True
    profile_model, _ = await mirror.mirror_self_model(session, user_id)
    return CreatedSelfModel(self_model, created, profile_model)


async def get_self_model(session: AsyncSession, client: em.EpistemicClient,
                         user_id: uuid.UUID) -> em.SelfModel:
    await get_user(session, user_id)
    return await _get_self_model(client, user_id)


async def sync_to_profile(session: AsyncSession, client: em.EpistemicClient,
                          user_id: uuid.UUID) -> mirror.SyncReport:
    """Pulls the EM self-model's beliefs and dialectics into the profile store."""
    await get_user(session, user_id)
    self_model = await _get_self_model(client, user_id)
    dialectics = self_model.dialectics
    if not dialectics:  # some server versions leave dialectics out of GetSelfModel
        dialectics = await _upstream(client.list_dialectics(str(user_id)),
                                     _no_self_model(user_id), user_id=str(user_id))
    return await mirror.sync_self_model(
        session, user_id, self_model.model_copy(update={"dialectics": dialectics}))


# --- beliefs ---------------------------------------------------------------------------------

@dataclass
class UpdatedBelief:
    belief: em.Belief
    profile_belief: Belief


async def update_belief(session: AsyncSession, client: em.EpistemicClient, user_id: uuid.UUID,
                        statement: str, *, confidence: float | None = None,
                        belief_type: em.BeliefType | str = em.BeliefType.STATEMENT) -> UpdatedBelief:
    """EM CreateBelief (always with a belief type), mirrored into `epistemic_me`."""
    await get_user(session, user_id)
    result = await _upstream(client.create_belief(str(user_id), statement, belief_type),
                             _no_self_model(user_id), user_id=str(user_id))
    _, system = await mirror.mirror_self_model(session, user_id)
    row, _ = await mirror.mirror_belief(session, system, result.belief, confidence=confidence)
    if row is None:
        raise UpstreamError("Epistemic Me CreateBelief answered with a belief without id or text",
                            details={"upstream": "epistemic_me", "method": "CreateBelief"})
    return UpdatedBelief(result.belief, row)


async def get_belief_system(session: AsyncSession, client: em.EpistemicClient,
                            user_id: uuid.UUID) -> em.BeliefSystem:
    await get_user(session, user_id)
    return await _upstream(client.get_belief_system(str(user_id)), _no_self_model(user_id),
                           user_id=str(user_id))


async def list_beliefs(session: AsyncSession, client: em.EpistemicClient,
                       user_id: uuid.UUID) -> list[em.Belief]:
    await get_user(session, user_id)
    return await _upstream(client.list_beliefs(str(user_id)), _no_self_model(user_id),
                           user_id=str(user_id))


# --- dialectics ------------------------------------------------------------------------------

@dataclass
class MirroredDialectic:
    dialectic: em.Dialectic
    profile_dialectic: Dialectic | None


async def create_dialectic(session: AsyncSession, client: em.EpistemicClient, user_id: uuid.UUID,
                           *, dialectic_type: em.DialecticType | str = em.DialecticType.DEFAULT,
                           learning_objective: dict[str, Any] | None = None) -> MirroredDialectic:
    """EM CreateDialectic; mirrored as a profile dialectic with its first question."""
    await get_user(session, user_id)
    dialectic = await _upstream(
        client.create_dialectic(str(user_id), dialectic_type, learning_objective),
        _no_self_model(user_id), user_id=str(user_id))
    result = await mirror.mirror_dialectic(session, user_id, dialectic)
    return MirroredDialectic(dialectic, result.dialectic)


async def update_dialectic(session: AsyncSession, client: em.EpistemicClient, user_id: uuid.UUID,
                           dialectic_id: str, answer: str, *, dry_run: bool = False
                           ) -> MirroredDialectic:
    """EM UpdateDialectic; the answer and the next question are mirrored (not on a dry run,
    which the platform does not store either). A mirrored dialectic its user has closed in
    the profile store → 409, before anything is sent upstream."""
    await get_user(session, user_id)
    mirrored = await mirror.find_dialectic(session, user_id, dialectic_id)
    if mirrored is not None and mirrored.closed and not dry_run:
        raise Conflict("This dialectic is closed in the profile store; start a new one",
                       code="dialectic_closed",
                       details={"dialectic_id": dialectic_id, "profile_dialectic_id": str(mirrored.id)})
    dialectic = await _upstream(
        client.update_dialectic(dialectic_id, str(user_id), answer, dry_run=dry_run),
        f"Unknown Epistemic Me dialectic {dialectic_id!r} for user {user_id}",
        user_id=str(user_id), dialectic_id=dialectic_id)
    if dry_run:
        return MirroredDialectic(dialectic, await mirror.find_dialectic(session, user_id, dialectic.id))
    result = await mirror.mirror_dialectic(session, user_id, dialectic)
    return MirroredDialectic(dialectic, result.dialectic)


async def list_dialectics(session: AsyncSession, client: em.EpistemicClient,
                          user_id: uuid.UUID) -> list[em.Dialectic]:
    await get_user(session, user_id)
    return await _upstream(client.list_dialectics(str(user_id)), _no_self_model(user_id),
                           user_id=str(user_id))


async def mirrored_dialectic_ids(session: AsyncSession, user_id: uuid.UUID,
                                 external_ids: list[str]) -> dict[str, uuid.UUID]:
    """Profile dialectic ids of already mirrored EM dialectics, by EM id."""
    if not external_ids:
        return {}
    rows = await session.execute(select(Dialectic.external_id, Dialectic.id).where(
        Dialectic.user_id == user_id, Dialectic.external_id.in_(external_ids)))
    return {ext: pk for ext, pk in rows}
