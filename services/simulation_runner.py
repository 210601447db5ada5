"""Running one simulation job (SPEC §4.9 steps 2–5), with no Ray in it.

- `build_plan` turns a job row into everything the simulation needs (template, persona from
  the user's profile, the coach's role and context).
- `run_simulation` runs it: DeepEval's `ConversationSimulator` with an LLM simulated user, an
  LLM coach (or the Epistemic Me dialectic), scored by DeepEval conversational metrics; or,
  when no LLM is configured, the scripted generator, whose metrics are reported as not
  computed. It blocks, and must run outside any event loop (DeepEval's simulator fails inside
  uvloop): `JobProcessor` runs it on a worker thread with a fresh default asyncio loop.
- `write_back` stores the result in one transaction, at most once per job.
- `JobProcessor` ties a claimed queue item to all of the above, including retries.

DeepEval is imported lazily, only here and only when a simulation runs.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import AppError, UpstreamError
from services import checklist
from services import simulation_jobs as jobs
from services.simulation_templates import (SimulationConfig, load_user_context,
                                           resolve_template)
from storage.db import Database
from storage.models import Conversation, SimulationJob, Turn
from storage.queue import ClaimedJob, ReliableQueue
from storage.types import utcnow

os.environ.setdefault("DEEPEVAL_TELEMETRY_OPT_OUT", "1")
os.environ.setdefault("DEEPEVAL_DISABLE_DOTENV", "1")

log = logging.getLogger(__name__)

METRICS_TURN_HEADER = "[DeepEval Simulation Metrics]"
MAX_TURN_CHARS = 32_000
NO_LLM_REASON = ("Not computed: no LLM endpoint is configured (SMA_LLM_BASE_URL), so the "
                 "scripted generator wrote this conversation and there is no judge model. "
                 "Scores are never invented.")


# --- the plan -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SimulationPlan:
    job_id: str
    user_id: str
    template: str
    scenario: str
    expected_outcome: str
    persona: str
    persona_source: str          # profile | config
    coach: str                   # llm | epistemic
    coach_role: str
    user_context: str
    topics: tuple[str, ...]
    metrics: tuple[str, ...]
    max_turns: int
    seed: int

    @property
    def coach_prompt(self) -> str:
        return (f"{self.coach_role}\n\nWhat you know about this user from their profile: "
                f"{self.user_context}")


async def build_plan(session: AsyncSession, job: SimulationJob) -> SimulationPlan:
    config = SimulationConfig.model_validate(job.config)
    template = resolve_template(job.template)
    context = await load_user_context(session, job.user_id)
    return SimulationPlan(
        job_id=str(job.id), user_id=str(job.user_id), template=template.name,
        scenario=config.scenario or template.scenario,
        expected_outcome=config.expected_outcome or template.expected_outcome,
        persona=config.persona or context.persona(),
        persona_source="config" if config.persona else "profile",
        coach=config.coach, coach_role=template.coach_role, user_context=context.summary(),
        topics=template.topics, metrics=tuple(config.resolved_metrics()),
        max_turns=config.max_turns, seed=int(config.seed or 0))


# --- the result -----------------------------------------------------------------------------

@dataclass
class SimulatedTurn:
    role: str           # user | assistant
    content: str
    generated_by: str   # deepeval | llm_coach | epistemic_me | scripted


@dataclass
class SimulationResult:
    turns: list[SimulatedTurn]
    metrics: dict[str, dict[str, Any]]
    models: dict[str, str]
    generated_by: str                # deepeval | scripted
    usage: dict[str, dict[str, Any]] = field(default_factory=dict)  # by role
    cost_usd: float | None = None
    duration_seconds: float = 0.0
    extra_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> dict[str, int]:
        total = {"prompt": 0, "completion": 0, "total": 0}
        for usage in self.usage.values():
            total["prompt"] += usage.get("prompt_tokens", 0)
            total["completion"] += usage.get("completion_tokens", 0)
            total["total"] += usage.get("total_tokens", 0)
        return total

    def summary(self) -> dict[str, Any]:
        """What the job row keeps: enough for lists and bulk reports without the turns."""
        computed = [m for m in self.metrics.values() if m.get("computed")]
        return {"scores": {name: m.get("score") for name, m in self.metrics.items()},
                "success": {name: m.get("success") for name, m in self.metrics.items()},
                "computed": bool(computed) and len(computed) == len(self.metrics),
                "judge_model": self.models.get("judge"),
                "turns": len(self.turns), "generated_by": self.generated_by,
                "duration_seconds": round(self.duration_seconds, 3),
                "tokens": self.tokens, "cost_usd": self.cost_usd}


# --- running it -----------------------------------------------------------------------------

def run_simulation(plan: SimulationPlan, settings: Any) -> SimulationResult:
    """Blocking. Runs on the calling thread with a fresh default asyncio loop (never inside a
    running loop: DeepEval drives its own with `run_until_complete`)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("run_simulation must not run inside an event loop; use a thread")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    started = time.monotonic()
    try:
        if settings.llm_configured:
            result = _run_deepeval(plan, settings, loop)
        else:
            result = _run_scripted(plan, settings, loop)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        asyncio.set_event_loop(None)
    result.duration_seconds = time.monotonic() - started
    return result


class EpistemicCoach:
    """The coach as the Epistemic Me dialectic: its questions are the coach turns and each
    simulated user turn is answered into it. The self-model id is the profile user id."""

    def __init__(self, settings: Any, plan: SimulationPlan):
        self.settings = settings
        self.plan = plan
        self.dialectic_id: str | None = None
        self._client: Any = None

    def _epistemic(self) -> Any:
        if self._client is None:
            from clients.epistemic import EpistemicClient
            self._client = EpistemicClient.from_settings(self.settings)
        return self._client

    async def _ensure_self_model(self) -> None:
        client = self._epistemic()
        try:
            await client.get_self_model(self.plan.user_id)
        except AppError as exc:
            if exc.status_code not in (404, 502):
                raise
            # Only when missing: CreateSelfModel replaces an existing self-model with an empty one.
            await client.create_self_model(self.plan.user_id)

    async def next_question(self, answer: str) -> str:
        client = self._epistemic()
        if self.dialectic_id is None:
            await self._ensure_self_model()
            dialectic = await client.create_dialectic(
                self.plan.user_id, learning_objective={
                    "description": self.plan.expected_outcome, "topics": list(self.plan.topics),
                    "target_belief_type": "STATEMENT", "completion_percentage": 0})
            self.dialectic_id = dialectic.id
        else:
            dialectic = await client.update_dialectic(self.dialectic_id, self.plan.user_id, answer)
        pending = dialectic.pending_interaction
        question = pending.question if pending else ""
        if not question:
            raise UpstreamError("Epistemic Me returned no next question",
                                details={"dialectic_id": self.dialectic_id})
        return question

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def _history(turns: list[Any]) -> list[dict[str, str]]:
    return [{"role": t.role, "content": t.content} for t in turns]


def _run_deepeval(plan: SimulationPlan, settings: Any, loop: asyncio.AbstractEventLoop) -> SimulationResult:
    from clients.llm import models_from_settings
    from deepeval.dataset import ConversationalGolden, Persona
    from deepeval.simulator import ConversationSimulator
    from deepeval.test_case import Turn as DeepEvalTurn

    coach_model, user_model, judge = models_from_settings(
        settings, prompt_price_per_1k=settings.llm_prompt_price_per_1k,
        completion_price_per_1k=settings.llm_completion_price_per_1k)
    for model in (coach_model, user_model, judge):
        model.seed = plan.seed
    coach_model.system_prompt = plan.coach_prompt
    epistemic = EpistemicCoach(settings, plan) if plan.coach == "epistemic" else None

    async def coach_turn(input: str, turns: list[DeepEvalTurn]) -> DeepEvalTurn:
        if epistemic is not None:
            return DeepEvalTurn(role="assistant", content=await epistemic.next_question(input))
        return DeepEvalTurn(role="assistant", content=await coach_model.a_chat(_history(turns)))

    try:
        simulator = ConversationSimulator(model_callback=coach_turn, simulator_model=user_model,
                                          async_mode=True, max_concurrent=1)
        golden = ConversationalGolden(scenario=plan.scenario, expected_outcome=plan.expected_outcome,
                                      persona=Persona(characteristics=plan.persona))
        case = simulator.simulate([golden], max_user_simulations=plan.max_turns)[0]
    finally:
        if epistemic is not None:
            loop.run_until_complete(epistemic.aclose())
    case.chatbot_role = plan.coach_role
    coach_by = "epistemic_me" if epistemic is not None else "llm_coach"
    turns = [SimulatedTurn(t.role, t.content, "deepeval" if t.role == "user" else coach_by)
             for t in case.turns]
    if not turns:
        raise UpstreamError("The simulator produced no turns")

    metrics, judge_usage = _score(case, plan.metrics, judge)
    usage = {"simulated_user": user_model.usage, "judge": judge_usage}
    if epistemic is None:
        usage["coach"] = coach_model.usage
    priced = settings.llm_prompt_price_per_1k > 0 or settings.llm_completion_price_per_1k > 0
    cost = round(sum(u.get("cost_usd", 0.0) for u in usage.values()), 6) if priced else None
    models = {"coach": "epistemic_me" if epistemic else coach_model.get_model_name(),
              "simulated_user": user_model.get_model_name(), "judge": judge.get_model_name()}
    extra = {"epistemic_dialectic_id": epistemic.dialectic_id} if epistemic else {}
    return SimulationResult(turns=turns, metrics=metrics, models=models, generated_by="deepeval",
                            usage=usage, cost_usd=cost, extra_meta=extra)


def _metric(name: str, judge: Any) -> Any:
    from deepeval.metrics import (ConversationCompletenessMetric, KnowledgeRetentionMetric,
                                  RoleAdherenceMetric, TurnRelevancyMetric)

    cls = {"conversation_completeness": ConversationCompletenessMetric,
           "turn_relevancy": TurnRelevancyMetric,
           "knowledge_retention": KnowledgeRetentionMetric,
           "role_adherence": RoleAdherenceMetric}[name]
    return cls(model=judge, eval_mode="llm", async_mode=False)


def _score(case: Any, names: tuple[str, ...], judge: Any) -> tuple[dict[str, dict], dict]:
    """Each metric in turn, with the judge's token usage and cost attributed to it."""
    results: dict[str, dict] = {}
    total = {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
             "cost_usd": 0.0}
    for name in names:
        judge.reset_usage()
        metric = _metric(name, judge)
        metric.measure(case, _show_indicator=False)
        usage = judge.usage
        for key in total:
            total[key] += usage[key]
        results[name] = {
            "computed": True, "score": float(metric.score), "reason": metric.reason,
            "success": bool(metric.success), "threshold": metric.threshold,
            "judge_model": metric.evaluation_model,
            "tokens": {"prompt": usage["prompt_tokens"], "completion": usage["completion_tokens"],
                       "total": usage["total_tokens"]},
            "llm_calls": usage["calls"],
            "cost_usd": usage["cost_usd"] if usage["cost_usd"] else metric.evaluation_cost,
        }
    return results, total


# --- the scripted generator -----------------------------------------------------------------

_SCRIPTS: dict[str, dict[str, list[tuple[str, str]]]] = {
    "health_assessment": {
        "user": [
            ("Hi, I'd like an honest look at my health and what to improve first.",
             "Hello, could you help me see where my health stands and what to work on?"),
            ("I sleep about six to seven hours and feel flat in the afternoon.",
             "My energy dips after lunch and I rarely sleep more than seven hours."),
            ("Walking more feels doable. What would a realistic target be?",
             "I could move more during the day. How much would make a difference?"),
            ("A short walk after lunch on weekdays sounds right. I'll log it.",
             "Okay, twenty minutes of walking after lunch, five days a week. I'll track it."),
        ],
        "coach": [
            ("Happy to help. {context} How have your sleep, activity and meals been this week?",
             "Let's start from what we know. {context} What does a typical day look like for you?"),
            ("Thanks. Afternoon dips often follow short sleep. Which would you rather change "
             "first: sleep or daytime activity?",
             "That pattern is common with short sleep. Would you start with sleep or with moving "
             "more during the day?"),
            ("A 20-minute walk after lunch is a good, measurable start. Does that fit your "
             "schedule?",
             "Start small: 20 minutes of walking after lunch on weekdays. Would that work?"),
            ("Great, that is your next step for this week. Log each walk and we will review how "
             "your energy changes.",
             "Agreed. Track each walk this week and we'll look at your afternoon energy together."),
        ],
    },
    "protocol_discussion": {
        "user": [
            ("Hi, I want to start a daily habit that actually sticks.",
             "Hello, I'd like to set up a new healthy routine I can keep."),
            ("Mornings are the calmest part of my day.",
             "I have the most control over my time right after I wake up."),
            ("Stretching for ten minutes after coffee sounds manageable.",
             "I could do a short stretch routine once the coffee is on."),
            ("Let's start on Monday. I'll mark it done in the app each day.",
             "I'll begin next Monday and check it off every morning."),
        ],
        "coach": [
            ("Let's design one protocol together. {context} When in your day do you have the most "
             "room for something new?",
             "Good goal. {context} Which part of your day is most predictable?"),
            ("Then let's anchor it to something you already do each morning as the cue. What "
             "always happens first?",
             "A stable morning is a great cue. What do you do every morning without fail?"),
            ("So the cue is making coffee, the routine is ten minutes of stretching, and the "
             "reward is a calm start. Does that feel right?",
             "Cue: coffee on. Routine: ten minutes of stretching. Reward: a calmer start. Good?"),
            ("Perfect: your protocol starts Monday. Checking it off is part of the reward.",
             "Agreed, starting Monday. Keep it small and tick it off each day."),
        ],
    },
    "belief_exploration": {
        "user": [
            ("Hi, I'd like to think through some of my beliefs about health.",
             "Hello, I want to understand why I believe what I do about my health."),
            ("I believe I can't lose weight without cutting out all carbs.",
             "I think exercise only helps if it's intense."),
            ("Mostly things friends told me, and one diet that worked for a while.",
             "I picked it up from videos and from how I felt after hard workouts."),
            ("I'd say I'm about sixty percent sure now, less than before.",
             "Honestly, maybe half sure. I should test it for myself."),
        ],
        "coach": [
            ("Let's explore them together. {context} What is one belief about your health you "
             "hold strongly?",
             "Gladly. {context} Which health belief guides your choices most?"),
            ("Thanks for putting it into words. Where does that belief come from?",
             "That's a clear statement. What experiences or sources support it?"),
            ("Is there anything you've seen that contradicts it?",
             "What evidence would change your mind about it?"),
            ("How confident are you in it now, from zero to a hundred percent?",
             "Having looked at the evidence, how sure are you of it now?"),
        ],
    },
}


def _scripted_lines(plan: SimulationPlan) -> tuple[list[str], list[str]]:
    script = _SCRIPTS[plan.template]
    rng = random.Random(f"{plan.seed}:{plan.template}")
    context = plan.user_context.rstrip(".") + "."
    users, coaches = [], []
    for i in range(plan.max_turns):
        user_variants = script["user"][i % len(script["user"])]
        coach_variants = script["coach"][i % len(script["coach"])]
        users.append(rng.choice(user_variants))
        coaches.append(rng.choice(coach_variants).format(context=context))
    if plan.persona_source == "config":
        users[0] = f"{users[0]} (About me: {plan.persona})"
    return users, coaches


def _run_scripted(plan: SimulationPlan, settings: Any, loop: asyncio.AbstractEventLoop) -> SimulationResult:
    users, coaches = _scripted_lines(plan)
    epistemic = EpistemicCoach(settings, plan) if plan.coach == "epistemic" else None
    turns: list[SimulatedTurn] = []
    try:
        for user_line, coach_line in zip(users, coaches):
            turns.append(SimulatedTurn("user", user_line, "scripted"))
            if epistemic is not None:
                question = loop.run_until_complete(epistemic.next_question(user_line))
                turns.append(SimulatedTurn("assistant", question, "epistemic_me"))
            else:
                turns.append(SimulatedTurn("assistant", coach_line, "scripted"))
    finally:
        if epistemic is not None:
            loop.run_until_complete(epistemic.aclose())
    metrics = {name: {"computed": False, "score": None, "success": None, "reason": NO_LLM_REASON,
                      "judge_model": None} for name in plan.metrics}
    models = {"generator": "scripted", "coach": "epistemic_me" if epistemic else "scripted",
              "simulated_user": "scripted", "judge": None}
    extra = {"epistemic_dialectic_id": epistemic.dialectic_id} if epistemic else {}
    return SimulationResult(turns=turns, metrics=metrics, models=models, generated_by="scripted",
                            extra_meta=extra)


# --- storing it -----------------------------------------------------------------------------

def metrics_turn_content(metrics: dict[str, dict[str, Any]]) -> str:
    lines = [METRICS_TURN_HEADER]
    for name, m in metrics.items():
        if m.get("computed"):
            verdict = "pass" if m.get("success") else "fail"
            lines.append(f"{name}: {m['score']:.3f} ({verdict}, judge {m.get('judge_model')}) "
                         f"- {m.get('reason') or ''}".rstrip(" -"))
        else:
            lines.append(f"{name}: not computed - {m.get('reason')}")
    return "\n".join(lines)[:MAX_TURN_CHARS]


@dataclass(frozen=True)
class WriteBack:
    written: bool
    status: str
    conversation_id: uuid.UUID | None


async def write_back(session: AsyncSession, plan: SimulationPlan, result: SimulationResult) -> WriteBack:
    """One transaction: the conversation, its turns, the metrics turn (closed) and the job row
    marked succeeded. The first statement locks the job row and only matches a live job with
    no conversation yet, so a retried or duplicated run writes nothing a second time."""
    job_id = uuid.UUID(plan.job_id)
    locked = await session.execute(
        update(SimulationJob).where(SimulationJob.id == job_id,
                                    SimulationJob.status.in_(jobs.LIVE_STATUSES),
                                    SimulationJob.conversation_id.is_(None))
        .values(status="running").execution_options(synchronize_session=False))
    if locked.rowcount != 1:
        row = await session.get(SimulationJob, job_id, populate_existing=True)
        return WriteBack(False, row.status if row else "gone", row.conversation_id if row else None)

    user_id = uuid.UUID(plan.user_id)
    first = await session.scalar(select(func.count()).select_from(Conversation)
                                 .where(Conversation.user_id == user_id)) == 0
    now = utcnow()
    conversation = Conversation(
        user_id=user_id, started_at=now, closed=True,
        meta={"sim": True, "template": plan.template, "job_id": plan.job_id,
              "simulation_type": "conversation", "models": result.models, "seed": plan.seed,
              "generated_by": result.generated_by, "coach": plan.coach,
              "persona_source": plan.persona_source, **result.extra_meta})
    session.add(conversation)
    await session.flush()
    for number, turn in enumerate(result.turns, start=1):
        session.add(Turn(conversation_id=conversation.id, seq=number, role=turn.role,
                         content=(turn.content or "(empty)")[:MAX_TURN_CHARS], created_at=now,
                         extra_json={"turn_number": number, "generated_by": turn.generated_by}))
    session.add(Turn(conversation_id=conversation.id, seq=len(result.turns) + 1, role="system",
                     content=metrics_turn_content(result.metrics), created_at=now,
                     extra_json={"metrics": result.metrics, "usage": result.usage,
                                 "cost_usd": result.cost_usd}))
    if first:
        await checklist.ensure_items(session, user_id)
    await session.flush()
    await session.execute(
        update(SimulationJob).where(SimulationJob.id == job_id)
        .values(status="succeeded", conversation_id=conversation.id, metrics=result.summary(),
                last_error=None, finished_at=utcnow())
        .execution_options(synchronize_session=False))
    return WriteBack(True, "succeeded", conversation.id)


# --- one claimed job, end to end ------------------------------------------------------------

@dataclass(frozen=True)
class JobReport:
    job_id: str
    template: str
    outcome: str                 # succeeded | retry | dead | skipped | lost
    duration_seconds: float
    result: SimulationResult | None = None
    error: str | None = None


def describe_error(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {message}"[:4000]


def is_retryable(exc: BaseException) -> bool:
    """Client-side mistakes (validation, not found, an upstream 4xx other than 408/429) will
    not fix themselves; everything else (5xx, timeouts, outages, bugs) is retried."""
    status = getattr(exc, "status_code", None)
    if isinstance(exc, AppError) and status is not None and 400 <= status < 500:
        return status in (408, 429)
    return True


Simulate = Callable[[SimulationPlan, Any], SimulationResult]


class JobProcessor:
    """Runs claimed jobs for one worker: marks the attempt, simulates on a worker thread,
    writes back, and acks — or records the failure (retry with backoff, or dead)."""

    def __init__(self, db: Database, queue: ReliableQueue, settings: Any, worker_id: str, *,
                 concurrency: int = 1, simulate: Simulate = run_simulation,
                 observer: Callable[[JobReport], None] | None = None):
        self.db = db
        self.queue = queue
        self.settings = settings
        self.worker_id = worker_id
        self.simulate = simulate
        self.observer = observer
        self.executor = ThreadPoolExecutor(max_workers=max(1, concurrency),
                                           thread_name_prefix="simulation")

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def process(self, claimed: ClaimedJob) -> JobReport:
        started = time.monotonic()
        template = str(claimed.data.get("template", "unknown"))

        def report(outcome: str, result: SimulationResult | None = None,
                   error: str | None = None) -> JobReport:
            done = JobReport(claimed.id, template, outcome, time.monotonic() - started, result, error)
            if self.observer is not None:
                self.observer(done)
            return done

        try:
            job_id = uuid.UUID(claimed.id)
            async with self.db.transaction() as session:
                row = await jobs.begin_attempt(session, job_id, claimed.attempt)
                plan = await build_plan(session, row) if row is not None and row.status == "running" else None
            if plan is None:
                return report(await self._skip(claimed, row))
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self.executor, self.simulate, plan, self.settings)
            async with self.db.transaction() as session:
                stored = await write_back(session, plan, result)
            await self.queue.ack(self.worker_id, claimed)
            return report("succeeded" if stored.written else "skipped", result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("simulation job %s attempt %d failed: %s", claimed.id, claimed.attempt,
                        describe_error(exc))
            error = describe_error(exc)
            return report(await self._failed(claimed, exc, error), error=error)

    async def _skip(self, claimed: ClaimedJob, row: SimulationJob | None) -> str:
        """Nothing to run: the job finished, was cancelled or deleted, or is dead already."""
        if row is not None and row.status == "dead":
            await self.queue.bury(self.worker_id, claimed, row.last_error or "dead")
            return "dead"
        await self.queue.ack(self.worker_id, claimed)
        return "skipped"

    async def _failed(self, claimed: ClaimedJob, exc: Exception, error: str) -> str:
        outcome = await self.queue.fail(self.worker_id, claimed, error,
                                        retryable=is_retryable(exc))
        if outcome.action == "lost":
            return "lost"
        job_id = uuid.UUID(claimed.id)
        async with self.db.transaction() as session:
            if outcome.action == "retry":
                await jobs.record_retry(session, job_id, outcome.attempts, error)
            else:
                await jobs.record_dead(session, job_id, outcome.attempts, error)
        return outcome.action
