"""Mirror Epistemic Me self-models, beliefs and dialectics into the profile store (SPEC §6).

Everything is keyed by the upstream id, so mirroring the same upstream state again changes
nothing:

- the self-model is the user's profile self-model (`ensure_self_model`), with a belief system
  named `epistemic_me`;
- an EM belief is a profile belief in that system with `external_id` = the EM belief id (a
  repeat updates the statement and type; a confidence we already hold is kept unless a new
  one is given; new beliefs without one get `DEFAULT_CONFIDENCE`);
- an EM dialectic is a profile `dialectic` row with `external_id` = the EM dialectic id; each
  EM interaction's question becomes a `question` interaction and its answer an `answer`
  interaction, whose `extra_json` carries the EM interaction id (the idempotency key), status
  and extracted beliefs.

Takes an `AsyncSession`; never calls upstream and knows nothing of HTTP.
"""
from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from clients import epistemic as em
from services import dialectics
from services.beliefs import BeliefInput, create_belief, ensure_belief_system, ensure_self_model
from storage.models import Belief, BeliefSystem, Dialectic, SelfModel

EM_SYSTEM = "epistemic_me"
DEFAULT_CONFIDENCE = 0.5
SOURCE = "epistemic_me"
QUESTION, ANSWER = "question", "answer"

_ZERO_ENUMS = {"BELIEF_TYPE_INVALID", "INVALID", "STATUS_INVALID", "INTERACTION_TYPE_INVALID",
               "AGENT_TYPE_INVALID", ""}


# --- small conversions (also used by the epistemic routes) --------------------------------

def enum_name(value: Any) -> str | None:
    """An EM enum (or an unknown newer value kept as a string) as its name; unset → None."""
    if value is None:
        return None
    name = str(value.value if hasattr(value, "value") else value)
    return None if name in _ZERO_ENUMS else name


def millis_to_datetime(millis: int | None) -> datetime | None:
    if not millis:
        return None
    try:
        return datetime.fromtimestamp(millis / 1000, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


def clean_text(text: str | None) -> str:
    """PostgreSQL text cannot hold NUL; upstream text is stored without it."""
    return (text or "").replace("\x00", "")


def learning_objective_dict(objective: em.LearningObjective | None) -> dict[str, Any] | None:
    if objective is None:
        return None
    return {"description": clean_text(objective.description),
            "topics": [clean_text(t) for t in objective.topics],
            "target_belief_type": enum_name(objective.target_belief_type),
            "completion_percentage": float(objective.completion_percentage)}


def belief_summary(belief: em.Belief) -> dict[str, Any]:
    return {"id": belief.id, "belief_type": enum_name(belief.type),
            "statement": clean_text(belief.text), "version": belief.version}


# --- reports -------------------------------------------------------------------------------

@dataclass
class BeliefCounts:
    seen: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0  # upstream beliefs without an id or text cannot be mirrored


@dataclass
class DialecticCounts:
    seen: int = 0
    created: int = 0
    updated: int = 0
    interactions_created: int = 0


@dataclass
class SyncReport:
    user_id: uuid.UUID
    profile_self_model_id: uuid.UUID
    belief_system_id: uuid.UUID
    beliefs: BeliefCounts = field(default_factory=BeliefCounts)
    dialectics: DialecticCounts = field(default_factory=DialecticCounts)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DialecticMirror:
    dialectic: Dialectic
    created: bool
    interactions_created: int


# --- self-model and beliefs ----------------------------------------------------------------

async def mirror_self_model(session: AsyncSession, user_id: uuid.UUID) -> tuple[SelfModel, BeliefSystem]:
    """The user's profile self-model and its `epistemic_me` belief system (created on demand;
    unknown user → 404)."""
    model = await ensure_self_model(session, user_id)
    system = await ensure_belief_system(session, model.id, EM_SYSTEM)
    return model, system


async def _find_belief(session: AsyncSession, system: BeliefSystem, external_id: str) -> Belief | None:
    return await session.scalar(select(Belief).where(
        Belief.belief_system_id == system.id, Belief.external_id == external_id))


async def mirror_belief(session: AsyncSession, system: BeliefSystem, belief: em.Belief, *,
                        confidence: float | None = None) -> tuple[Belief | None, str]:
    """Creates or updates the profile copy of one EM belief; returns it and what happened
    (`created`, `updated`, `unchanged` or `skipped`)."""
    external_id = (belief.id or "").strip()
    statement = clean_text(belief.text).strip()
    if not external_id or not statement:
        return None, "skipped"
    belief_type = enum_name(belief.type)
    for _attempt in range(2):
        existing = await _find_belief(session, system, external_id)
        if existing is not None:
            new_conf = existing.confidence if confidence is None else confidence
            new_type = belief_type or existing.belief_type
            if (existing.statement, existing.confidence, existing.belief_type) == (
                    statement, new_conf, new_type):
                return existing, "unchanged"
            row = await create_belief(session, system, BeliefInput(
                statement=statement, confidence=new_conf, belief_type=new_type,
                external_id=external_id))
            return row, "updated"
        data = BeliefInput(statement=statement, belief_type=belief_type, external_id=external_id,
                           confidence=DEFAULT_CONFIDENCE if confidence is None else confidence)
        try:
            async with session.begin_nested():
                row = await create_belief(session, system, data)
            return row, "created"
        except IntegrityError:
            continue  # a concurrent mirror inserted it first: update that row instead
    raise RuntimeError("belief mirror did not converge")  # pragma: no cover


async def mirror_beliefs(session: AsyncSession, system: BeliefSystem, beliefs: list[em.Belief],
                         counts: BeliefCounts | None = None) -> BeliefCounts:
    counts = counts or BeliefCounts()
    for belief in beliefs:
        counts.seen += 1
        _, outcome = await mirror_belief(session, system, belief)
        setattr(counts, outcome, getattr(counts, outcome) + 1)
    return counts


# --- dialectics ----------------------------------------------------------------------------

async def find_dialectic(session: AsyncSession, user_id: uuid.UUID, external_id: str) -> Dialectic | None:
    return await dialectics.find_by_external_id(session, user_id, external_id)


async def _lock(session: AsyncSession, row: Dialectic) -> None:
    """Taken before reading the transcript, so two concurrent mirrors of one dialectic never
    both add the same interaction (row lock on PostgreSQL, write lock on SQLite)."""
    await session.execute(update(Dialectic).where(Dialectic.id == row.id)
                          .values(closed=Dialectic.closed))
    await session.refresh(row, ["closed"])


def _key(extra: dict[str, Any] | None, role: str) -> tuple[str, str] | None:
    if not extra or extra.get("source") != SOURCE or not extra.get("em_interaction_id"):
        return None
    return str(extra["em_interaction_id"]), role


def _content(text: str) -> str:
    return text[:dialectics.MAX_CONTENT_CHARS]


async def mirror_dialectic(session: AsyncSession, user_id: uuid.UUID, dialectic: em.Dialectic, *,
                           self_model_id: uuid.UUID | None = None) -> DialecticMirror:
    """Creates or brings up to date the profile copy of one EM dialectic and its transcript:
    for each EM interaction, its question then (once answered) its answer.

    A profile dialectic closed by its user receives no further interactions (the caller
    checks that before changing anything upstream; a sync just leaves it as it is)."""
    if self_model_id is None:
        self_model_id = (await mirror_self_model(session, user_id))[0].id
    objective = learning_objective_dict(dialectic.learning_objective)
    row = await dialectics.find_by_external_id(session, user_id, dialectic.id)
    created = row is None
    if row is None:
        # Race-safe: a concurrent mirror of the same EM dialectic returns the same row.
        row = await dialectics.start_dialectic(session, user_id, self_model_id=self_model_id,
                                               learning_objective=objective,
                                               external_id=dialectic.id)
    elif objective is not None and row.learning_objective != objective:
        row.learning_objective = objective
    await _lock(session, row)
    if row.closed:
        return DialecticMirror(dialectic=row, created=created, interactions_created=0)
    existing = await dialectics.list_interactions(session, row.id)
    by_key = {k: r for r in existing if (k := _key(r.extra_json, r.role)) is not None}
    dialectic_type = enum_name(dialectic.dialectic_type)
    added = 0
    for index, interaction in enumerate(dialectic.user_interactions):
        qa = interaction.question_answer
        if qa is None:
            continue
        interaction_id = interaction.id or f"{dialectic.id}#{index}"
        status = enum_name(interaction.status)
        base = {"source": SOURCE, "em_dialectic_id": dialectic.id,
                "em_interaction_id": interaction_id, "em_status": status,
                "em_type": enum_name(interaction.type)}
        question = clean_text(qa.question.question).strip()
        if question:
            current = by_key.get((interaction_id, QUESTION))
            if current is None:
                asked = millis_to_datetime(qa.question.created_at_millis_utc)
                await dialectics.append_interaction(
                    session, row, QUESTION, _content(question),
                    {**base, "em_dialectic_type": dialectic_type,
                     "asked_at": asked.isoformat() if asked else None})
                added += 1
            elif (current.extra_json or {}).get("em_status") != status:
                current.extra_json = {**(current.extra_json or {}), "em_status": status}
        answer = clean_text(qa.answer.user_answer if qa.answer else "").strip()
        if answer:
            extracted = [belief_summary(b) for b in qa.extracted_beliefs]
            current = by_key.get((interaction_id, ANSWER))
            if current is None:
                answered = millis_to_datetime(qa.answer.created_at_millis_utc)
                await dialectics.append_interaction(
                    session, row, ANSWER, _content(answer),
                    {**base, "extracted_beliefs": extracted,
                     "answered_at": answered.isoformat() if answered else None})
                added += 1
            elif ((current.extra_json or {}).get("em_status"),
                  (current.extra_json or {}).get("extracted_beliefs")) != (status, extracted):
                current.extra_json = {**(current.extra_json or {}), "em_status": status,
                                      "extracted_beliefs": extracted}
    await session.flush()
    return DialecticMirror(dialectic=row, created=created, interactions_created=added)


async def mirror_dialectics(session: AsyncSession, user_id: uuid.UUID,
                            dialectics: list[em.Dialectic],
                            counts: DialecticCounts | None = None, *,
                            self_model_id: uuid.UUID | None = None) -> DialecticCounts:
    counts = counts or DialecticCounts()
    if self_model_id is None and dialectics:
        self_model_id = (await mirror_self_model(session, user_id))[0].id
    for dialectic in dialectics:
        if not dialectic.id:
            continue
        counts.seen += 1
        result = await mirror_dialectic(session, user_id, dialectic, self_model_id=self_model_id)
        if result.created:
            counts.created += 1
        elif result.interactions_created:
            counts.updated += 1
        counts.interactions_created += result.interactions_created
    return counts


# --- a whole self-model --------------------------------------------------------------------

async def sync_self_model(session: AsyncSession, user_id: uuid.UUID,
                          self_model: em.SelfModel) -> SyncReport:
    """Mirrors an EM self-model's belief system and dialectics; idempotent by EM id."""
    model, system = await mirror_self_model(session, user_id)
    report = SyncReport(user_id=user_id, profile_self_model_id=model.id, belief_system_id=system.id)
    await mirror_beliefs(session, system, self_model.belief_system.beliefs, report.beliefs)
    await mirror_dialectics(session, user_id, self_model.dialectics, report.dialectics,
                            self_model_id=model.id)
    return report
