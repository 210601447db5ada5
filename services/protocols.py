"""Protocol templates and personalised protocols (SPEC §4.5).

`generate` reads the user's own data — the last 30 days of measurements relevant to the
habit, their beliefs (statements and confidence), the onboarding checklist gaps — and the
caller's preferences, and turns a template into a protocol with a schedule and a rationale
that cites every value it used. `personalise` is the pure, deterministic part: the same
inputs always give the same protocol, byte for byte.

Pushing the result to Don't Die is done by the caller after `generate` (router →
`services.dd_push`), so this module stays free of upstream calls.
"""
from __future__ import annotations

import math
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import Conflict, NotFound
from services import checklist, trends
from services.users import get_user
from storage.models import (Belief, BeliefSystem, Measurement, ProtocolTemplate,
                            SelfModel)
from storage.types import utcnow

LOOKBACK_DAYS = 30
TIMES_OF_DAY = ("morning", "afternoon", "evening")
INTENSITIES = ("low", "moderate", "high")
INTENSITY_FACTOR = {"low": 0.67, "moderate": 1.0, "high": 1.33}
MIN_MINUTES = 5
MAX_MINUTES = 240
LOW_CONFIDENCE = 0.4
HIGH_CONFIDENCE = 0.7


# --- templates -----------------------------------------------------------------------------------

async def list_templates(session: AsyncSession, *, habit_type: str | None = None, limit: int = 50,
                         offset: int = 0, include_inactive: bool = False
                         ) -> tuple[list[ProtocolTemplate], int]:
    """A catalogue, ordered by habit type then name."""
    conditions = []
    if habit_type:
        conditions.append(ProtocolTemplate.habit_type == habit_type)
    if not include_inactive:
        conditions.append(ProtocolTemplate.is_active.is_(True))
    total = await session.scalar(select(func.count()).select_from(ProtocolTemplate).where(*conditions))
    rows = await session.scalars(select(ProtocolTemplate).where(*conditions)
                                 .order_by(ProtocolTemplate.habit_type, ProtocolTemplate.name)
                                 .limit(limit).offset(offset))
    return list(rows), total or 0


async def get_template(session: AsyncSession, template_id: uuid.UUID, *,
                       active_only: bool = True) -> ProtocolTemplate:
    template = await session.get(ProtocolTemplate, template_id)
    if template is None or (active_only and not template.is_active):
        raise NotFound("Unknown protocol template", details={"template_id": str(template_id)})
    return template


def default_dd_protocol(habit_type: str, name: str, routine: str, reward: str) -> dict[str, Any]:
    return {"name": name, "description": routine, "goal": reward,
            "category": habit_type.replace("_", " ").title(), "type": "Habit"}


async def create_template(session: AsyncSession, *, habit_type: str, name: str, cue: str, routine: str,
                          reward: str, dd_protocol: dict[str, Any] | None = None,
                          is_active: bool = True) -> ProtocolTemplate:
    """A duplicate name → 409. Missing Don't Die protocol fields are derived from the template."""
    duplicate = await session.scalar(select(ProtocolTemplate.id).where(ProtocolTemplate.name == name))
    if duplicate is not None:
        raise Conflict("A protocol template with this name already exists",
                       details={"existing_template_id": str(duplicate)})
    dd = default_dd_protocol(habit_type, name, routine, reward)
    dd.update({k: v for k, v in (dd_protocol or {}).items() if v is not None})
    template = ProtocolTemplate(habit_type=habit_type, name=name, cue=cue, routine=routine,
                                reward=reward, dd_protocol_json=dd, is_active=is_active)
    session.add(template)
    try:
        async with session.begin_nested():
            await session.flush()
    except IntegrityError as exc:
        raise Conflict("A protocol template with this name already exists (concurrent create)") from exc
    return template


# --- the user's data, summarised ----------------------------------------------------------------

# canonical metric -> measurement types that mean it (compared lower-case, '_', ' ' or '-')
METRIC_ALIASES: dict[str, tuple[str, ...]] = {
    "sleep_hours": ("sleep_hours", "sleep_duration", "sleep", "hours_slept", "total_sleep", "sleep_time"),
    "steps": ("steps", "step_count", "daily_steps"),
    "active_minutes": ("active_minutes", "exercise_minutes", "activity_minutes", "workout_minutes"),
    "weight": ("weight", "body_weight", "body_mass"),
    "resting_heart_rate": ("resting_heart_rate", "resting_hr", "rhr"),
    "hrv": ("hrv", "heart_rate_variability", "hrv_rmssd"),
    "water_intake": ("water_intake", "water", "hydration", "water_ml", "fluid_intake"),
    "stress": ("stress", "stress_level", "stress_score"),
}
# quantities that add up over a day (daily total) rather than being sampled (daily mean)
ADDITIVE = {"steps", "active_minutes", "water_intake"}
CANONICAL_UNIT = {"sleep_hours": "h", "steps": "steps", "active_minutes": "min", "weight": "kg",
                  "resting_heart_rate": "bpm", "hrv": "ms", "water_intake": "ml", "stress": ""}
LABEL = {"sleep_hours": "sleep", "steps": "daily steps", "active_minutes": "active minutes",
         "weight": "weight", "resting_heart_rate": "resting heart rate", "hrv": "HRV",
         "water_intake": "water intake", "stress": "stress"}
_UNIT_FACTORS: dict[str, dict[str, float]] = {
    "sleep_hours": {"": 1, "h": 1, "hr": 1, "hrs": 1, "hour": 1, "hours": 1, "min": 1 / 60,
                    "mins": 1 / 60, "minute": 1 / 60, "minutes": 1 / 60, "s": 1 / 3600,
                    "sec": 1 / 3600, "seconds": 1 / 3600},
    "weight": {"": 1, "kg": 1, "kgs": 1, "kilogram": 1, "kilograms": 1, "g": 0.001,
               "lb": 0.45359237, "lbs": 0.45359237, "pound": 0.45359237, "pounds": 0.45359237},
    "water_intake": {"": 1, "ml": 1, "milliliter": 1, "milliliters": 1, "millilitre": 1,
                     "millilitres": 1, "l": 1000, "liter": 1000, "liters": 1000, "litre": 1000,
                     "litres": 1000, "oz": 29.5735, "fl oz": 29.5735, "floz": 29.5735,
                     "cup": 236.588, "cups": 236.588},
    "active_minutes": {"": 1, "min": 1, "mins": 1, "minute": 1, "minutes": 1, "h": 60, "hr": 60,
                       "hours": 60},
}
_TYPE_TO_METRIC = {alias: metric for metric, aliases in METRIC_ALIASES.items() for alias in aliases}


def canonical_metric(measurement_type: str) -> str | None:
    return _TYPE_TO_METRIC.get(re.sub(r"[\s\-]+", "_", measurement_type.strip().lower()))


def to_canonical_unit(metric: str, value: float, unit: str) -> float | None:
    """The value in the metric's canonical unit; None for a unit we cannot convert."""
    factors = _UNIT_FACTORS.get(metric)
    if factors is None:
        return value
    factor = factors.get(unit.strip().lower().replace(".", ""))
    return None if factor is None else value * factor


@dataclass(frozen=True)
class MetricSummary:
    metric: str
    days: int            # days with data in the lookback window
    count: int           # measurements used
    mean: float          # mean of the daily values (totals for additive metrics)
    first: float         # first daily value
    latest: float        # last daily value
    slope: float         # per day, least squares
    direction: str       # rising | falling | flat

    @property
    def change(self) -> float:
        return self.latest - self.first


def summarise_metric(metric: str, points: list[tuple[datetime, float]], *, end: date,
                     window: int = LOOKBACK_DAYS) -> MetricSummary | None:
    start = trends.window_start(end, window)
    per_day: dict[int, list[float]] = defaultdict(list)
    for captured_at, value in points:
        index = (captured_at.astimezone(timezone.utc).date() - start).days
        if 0 <= index < window:
            per_day[index].append(value)
    if not per_day:
        return None
    xs = sorted(per_day)
    ys = [math.fsum(per_day[x]) if metric in ADDITIVE else math.fsum(per_day[x]) / len(per_day[x])
          for x in xs]
    slope, _, _ = trends.least_squares([float(x) for x in xs], ys)
    direction = trends.direction_of(slope, xs[-1] - xs[0], ys) if len(xs) >= 2 else "flat"
    return MetricSummary(metric=metric, days=len(xs), count=sum(len(v) for v in per_day.values()),
                         mean=math.fsum(ys) / len(ys), first=ys[0], latest=ys[-1], slope=slope,
                         direction=direction)


@dataclass(frozen=True)
class BeliefInput:
    statement: str
    confidence: float


@dataclass(frozen=True)
class Preferences:
    time_of_day: str | None = None
    intensity: str | None = None
    minutes_per_day: int | None = None


@dataclass(frozen=True)
class TemplateInput:
    id: uuid.UUID
    habit_type: str
    name: str
    cue: str
    routine: str
    reward: str
    dd_protocol: dict[str, Any]

    @classmethod
    def of(cls, t: ProtocolTemplate) -> "TemplateInput":
        return cls(t.id, t.habit_type, t.name, t.cue, t.routine, t.reward, dict(t.dd_protocol_json or {}))


@dataclass(frozen=True)
class UserInputs:
    metrics: dict[str, MetricSummary]
    beliefs: list[BeliefInput]
    gaps: dict[str, str]          # bucket -> status, for buckets not completed
    skipped_units: dict[str, list[str]] = field(default_factory=dict)


async def gather_inputs(session: AsyncSession, user_id: uuid.UUID, *, today: date | None = None,
                        lookback_days: int = LOOKBACK_DAYS) -> UserInputs:
    today = today or utcnow().date()
    start = trends.window_start(today, lookback_days)
    lower = datetime.combine(start, time.min, tzinfo=timezone.utc)
    upper = datetime.combine(today + timedelta(days=1), time.min, tzinfo=timezone.utc)
    spellings = sorted({variant for alias in _TYPE_TO_METRIC
                        for variant in (alias, alias.replace("_", " "), alias.replace("_", "-"))})
    rows = (await session.execute(
        select(Measurement.type, Measurement.value, Measurement.unit, Measurement.captured_at)
        .where(Measurement.user_id == user_id, func.lower(Measurement.type).in_(spellings),
               Measurement.captured_at >= lower, Measurement.captured_at < upper)
        .order_by(Measurement.captured_at, Measurement.id))).all()
    points: dict[str, list[tuple[datetime, float]]] = defaultdict(list)
    skipped: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        metric = canonical_metric(row.type)
        if metric is None:
            continue
        value = to_canonical_unit(metric, row.value, row.unit)
        if value is None:
            skipped[metric].add(row.unit)
            continue
        points[metric].append((row.captured_at, value))
    metrics = {}
    for metric in sorted(points):
        summary = summarise_metric(metric, points[metric], end=today, window=lookback_days)
        if summary is not None:
            metrics[metric] = summary
    belief_rows = (await session.execute(
        select(Belief.statement, Belief.confidence)
        .join(BeliefSystem, Belief.belief_system_id == BeliefSystem.id)
        .join(SelfModel, BeliefSystem.self_model_id == SelfModel.id)
        .where(SelfModel.user_id == user_id)
        .order_by(Belief.created_at, Belief.statement, Belief.id))).all()
    return UserInputs(metrics=metrics,
                      beliefs=[BeliefInput(r.statement, float(r.confidence)) for r in belief_rows],
                      gaps=await checklist.gaps(session, user_id),
                      skipped_units={m: sorted(u) for m, u in sorted(skipped.items())})


# --- habit knowledge -----------------------------------------------------------------------------

@dataclass(frozen=True)
class HabitProfile:
    base_minutes: int
    days_per_week: int
    default_time: str
    keywords: tuple[str, ...]
    tracking: str


PROFILES: dict[str, HabitProfile] = {
    "sleep": HabitProfile(30, 7, "evening", ("sleep", "asleep", "bed", "rest", "tired", "insomnia",
                                             "nap", "wake", "night", "midnight"),
                          "your sleep hours each morning"),
    "exercise": HabitProfile(30, 4, "morning", ("exercise", "workout", "work out", "walk", "run",
                                                "gym", "train", "active", "fitness", "cardio",
                                                "strength", "steps", "sport", "move"),
                             "your steps and active minutes"),
    "nutrition": HabitProfile(15, 7, "evening", ("eat", "food", "diet", "meal", "nutrition",
                                                 "vegetable", "sugar", "snack", "cook", "weight"),
                              "your weight once a week"),
    "hydration": HabitProfile(5, 7, "morning", ("water", "drink", "hydrat", "thirst", "fluid"),
                              "your water intake"),
    "mindfulness": HabitProfile(10, 7, "morning", ("stress", "anxi", "calm", "meditat", "mindful",
                                                   "breath", "relax", "focus", "worry", "journal"),
                                "your stress level (1-10) once a day"),
    "recovery": HabitProfile(15, 3, "evening", ("recover", "rest", "sore", "stretch", "mobility",
                                                "injur", "fatigue", "tired"),
                             "your resting heart rate each morning"),
    "social": HabitProfile(20, 2, "afternoon", ("friend", "family", "social", "lonel", "people",
                                                "connect", "community", "talk"),
                           "who you connected with"),
}
GENERIC_PROFILE = HabitProfile(15, 5, "morning", (), "how the habit went each day")

START_TIMES = {"morning": "07:30", "afternoon": "13:00", "evening": "20:00"}
START_TIME_OVERRIDES = {("sleep", "evening"): "21:30", ("nutrition", "evening"): "18:30"}

_TIME_WORDS = {
    "morning": re.compile(r"\b(morning|wake|waking|breakfast|coffee|sunrise)\b"),
    "afternoon": re.compile(r"\b(lunch|afternoon|midday|noon)\b"),
    "evening": re.compile(r"\b(evening|bedtime|bed|night|dinner|tonight)\b"),
}
_NEGATIVE = re.compile(r"\b(can't|cannot|can not|don't|do not|doesn't|never|won't|unable|"
                       r"struggl\w*|hate|hard|difficult|fail\w*|not|no time|too tired|too busy|"
                       r"impossible|bad at)\b")


def template_time_of_day(template: TemplateInput, profile: HabitProfile) -> str:
    """When the template's own name and cue say it happens; else the habit's default."""
    text = f"{template.name} {template.cue}".lower()
    scores = {slot: len(pattern.findall(text)) for slot, pattern in _TIME_WORDS.items()}
    best = max(scores.values())
    winners = [slot for slot in TIMES_OF_DAY if scores[slot] == best]
    return winners[0] if best > 0 and len(winners) == 1 else profile.default_time


def belief_efficacy(belief: BeliefInput) -> float:
    """How much a belief supports doing the habit, 0..1: the confidence of a positive statement,
    or one minus the confidence of a negative one ("I can't ...")."""
    negative = _NEGATIVE.search(belief.statement.lower().replace("\u2019", "'")) is not None
    return 1.0 - belief.confidence if negative else belief.confidence


def relevant_beliefs(beliefs: list[BeliefInput], habit_type: str, profile: HabitProfile) -> list[BeliefInput]:
    """Beliefs that mention the habit: a keyword at the start of a word ("hydrat" → hydration)."""
    words = profile.keywords + (habit_type.replace("_", " "),)
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + ")")
    return [b for b in beliefs if pattern.search(b.statement.lower())]


def _quote(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return f"“{text if len(text) <= limit else text[:limit - 1] + '…'}”"


def _round_to(value: float, step: float) -> float:
    return math.floor(value / step + 0.5) * step


def _fmt(metric: str, value: float) -> str:
    if metric == "sleep_hours":
        return f"{value:.1f} h"
    if metric == "steps":
        return f"{value:,.0f} steps"
    if metric == "weight":
        return f"{value:.1f} kg"
    if metric == "water_intake":
        return f"{value:,.0f} ml"
    if metric == "active_minutes":
        return f"{value:.0f} min"
    if metric == "resting_heart_rate":
        return f"{value:.0f} bpm"
    if metric == "hrv":
        return f"{value:.0f} ms"
    return f"{value:.1f}"


def _over(summary: MetricSummary) -> str:
    noun = "day" if summary.days == 1 else "days"
    return f"over {summary.days} {noun} with data in the last {LOOKBACK_DAYS} days"


def _trend_phrase(summary: MetricSummary) -> str:
    unit = CANONICAL_UNIT.get(summary.metric, "")
    return (f"{summary.direction} ({_fmt(summary.metric, summary.first)} → "
            f"{_fmt(summary.metric, summary.latest)}, {summary.slope:+.2f}{' ' + unit if unit else ''} per day)")


@dataclass
class _Plan:
    intensity_hint: str | None = None
    minutes_factor: float = 1.0
    days_delta: int = 0
    targets: dict[str, Any] = field(default_factory=dict)
    steps: list[str] = field(default_factory=list)        # extra routine instructions
    reasons: list[str] = field(default_factory=list)
    needs_tracking: bool = False


def _sleep_rules(m: dict[str, MetricSummary], plan: _Plan) -> None:
    sleep = m.get("sleep_hours")
    if sleep is None:
        plan.targets["sleep_hours"] = 7.5
        plan.needs_tracking = True
        plan.reasons.append(f"No sleep measurements in the last {LOOKBACK_DAYS} days, so the "
                            "standard 7.5 h target is used until your own data comes in.")
    elif sleep.mean < 7.0:
        weeks = math.ceil(round((7.0 - sleep.mean) * 4, 6))
        plan.targets.update(sleep_hours=7.0, bedtime_shift_minutes_per_week=15, weeks_to_target=weeks)
        plan.steps.append(f"Move your bedtime 15 minutes earlier each week for {weeks} week(s) "
                          "until you sleep 7 hours.")
        plan.minutes_factor *= 1.25
        plan.reasons.append(f"Sleep averaged {_fmt('sleep_hours', sleep.mean)} a night {_over(sleep)}, "
                            f"below the 7 h adults need: bedtime moves 15 minutes earlier per week "
                            f"for {weeks} week(s) and the wind-down is longer.")
    elif sleep.mean > 9.0:
        plan.targets["sleep_hours"] = 8.0
        plan.reasons.append(f"Sleep averaged {_fmt('sleep_hours', sleep.mean)} a night {_over(sleep)}, "
                            "more than 9 h: the plan aims for a steadier 8.0 h with a fixed wake time.")
    else:
        target = _round_to(sleep.mean, 0.25)
        plan.targets["sleep_hours"] = target
        plan.reasons.append(f"Sleep averaged {_fmt('sleep_hours', sleep.mean)} a night {_over(sleep)}, "
                            f"within the healthy 7-9 h range: the plan keeps it at about {target:.2f} h "
                            "and focuses on consistency.")
    if sleep is not None and sleep.direction == "falling":
        plan.minutes_factor *= 1.2
        plan.reasons.append(f"Sleep duration is {_trend_phrase(sleep)}, so the routine gets extra time.")
    rhr = m.get("resting_heart_rate")
    if rhr is not None and rhr.direction == "rising":
        plan.reasons.append(f"Resting heart rate is {_trend_phrase(rhr)}, a common sign of poor "
                            "recovery that better sleep helps.")


def _exercise_rules(m: dict[str, MetricSummary], plan: _Plan) -> None:
    steps = m.get("steps")
    if steps is None:
        plan.targets["daily_steps"] = 7000
        plan.needs_tracking = True
        plan.reasons.append(f"No step counts in the last {LOOKBACK_DAYS} days, so the default "
                            "target of 7,000 steps a day is used.")
    else:
        target = int(min(15000, max(3000, _round_to(max(steps.mean * 1.1, steps.mean + 1000), 500))))
        plan.targets["daily_steps"] = target
        if steps.mean < 5000:
            plan.intensity_hint = "low"
            level = "below 5,000 a day, so the plan starts at low intensity"
        elif steps.mean >= 10000:
            plan.intensity_hint = "high"
            level = "already above 10,000 a day, so the plan can use high intensity"
        else:
            plan.intensity_hint = "moderate"
            level = "between 5,000 and 10,000 a day, so the plan uses moderate intensity"
        plan.reasons.append(f"Steps averaged {_fmt('steps', steps.mean)} a day {_over(steps)}, {level}; "
                            f"the new daily target is {target:,} steps.")
    active = m.get("active_minutes")
    if active is not None:
        weekly = active.mean * active.days / LOOKBACK_DAYS * 7
        plan.targets["weekly_active_minutes"] = 150
        if weekly < 150:
            plan.days_delta += 1
            plan.reasons.append(f"Logged activity comes to about {weekly:.0f} minutes a week, short of "
                                "the 150-minute guideline: one more session a week.")
        else:
            plan.reasons.append(f"Logged activity comes to about {weekly:.0f} minutes a week, meeting "
                                "the 150-minute guideline.")
    weight = m.get("weight")
    if weight is not None and weight.direction == "rising":
        plan.days_delta += 1
        plan.reasons.append(f"Weight is {_trend_phrase(weight)}: one extra session a week.")
    rhr = m.get("resting_heart_rate")
    if rhr is not None and rhr.direction == "rising":
        plan.intensity_hint = "low"
        plan.reasons.append(f"Resting heart rate is {_trend_phrase(rhr)}, so intensity is kept low "
                            "until it settles.")


def _nutrition_rules(m: dict[str, MetricSummary], plan: _Plan) -> None:
    weight = m.get("weight")
    if weight is None:
        plan.needs_tracking = True
        plan.reasons.append(f"No weight measurements in the last {LOOKBACK_DAYS} days; weigh in "
                            "weekly so the effect of the habit can be seen.")
        return
    if weight.direction == "rising":
        plan.targets["weight_change_kg_per_week"] = -0.25
        plan.minutes_factor *= 1.2
        plan.reasons.append(f"Weight is {_trend_phrase(weight)} {_over(weight)}: the plan aims to "
                            "reverse it gently (about 0.25 kg a week) with more time for meals.")
    elif weight.direction == "falling":
        plan.targets["weight_change_kg_per_week"] = 0.0
        plan.reasons.append(f"Weight is {_trend_phrase(weight)} {_over(weight)}: the plan focuses on "
                            "meal quality rather than eating less.")
    else:
        plan.targets["weight_change_kg_per_week"] = 0.0
        plan.reasons.append(f"Weight is stable at about {_fmt('weight', weight.mean)} {_over(weight)}: "
                            "the plan keeps it there.")


def _hydration_rules(m: dict[str, MetricSummary], plan: _Plan) -> None:
    weight = m.get("weight")
    if weight is not None:
        target = int(min(4000, max(1500, _round_to(weight.latest * 33, 250))))
        plan.reasons.append(f"At {_fmt('weight', weight.latest)} (latest), about 33 ml per kg gives a "
                            f"daily target of {target:,} ml.")
    else:
        target = 2000
        plan.reasons.append("No recent weight to size the target, so the standard 2,000 ml a day is used.")
    steps = m.get("steps")
    if steps is not None and steps.mean >= 10000:
        target += 500
        plan.reasons.append(f"Steps averaged {_fmt('steps', steps.mean)} a day, so 500 ml is added "
                            "for activity.")
    plan.targets["water_ml"] = target
    water = m.get("water_intake")
    if water is None:
        plan.needs_tracking = True
        plan.reasons.append(f"No water intake logged in the last {LOOKBACK_DAYS} days; log each refill.")
    elif water.mean < target:
        weeks = math.ceil((target - water.mean) / 250)
        plan.targets["weeks_to_target"] = weeks
        plan.steps.append(f"Add about 250 ml a day each week for {weeks} week(s) until you reach "
                          f"{target:,} ml.")
        plan.reasons.append(f"Water intake averaged {_fmt('water_intake', water.mean)} a day "
                            f"{_over(water)}, {target - water.mean:,.0f} ml short of the target: "
                            f"+250 ml per week for {weeks} week(s).")
    else:
        plan.reasons.append(f"Water intake averaged {_fmt('water_intake', water.mean)} a day "
                            f"{_over(water)}, already at the target: the plan keeps it steady.")


def _mindfulness_rules(m: dict[str, MetricSummary], plan: _Plan) -> None:
    stress, hrv, sleep = m.get("stress"), m.get("hrv"), m.get("sleep_hours")
    if stress is not None:
        if stress.direction == "rising":
            plan.minutes_factor *= 1.5
            plan.reasons.append(f"Stress readings are {_trend_phrase(stress)}: sessions are 50% longer.")
        else:
            plan.reasons.append(f"Stress readings averaged {_fmt('stress', stress.mean)} {_over(stress)} "
                                f"and are {stress.direction}.")
    else:
        plan.needs_tracking = True
        plan.reasons.append(f"No stress readings in the last {LOOKBACK_DAYS} days; rate your stress "
                            "before and after each session.")
    if hrv is not None and hrv.direction == "falling":
        plan.minutes_factor *= 1.25
        plan.reasons.append(f"HRV is {_trend_phrase(hrv)}, a sign of accumulated stress: longer sessions.")
    if sleep is not None and sleep.mean < 7.0:
        plan.steps.append("On short-sleep days, repeat a brief session before bed.")
        plan.reasons.append(f"Sleep averaged {_fmt('sleep_hours', sleep.mean)} a night, so a short "
                            "evening repeat is added.")


def _recovery_rules(m: dict[str, MetricSummary], plan: _Plan) -> None:
    hrv, rhr, sleep, steps = (m.get("hrv"), m.get("resting_heart_rate"), m.get("sleep_hours"),
                              m.get("steps"))
    strained = []
    if hrv is not None and hrv.direction == "falling":
        strained.append(f"HRV is {_trend_phrase(hrv)}")
    if rhr is not None and rhr.direction == "rising":
        strained.append(f"resting heart rate is {_trend_phrase(rhr)}")
    if strained:
        plan.intensity_hint = "low"
        plan.days_delta += 1
        plan.reasons.append("Recovery looks strained (" + "; ".join(strained) + "): one more gentle "
                            "session a week, at low intensity.")
    elif hrv is None and rhr is None:
        plan.needs_tracking = True
        plan.reasons.append(f"No HRV or resting heart rate in the last {LOOKBACK_DAYS} days to judge "
                            "recovery; measure resting heart rate each morning.")
    else:
        known = [s for s in (hrv, rhr) if s is not None]
        plan.reasons.append("Recovery markers look steady (" + "; ".join(
            f"{LABEL[s.metric]} averaged {_fmt(s.metric, s.mean)} and is {s.direction}" for s in known) + ").")
    if sleep is not None and sleep.mean < 7.0:
        plan.steps.append("On rest days, go to bed 30 minutes earlier.")
        plan.reasons.append(f"Sleep averaged {_fmt('sleep_hours', sleep.mean)} a night, below 7 h: "
                            "rest days include an earlier night.")
    if steps is not None and steps.mean >= 12000:
        plan.days_delta += 1
        plan.reasons.append(f"Steps averaged {_fmt('steps', steps.mean)} a day, a high training load: "
                            "one more recovery session a week.")


def _social_rules(m: dict[str, MetricSummary], plan: _Plan) -> None:
    stress, steps = m.get("stress"), m.get("steps")
    if stress is not None and stress.direction == "rising":
        plan.days_delta += 1
        plan.reasons.append(f"Stress readings are {_trend_phrase(stress)}: one more social contact a week.")
    if steps is not None and steps.mean < 5000:
        plan.steps.append("Where you can, meet on foot: a walk together counts twice.")
        plan.reasons.append(f"Steps averaged {_fmt('steps', steps.mean)} a day, so walking meet-ups "
                            "are suggested.")
    if stress is None and steps is None:
        plan.reasons.append(f"No stress or step data in the last {LOOKBACK_DAYS} days; the plan uses "
                            "the template's defaults.")


RULES = {"sleep": _sleep_rules, "exercise": _exercise_rules, "nutrition": _nutrition_rules,
         "hydration": _hydration_rules, "mindfulness": _mindfulness_rules,
         "recovery": _recovery_rules, "social": _social_rules}


# --- personalisation (pure) ----------------------------------------------------------------------

def _shift(intensity: str, steps: int) -> str:
    index = min(len(INTENSITIES) - 1, max(0, INTENSITIES.index(intensity) + steps))
    return INTENSITIES[index]


def _minutes(value: float) -> int:
    return int(min(MAX_MINUTES, max(MIN_MINUTES, _round_to(value, 5))))


def personalise(template: TemplateInput, inputs: UserInputs,
                preferences: Preferences | None = None) -> dict[str, Any]:
    """Template + the user's data + preferences → {protocol, rationale}. Pure and deterministic."""
    preferences = preferences or Preferences()
    habit = template.habit_type
    profile = PROFILES.get(habit, GENERIC_PROFILE)
    plan = _Plan()
    rationale: list[str] = [f"Based on the template “{template.name}” ({habit})."]

    rules = RULES.get(habit)
    if rules is not None:
        rules(inputs.metrics, plan)
    else:
        plan.reasons.append(f"There are no data rules for the habit type “{habit}”; the template's "
                            "defaults are used.")
    for metric, units in inputs.skipped_units.items():
        plan.reasons.append(f"Some {LABEL[metric]} measurements were left out because their unit "
                            f"could not be converted ({', '.join(repr(u) for u in units)}).")

    # beliefs: how much does the user believe they can do this?
    beliefs = relevant_beliefs(inputs.beliefs, habit, profile)
    efficacy = math.fsum(belief_efficacy(b) for b in beliefs) / len(beliefs) if beliefs else None
    cited = sorted(beliefs, key=lambda b: -abs(belief_efficacy(b) - 0.5))[:3]
    for b in cited:
        reading = ("supports" if belief_efficacy(b) >= HIGH_CONFIDENCE else
                   "undermines" if belief_efficacy(b) < LOW_CONFIDENCE else "is neutral about")
        plan.reasons.append(f"Your belief {_quote(b.statement)} (confidence {b.confidence:.2f}) "
                            f"{reading} this habit.")
    low_efficacy = efficacy is not None and efficacy < LOW_CONFIDENCE
    high_efficacy = efficacy is not None and efficacy >= HIGH_CONFIDENCE
    if low_efficacy:
        plan.reasons.append(f"Overall confidence about this habit is low ({efficacy:.2f} of 1), so the "
                            "protocol starts smaller and builds up over two weeks.")
    elif high_efficacy:
        plan.reasons.append(f"Overall confidence about this habit is high ({efficacy:.2f} of 1), so no "
                            "extra ramp-up is needed.")
    elif not beliefs:
        plan.reasons.append("No beliefs about this habit are recorded yet; the standard ramp is used.")

    # intensity
    if preferences.intensity:
        intensity = preferences.intensity
        rationale_intensity = f"Intensity is {intensity}, as you asked."
    else:
        intensity = plan.intensity_hint or "moderate"
        if low_efficacy:
            intensity = _shift(intensity, -1)
        rationale_intensity = (f"Intensity is set to {intensity} from the data"
                               f"{' and your confidence' if low_efficacy else ''} above.")

    # days per week
    days = profile.days_per_week
    if habit == "exercise":
        days = {"low": 3, "moderate": 4, "high": 5}[intensity]
    days = min(7, max(1, days + plan.days_delta))

    # minutes per day
    if preferences.minutes_per_day:
        minutes = int(preferences.minutes_per_day)
        rationale_minutes = f"{minutes} minutes a day, as you asked."
    else:
        minutes = _minutes(profile.base_minutes * INTENSITY_FACTOR[intensity] * plan.minutes_factor)
        rationale_minutes = (f"{minutes} minutes a day: {profile.base_minutes} is the starting point "
                             f"for {habit.replace('_', ' ')} habits, adjusted for {intensity} intensity"
                             + (" and the data above." if plan.minutes_factor != 1.0 else "."))

    # time of day
    if preferences.time_of_day:
        time_of_day = preferences.time_of_day
        rationale_time = f"Scheduled in the {time_of_day}, as you asked."
    else:
        time_of_day = template_time_of_day(template, profile)
        rationale_time = f"Scheduled in the {time_of_day}, when the template's cue happens."
    start_time = START_TIME_OVERRIDES.get((habit, time_of_day), START_TIMES[time_of_day])

    # checklist gaps
    gaps = inputs.gaps
    tracking_gaps = [code for code in ("measurements", "health_device") if code in gaps]
    if tracking_gaps:
        plan.needs_tracking = True
        plan.reasons.append("Onboarding checklist: " + " and ".join(
            f"“{checklist.BUCKETS[code]}” is {gaps[code]}" for code in tracking_gaps)
            + ", so the routine includes a logging step.")
    # phases: a ramp for low confidence (2 weeks at half) or a first protocol (1 week at 3/4)
    first_protocol = "protocols" in gaps
    if low_efficacy:
        ramp = (2, 0.5, days - 2 if days > 3 else days)
    elif first_protocol and not high_efficacy:
        ramp = (1, 0.75, days)
    else:
        ramp = None
    phases = [{"week_from": 1, "week_to": None, "minutes_per_day": minutes, "days_per_week": days}]
    if ramp is not None:
        weeks, share, ramp_days = ramp
        ramp_minutes = int(max(1, min(minutes, _round_to(minutes * share, 5) or minutes)))
        if (ramp_minutes, ramp_days) != (minutes, days):
            phases = [{"week_from": 1, "week_to": weeks, "minutes_per_day": ramp_minutes,
                       "days_per_week": ramp_days},
                      {"week_from": weeks + 1, "week_to": None, "minutes_per_day": minutes,
                       "days_per_week": days}]
    if first_protocol:
        status = gaps["protocols"]
        if len(phases) > 1 and not low_efficacy:
            plan.reasons.append(f"Onboarding checklist: “Protocols” is {status}, so this is treated as "
                                "your first protocol and the first week is shorter.")
        elif high_efficacy:
            plan.reasons.append(f"Onboarding checklist: “Protocols” is {status}, so this is your first "
                                "protocol, but your confidence is high enough to start at full length.")
        else:
            plan.reasons.append(f"Onboarding checklist: “Protocols” is {status}, so this is treated as "
                                "your first protocol.")

    routine_parts = [template.routine,
                     f"Do it for {phases[0]['minutes_per_day']} minutes on {phases[0]['days_per_week']} "
                     f"days a week at {intensity} intensity"
                     + (f", then {minutes} minutes on {days} days a week from week {phases[1]['week_from']}."
                        if len(phases) > 1 else ".")]
    routine_parts += plan.steps
    if plan.needs_tracking:
        routine_parts.append(f"Afterwards, log {profile.tracking} so progress can be measured.")
    cue = f"{template.cue} Planned for the {time_of_day}, around {start_time}."
    routine = " ".join(routine_parts)
    name = f"{template.name} (personalised)"
    schedule = {"time_of_day": time_of_day, "start_time": start_time, "minutes_per_day": minutes,
                "days_per_week": days, "intensity": intensity, "phases": phases,
                "targets": dict(sorted(plan.targets.items())), "review_after_days": 14}
    summary = (f"{minutes} min/day, {days} days/week, {time_of_day} around {start_time}, "
               f"{intensity} intensity")
    targets_text = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in schedule["targets"].items())
    base_dd = template.dd_protocol
    dd_protocol = {
        "name": name,
        "description": f"{base_dd.get('description') or template.routine} Personalised: {summary}.",
        "goal": (base_dd.get("goal") or template.reward) + (f" Targets: {targets_text}." if targets_text else ""),
        "category": base_dd.get("category") or habit.replace("_", " ").title(),
        "type": base_dd.get("type") or "Habit",
        "status": "Draft",
        "sections": [{"title": "Cue", "content": cue}, {"title": "Routine", "content": routine},
                     {"title": "Reward", "content": template.reward},
                     {"title": "Schedule", "content": summary + "."}],
    }
    rationale += plan.reasons + [rationale_intensity, rationale_minutes, rationale_time]
    return {"protocol": {"name": name, "habit_type": habit, "cue": cue, "routine": routine,
                         "reward": template.reward, "schedule": schedule, "dd_protocol": dd_protocol},
            "rationale": rationale}


async def generate(session: AsyncSession, user_id: uuid.UUID, template_id: uuid.UUID,
                   preferences: Preferences | None = None, *, today: date | None = None) -> dict[str, Any]:
    """Unknown user or template → 404; otherwise {template_id, user_id, protocol, rationale}."""
    await get_user(session, user_id)
    template = await get_template(session, template_id)
    inputs = await gather_inputs(session, user_id, today=today)
    result = personalise(TemplateInput.of(template), inputs, preferences)
    return {"template_id": template.id, "user_id": user_id, **result}


