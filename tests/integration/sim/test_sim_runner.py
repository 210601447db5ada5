"""Running jobs end to end without Ray: the scripted generator, DeepEval against the sandbox
LLM (and the Epistemic Me sandbox as coach), failures with retries, and write-back that never
leaves a second or partial conversation."""
from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import func, select

from core.principal import Principal, TokenKind
from services import beliefs, checklist, measurements, simulation_jobs
from services import simulation_runner as runner
from services.simulation_templates import SimulationConfig, load_user_context
from storage.models import Conversation, SimulationJob, Turn, User
from tests.support.actors import make_user

class WorkerCrash(BaseException):
    """Not an Exception: nothing in the worker may catch it, as with a killed process."""


SERVICE = Principal(token_id=uuid.uuid4(), kind=TokenKind.service)


async def seed_profile(db, user_id):
    now = datetime.now(timezone.utc)
    async with db.transaction() as session:
        await measurements.upsert_measurement(session, user_id=user_id, type="weight", value=82.5,
                                              unit="kg", captured_at=now - timedelta(days=2), source="scale")
        await measurements.upsert_measurement(session, user_id=user_id, type="weight", value=81.0,
                                              unit="kg", captured_at=now - timedelta(days=1), source="scale")
        await measurements.upsert_measurement(session, user_id=user_id, type="sleep_hours", value=6.2,
                                              unit="h", captured_at=now - timedelta(days=1), source="")
        model = await beliefs.ensure_self_model(session, user_id)
        system = await beliefs.ensure_belief_system(session, model.id, "default")
        await beliefs.create_belief(session, system, beliefs.BeliefInput(
            statement="Eight hours of sleep matter more than exercise", confidence=0.8))
        await checklist.mark_item(session, user_id, "measurements", "completed")


@pytest.fixture
async def user_id(profile_ctx):
    uid = await make_user(profile_ctx.db)
    await seed_profile(profile_ctx.db, uid)
    return uid


async def submit(ctx, queue, user_id, template="default", **config):
    submitted = await simulation_jobs.submit_job(
        ctx.db, queue, SERVICE, user_id=user_id, template=template,
        config=SimulationConfig(**config) if config else None,
        max_attempts=ctx.settings.sim_max_attempts)
    return submitted.job


async def work_one(processor, queue, worker="w1", timeout=2.0):
    await queue.register(worker)
    claimed = await queue.claim(worker, timeout=timeout)
    assert claimed is not None, "nothing to claim"
    return await processor.process(claimed)


async def job_row(db, job_id) -> SimulationJob:
    async with db.transaction() as session:
        return await session.get(SimulationJob, job_id, populate_existing=True)


async def conversations_of(db, user_id) -> list[Conversation]:
    async with db.transaction() as session:
        rows = await session.scalars(select(Conversation).where(Conversation.user_id == user_id))
        result = []
        for conversation in rows:
            await session.refresh(conversation, ["turns"])
            result.append(conversation)
        return result


def processor_for(ctx, queue, settings, worker="w1", **kw):
    return runner.JobProcessor(ctx.db, queue, settings, worker, **kw)


# --- persona and plan ---------------------------------------------------------------------

async def test_persona_comes_from_the_real_profile(profile_ctx, user_id):
    async with profile_ctx.db.transaction() as session:
        context = await load_user_context(session, user_id)
    assert [m for m in context.measurements if m.startswith("weight")] == [
        f"weight 81 kg on {(datetime.now(timezone.utc) - timedelta(days=1)).date().isoformat()}"]
    assert any(m.startswith("sleep_hours 6.2 h") for m in context.measurements)
    assert context.beliefs == ['"Eight hours of sleep matter more than exercise" (confidence 80%)']
    assert "Measurements" not in context.gaps and "Biomarkers" in context.gaps
    persona = context.persona()
    assert "weight 81 kg" in persona and "Eight hours of sleep" in persona and "Biomarkers" in persona


async def test_a_new_user_gets_an_honest_empty_persona(profile_ctx):
    uid = await make_user(profile_ctx.db)
    async with profile_ctx.db.transaction() as session:
        context = await load_user_context(session, uid)
    assert "has not recorded any measurements or beliefs yet" in context.persona()
    assert len(context.gaps) == 7


async def test_run_simulation_refuses_a_running_loop(settings):
    plan = runner.SimulationPlan("j", "u", "health_assessment", "s", "o", "p", "profile", "llm",
                                 "role", "ctx", (), ("turn_relevancy",), 1, 1)
    with pytest.raises(RuntimeError, match="event loop"):
        runner.run_simulation(plan, settings)


# --- the scripted generator -----------------------------------------------------------------

async def test_scripted_job_stores_a_closed_conversation_without_invented_scores(profile_ctx, sim_queue, user_id):
    settings = profile_ctx.settings
    assert not settings.llm_configured
    job = await submit(profile_ctx, sim_queue, user_id, max_turns=3, seed=11)
    report = await work_one(processor_for(profile_ctx, sim_queue, settings), sim_queue)
    assert report.outcome == "succeeded"

    row = await job_row(profile_ctx.db, job.id)
    assert row.status == "succeeded" and row.attempts == 1 and row.finished_at and row.conversation_id
    assert row.metrics["computed"] is False and row.metrics["generated_by"] == "scripted"
    assert row.metrics["scores"] == {"conversation_completeness": None, "turn_relevancy": None}
    assert row.metrics["turns"] == 6 and row.metrics["cost_usd"] is None

    [conversation] = await conversations_of(profile_ctx.db, user_id)
    assert conversation.id == row.conversation_id and conversation.closed
    assert conversation.meta == {
        "sim": True, "template": "health_assessment", "job_id": str(job.id),
        "simulation_type": "conversation", "seed": 11, "generated_by": "scripted", "coach": "llm",
        "persona_source": "profile",
        "models": {"generator": "scripted", "coach": "scripted", "simulated_user": "scripted",
                   "judge": None}}
    turns = conversation.turns
    assert [t.role for t in turns] == ["user", "assistant"] * 3 + ["system"]
    assert [t.extra_json["turn_number"] for t in turns[:-1]] == [1, 2, 3, 4, 5, 6]
    assert {t.extra_json["generated_by"] for t in turns[:-1]} == {"scripted"}
    assert "weight 81 kg" in turns[1].content  # the coach uses the user's real data
    metrics_turn = turns[-1]
    assert metrics_turn.content.startswith("[DeepEval Simulation Metrics]")
    assert "not computed" in metrics_turn.content
    for name in ("conversation_completeness", "turn_relevancy"):
        metric = metrics_turn.extra_json["metrics"][name]
        assert metric["computed"] is False and metric["score"] is None
        assert "no LLM endpoint is configured" in metric["reason"]
    assert (await sim_queue.depth())["processing"] == 0
    assert await sim_queue.owned([str(job.id)]) == {str(job.id): None}


async def test_scripted_runs_are_deterministic_per_seed(profile_ctx, sim_queue, user_id):
    processor = processor_for(profile_ctx, sim_queue, profile_ctx.settings)
    for seed in (5, 5, 6):
        await submit(profile_ctx, sim_queue, user_id, template="belief_exploration", seed=seed,
                     max_turns=4)
        await work_one(processor, sim_queue)
    conversations = sorted(await conversations_of(profile_ctx.db, user_id),
                           key=lambda c: c.started_at)
    texts = [[t.content for t in c.turns[:-1]] for c in conversations]
    assert texts[0] == texts[1]
    assert len(texts[0]) == 8


async def test_a_given_persona_is_used(profile_ctx, sim_queue, user_id):
    await submit(profile_ctx, sim_queue, user_id, persona="A marathon runner in her 60s", max_turns=1)
    await work_one(processor_for(profile_ctx, sim_queue, profile_ctx.settings), sim_queue)
    [conversation] = await conversations_of(profile_ctx.db, user_id)
    assert conversation.meta["persona_source"] == "config"
    assert "marathon runner" in conversation.turns[0].content


# --- DeepEval against the sandbox LLM -------------------------------------------------------

async def test_deepeval_job_with_all_metrics(profile_ctx, sim_queue, user_id, llm_settings, llm_sandbox):
    job = await submit(profile_ctx, sim_queue, user_id, template="protocol_discussion", max_turns=4,
                       seed=3, metrics=["conversation_completeness", "turn_relevancy",
                                        "knowledge_retention", "role_adherence"])
    report = await work_one(processor_for(profile_ctx, sim_queue, llm_settings), sim_queue)
    assert report.outcome == "succeeded", report.error

    row = await job_row(profile_ctx.db, job.id)
    assert row.status == "succeeded" and row.metrics["computed"] is True
    assert row.metrics["judge_model"] == "sandbox-judge"
    assert set(row.metrics["scores"]) == {"conversation_completeness", "turn_relevancy",
                                          "knowledge_retention", "role_adherence"}
    assert all(0.0 <= s <= 1.0 for s in row.metrics["scores"].values())
    assert row.metrics["tokens"]["total"] > 0 and row.metrics["cost_usd"] is None  # no prices set

    [conversation] = await conversations_of(profile_ctx.db, user_id)
    assert conversation.closed and conversation.meta["generated_by"] == "deepeval"
    assert conversation.meta["models"] == {"coach": "sandbox-coach", "simulated_user": "sandbox-user",
                                           "judge": "sandbox-judge"}
    turns = conversation.turns
    dialogue = turns[:-1]
    assert [t.role for t in dialogue] == ["user", "assistant"] * (len(dialogue) // 2)
    assert 2 <= len(dialogue) // 2 <= 4
    assert {t.extra_json["generated_by"] for t in dialogue if t.role == "user"} == {"deepeval"}
    assert {t.extra_json["generated_by"] for t in dialogue if t.role == "assistant"} == {"llm_coach"}
    assert all(t.content.startswith("[sandbox]") for t in dialogue if t.role == "assistant")
    metrics = turns[-1].extra_json["metrics"]
    for name, metric in metrics.items():
        assert metric["computed"] is True and metric["reason"]
        assert metric["judge_model"] == "sandbox-judge" and metric["tokens"]["total"] > 0
    assert turns[-1].extra_json["usage"]["judge"]["calls"] >= 4

    usage = httpx.get(f"{llm_sandbox.url}/_sandbox/usage").json()
    assert usage["total_tokens"] == row.metrics["tokens"]["total"]  # every token accounted for
    assert set(usage["by_model"]) == {"sandbox-coach", "sandbox-user", "sandbox-judge"}


async def test_deepeval_reports_cost_when_prices_are_known(profile_ctx, sim_queue, user_id, llm_settings):
    priced = llm_settings.model_copy(update={"llm_prompt_price_per_1k": 0.15,
                                             "llm_completion_price_per_1k": 0.6})
    job = await submit(profile_ctx, sim_queue, user_id, max_turns=2, metrics=["turn_relevancy"])
    await work_one(processor_for(profile_ctx, sim_queue, priced), sim_queue)
    row = await job_row(profile_ctx.db, job.id)
    tokens = row.metrics["tokens"]
    assert row.metrics["cost_usd"] == pytest.approx(
        (tokens["prompt"] * 0.15 + tokens["completion"] * 0.6) / 1000, rel=1e-3)


async def test_epistemic_me_as_the_coach(profile_ctx, sim_queue, user_id, llm_settings,
                                         epistemic_sandbox, epistemic_key):
    settings = llm_settings.model_copy(update={"epistemic_base_url": epistemic_sandbox.url,
                                               "epistemic_api_key": SecretStr(epistemic_key)})
    await submit(profile_ctx, sim_queue, user_id, template="belief_exploration", coach="epistemic",
                 max_turns=3, metrics=["turn_relevancy"])
    report = await work_one(processor_for(profile_ctx, sim_queue, settings), sim_queue)
    assert report.outcome == "succeeded", report.error
    [conversation] = await conversations_of(profile_ctx.db, user_id)
    assert conversation.meta["coach"] == "epistemic"
    assert conversation.meta["models"]["coach"] == "epistemic_me"
    assert conversation.meta["epistemic_dialectic_id"].startswith("di_")
    coach_turns = [t for t in conversation.turns if t.role == "assistant"]
    assert coach_turns and {t.extra_json["generated_by"] for t in coach_turns} == {"epistemic_me"}
    assert all("sandbox" not in t.content.lower()[:9] for t in coach_turns)
    # The simulated user's answers went into the dialectic.
    dialectics = httpx.post(f"{epistemic_sandbox.url}/EpistemicMeService/ListDialectics",
                            json={"selfModelId": str(user_id)},
                            headers={"x-api-key": epistemic_key}).json()["dialectics"]
    answered = [i for i in dialectics[0]["userInteractions"] if i["status"] == "ANSWERED"]
    assert len(answered) == len(coach_turns) - 1


async def test_scripted_user_with_the_epistemic_coach(profile_ctx, sim_queue, user_id, epistemic_settings):
    await submit(profile_ctx, sim_queue, user_id, template="belief_exploration", coach="epistemic",
                 max_turns=2)
    report = await work_one(processor_for(profile_ctx, sim_queue, epistemic_settings), sim_queue)
    assert report.outcome == "succeeded", report.error
    [conversation] = await conversations_of(profile_ctx.db, user_id)
    by = [t.extra_json["generated_by"] for t in conversation.turns[:-1]]
    assert by == ["scripted", "epistemic_me", "scripted", "epistemic_me"]


# --- failures -------------------------------------------------------------------------------

async def test_failing_llm_retries_with_backoff_then_dies(profile_ctx, sim_queue, user_id,
                                                          llm_settings, llm_sandbox):
    httpx.post(f"{llm_sandbox.url}/_sandbox/faults",
               json={"path_prefix": "/v1/chat/completions", "fail_status": 500})
    settings = llm_settings
    job = await submit(profile_ctx, sim_queue, user_id, max_turns=2)
    processor = processor_for(profile_ctx, sim_queue, settings)
    outcomes, failed_at = [], []
    await sim_queue.register("w1")
    while len(outcomes) < 3:
        await sim_queue.promote_due()
        claimed = await sim_queue.claim("w1", timeout=0.2)
        if claimed is None:
            continue
        report = await processor.process(claimed)
        outcomes.append(report.outcome)
        failed_at.append(time.monotonic())
        row = await job_row(profile_ctx.db, job.id)
        assert row.attempts == len(outcomes)
        assert "500" in row.last_error
        assert row.status == ("failed" if len(outcomes) < 3 else "dead")
    assert outcomes == ["retry", "retry", "dead"]
    base = settings.sim_backoff_base_seconds
    assert failed_at[2] - failed_at[1] >= 2 * base  # the second backoff is twice the first
    [entry] = await sim_queue.dead_letters()
    assert entry["job"]["id"] == str(job.id) and "500" in entry["error"] and entry["attempts"] == 3
    assert await conversations_of(profile_ctx.db, user_id) == []


async def test_a_deleted_user_is_not_retried(profile_ctx, sim_queue, user_id):
    job = await submit(profile_ctx, sim_queue, user_id)
    async with profile_ctx.db.transaction() as session:
        await session.delete(await session.get(User, user_id))
    report = await work_one(processor_for(profile_ctx, sim_queue, profile_ctx.settings), sim_queue)
    assert report.outcome == "skipped"  # the job row went with the user
    assert (await sim_queue.depth())["processing"] == 0
    assert await job_row(profile_ctx.db, job.id) is None


async def test_a_broken_write_back_leaves_nothing_and_is_retried(profile_ctx, sim_queue, user_id, monkeypatch):
    job = await submit(profile_ctx, sim_queue, user_id, max_turns=2)
    real = checklist.ensure_items

    async def boom(*args, **kwargs):
        raise ConnectionResetError("database went away mid-transaction")

    monkeypatch.setattr(checklist, "ensure_items", boom)
    processor = processor_for(profile_ctx, sim_queue, profile_ctx.settings)
    assert (await work_one(processor, sim_queue)).outcome == "retry"
    assert await conversations_of(profile_ctx.db, user_id) == []  # no partial conversation
    async with profile_ctx.db.transaction() as session:
        assert await session.scalar(select(func.count()).select_from(Turn)) == 0

    monkeypatch.setattr(checklist, "ensure_items", real)
    await asyncio.sleep(profile_ctx.settings.sim_backoff_base_seconds + 0.05)
    await sim_queue.promote_due()
    report = await work_one(processor, sim_queue)
    assert report.outcome == "succeeded"
    assert len(await conversations_of(profile_ctx.db, user_id)) == 1
    assert (await job_row(profile_ctx.db, job.id)).attempts == 2


# --- write-back idempotency -----------------------------------------------------------------

async def planned(profile_ctx, sim_queue, user_id):
    job = await submit(profile_ctx, sim_queue, user_id, max_turns=2)
    async with profile_ctx.db.transaction() as session:
        row = await simulation_jobs.begin_attempt(session, job.id, 1)
        plan = await runner.build_plan(session, row)
    result = await asyncio.to_thread(runner.run_simulation, plan, profile_ctx.settings)
    return job, plan, result


async def test_write_back_happens_once(profile_ctx, sim_queue, user_id):
    job, plan, result = await planned(profile_ctx, sim_queue, user_id)
    async with profile_ctx.db.transaction() as session:
        first = await runner.write_back(session, plan, result)
    async with profile_ctx.db.transaction() as session:
        second = await runner.write_back(session, plan, result)
    assert first.written and not second.written
    assert second.conversation_id == first.conversation_id and second.status == "succeeded"
    assert len(await conversations_of(profile_ctx.db, user_id)) == 1


async def test_concurrent_write_backs_store_one_conversation(profile_ctx, sim_queue, user_id):
    job, plan, result = await planned(profile_ctx, sim_queue, user_id)

    async def write():
        async with profile_ctx.db.transaction() as session:
            return await runner.write_back(session, plan, result)

    outcomes = await asyncio.gather(*(write() for _ in range(4)))
    assert sum(o.written for o in outcomes) == 1
    assert len({o.conversation_id for o in outcomes}) == 1
    conversations = await conversations_of(profile_ctx.db, user_id)
    assert len(conversations) == 1 and len(conversations[0].turns) == 5


async def test_a_reclaimed_job_that_already_succeeded_is_not_run_again(profile_ctx, sim_queue, user_id):
    """The worker wrote the conversation and died before its ack: the job comes back from the
    reaper, and the next worker only acks it."""
    job = await submit(profile_ctx, sim_queue, user_id, max_turns=1)
    await sim_queue.register("dies")
    claimed = await sim_queue.claim("dies", timeout=1)
    processor = processor_for(profile_ctx, sim_queue, profile_ctx.settings, worker="dies")
    original_ack = sim_queue.ack

    async def crash(*args, **kwargs):
        raise WorkerCrash  # the process dies between commit and ack

    sim_queue.ack = crash
    with pytest.raises(WorkerCrash):
        await processor.process(claimed)
    sim_queue.ack = original_ack
    assert (await sim_queue.reap_worker("dies", force=True)).requeued

    report = await work_one(processor_for(profile_ctx, sim_queue, profile_ctx.settings, "next"),
                            sim_queue, worker="next")
    assert report.outcome == "skipped"
    assert len(await conversations_of(profile_ctx.db, user_id)) == 1
    assert (await job_row(profile_ctx.db, job.id)).status == "succeeded"
    depth = await sim_queue.depth()
    assert (depth["pending"], depth["processing"]) == (0, 0)


async def test_cancel_while_running_discards_the_result(profile_ctx, sim_queue, user_id):
    job = await submit(profile_ctx, sim_queue, user_id, max_turns=1)
    cancelled = asyncio.Event()

    def slow_simulation(plan, settings):
        result = runner.run_simulation(plan, settings)
        asyncio.run_coroutine_threadsafe(cancel(), loop).result(timeout=10)
        return result

    async def cancel():
        await simulation_jobs.cancel_job(profile_ctx.db, sim_queue, None, job.id)
        cancelled.set()

    loop = asyncio.get_running_loop()
    processor = processor_for(profile_ctx, sim_queue, profile_ctx.settings, simulate=slow_simulation)
    report = await work_one(processor, sim_queue)
    assert cancelled.is_set() and report.outcome == "skipped"
    assert (await job_row(profile_ctx.db, job.id)).status == "cancelled"
    assert await conversations_of(profile_ctx.db, user_id) == []
    assert (await sim_queue.depth())["processing"] == 0


async def test_a_cancelled_job_is_skipped_when_claimed(profile_ctx, sim_queue, user_id, redis):
    job = await submit(profile_ctx, sim_queue, user_id)
    await sim_queue.register("w1")
    claimed = await sim_queue.claim("w1", timeout=1)
    await simulation_jobs.cancel_job(profile_ctx.db, sim_queue, None, job.id)
    report = await processor_for(profile_ctx, sim_queue, profile_ctx.settings).process(claimed)
    assert report.outcome == "skipped"
    assert (await job_row(profile_ctx.db, job.id)).attempts == 0
