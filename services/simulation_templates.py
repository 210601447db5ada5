"""Simulation templates and the simulated user's persona, built from the user's real profile
(SPEC §4.8): recent measurements, beliefs and the onboarding checklist gaps."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import ValidationFailed
from services.checklist import BUCKETS
from storage.models import Belief, BeliefSystem, ChecklistItem, Measurement, SelfModel

DEFAULT_TEMPLATE = "health_assessment"
METRIC_NAMES = ("conversation_completeness", "turn_relevancy", "knowledge_retention",
                "role_adherence")
DEFAULT_METRICS = ("conversation_completeness", "turn_relevancy")
MAX_PROFILE_ITEMS = 8

LongText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
PersonaText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=4000)]


@dataclass(frozen=True)
class Template:
    name: str
    scenario: str
    expected_outcome: str
    coach_role: str
    topics: tuple[str, ...]  # learning objective topics for the Epistemic Me dialectic


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template(
        name="health_assessment",
        scenario="A user wants a health assessment of their current habits and recent "
                 "measurements, and advice on what to improve first.",
        expected_outcome="The user understands where they stand and leaves with one concrete, "
                         "measurable next step for the coming week.",
        coach_role="You are a supportive, evidence-based health coach on a self-management "
                   "platform. Assess the user's sleep, activity, nutrition and recent "
                   "measurements one question at a time, relate what they say to their own "
                   "data, and agree on one small measurable next step. Do not diagnose.",
        topics=("sleep", "exercise", "nutrition"),
    ),
    Template(
        name="protocol_discussion",
        scenario="A user wants to discuss starting a new daily habit protocol that fits "
                 "their routine and their health goals.",
        expected_outcome="The user agrees on one habit protocol with a cue, a routine, a reward "
                         "and a start date.",
        coach_role="You are a habit coach. Help the user choose one habit protocol that fits "
                   "their data and schedule, and shape it as cue, routine and reward with a "
                   "start date. Keep it small enough to succeed; ask before assuming.",
        topics=("daily routine", "habit cue", "habit reward"),
    ),
    Template(
        name="belief_exploration",
        scenario="A user wants to explore what they believe about their health and where "
                 "those beliefs come from.",
        expected_outcome="The user has stated at least one health belief, examined the "
                         "evidence for it, and said how confident they are in it.",
        coach_role="You are a Socratic coach. Help the user put their health beliefs into "
                   "words, ask what evidence supports or contradicts each one, and how "
                   "confident they are. Do not argue; ask open questions.",
        topics=("health beliefs", "evidence", "confidence"),
    ),
)}


def template_names() -> list[str]:
    return ["default", *TEMPLATES]


def resolve_template(name: str) -> Template:
    """`default` is health_assessment; an unknown name → 422."""
    template = TEMPLATES.get(DEFAULT_TEMPLATE if name == "default" else name)
    if template is None:
        raise ValidationFailed(f"Unknown simulation template {name!r}",
                               details=[{"loc": ["template"],
                                         "msg": f"must be one of {template_names()}"}])
    return template


class SimulationConfig(BaseModel):
    """`config` of simulateConversation. `max_turns` caps the simulated user's turns; each is
    answered by one coach turn."""
    model_config = ConfigDict(extra="forbid")

    max_turns: int = Field(6, ge=1, le=50, description="Maximum simulated user turns")
    scenario: LongText | None = None
    expected_outcome: LongText | None = None
    persona: PersonaText | None = Field(
        None, description="The simulated user's persona; built from the user's profile if omitted")
    coach: Literal["llm", "epistemic"] = "llm"
    metrics: list[Literal["conversation_completeness", "turn_relevancy", "knowledge_retention",
                          "role_adherence"]] | None = Field(
        None, min_length=1, max_length=4,
        description="DeepEval conversational metrics; default completeness and turn relevancy")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)

    @field_validator("metrics")
    @classmethod
    def _unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("metric names must be unique")
        return value

    def resolved_metrics(self) -> list[str]:
        return list(self.metrics or DEFAULT_METRICS)


@dataclass
class UserContext:
    """What the coach knows about the user and what the persona is built from."""
    measurements: list[str] = field(default_factory=list)
    beliefs: list[str] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = []
        if self.measurements:
            parts.append("Recent measurements: " + "; ".join(self.measurements) + ".")
        if self.beliefs:
            parts.append("Stated beliefs: " + "; ".join(self.beliefs) + ".")
        if self.gaps:
            parts.append("Onboarding steps not completed yet: " + ", ".join(self.gaps) + ".")
        return " ".join(parts) or "No measurements, beliefs or onboarding data recorded yet."

    def persona(self) -> str:
        if not (self.measurements or self.beliefs):
            intro = ("A person who has just joined a health self-management platform and has not "
                     "recorded any measurements or beliefs yet.")
        else:
            intro = "A person using a health self-management platform."
        return f"{intro} {self.summary()}".strip()

    def as_dict(self) -> dict[str, list[str]]:
        return {"measurements": self.measurements, "beliefs": self.beliefs, "gaps": self.gaps}


def _number(value: float) -> str:
    return f"{value:g}"


async def load_user_context(session: AsyncSession, user_id: uuid.UUID) -> UserContext:
    """The latest value of each measurement type, the most confident beliefs, and the
    checklist buckets that are not completed (a bucket with no item yet counts as a gap)."""
    recent = await session.scalars(
        select(Measurement).where(Measurement.user_id == user_id)
        .order_by(Measurement.captured_at.desc()).limit(200))
    latest: dict[str, Measurement] = {}
    for m in recent:
        latest.setdefault(m.type, m)
    measurements = [f"{m.type} {_number(m.value)} {m.unit} on {m.captured_at.date().isoformat()}"
                    for m in list(latest.values())[:MAX_PROFILE_ITEMS]]

    beliefs = await session.scalars(
        select(Belief).join(BeliefSystem, Belief.belief_system_id == BeliefSystem.id)
        .join(SelfModel, BeliefSystem.self_model_id == SelfModel.id)
        .where(SelfModel.user_id == user_id)
        .order_by(Belief.confidence.desc(), Belief.updated_at.desc()).limit(MAX_PROFILE_ITEMS))
    stated = [f'"{b.statement}" (confidence {b.confidence:.0%})' for b in beliefs]

    status = dict((await session.execute(
        select(ChecklistItem.bucket_code, ChecklistItem.status)
        .where(ChecklistItem.user_id == user_id))).all())
    gaps = [label for code, label in BUCKETS.items() if status.get(code) != "completed"]
    return UserContext(measurements=measurements, beliefs=stated, gaps=gaps)
