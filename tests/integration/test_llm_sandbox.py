"""The sandbox LLM server, the OpenAI-compatible DeepEval model, and DeepEval's simulator and
conversational metrics running against them over real HTTP."""
from __future__ import annotations

import os

os.environ.setdefault("DEEPEVAL_TELEMETRY_OPT_OUT", "1")
os.environ.setdefault("DEEPEVAL_DISABLE_DOTENV", "1")

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal, Optional

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from clients.llm import OpenAIChat, models_from_settings
from core.errors import UpstreamClientError, UpstreamError, UpstreamTimeout
from core.settings import Settings
from sandbox.llm import create_app
from sandbox.server import BackgroundServer

REPO = Path(__file__).resolve().parents[2]
SCENARIO = "A user wants a health assessment of their sleep and energy."
OUTCOME = "The user leaves with one concrete next step for better sleep."
PERSONA = "45-year-old office worker who sleeps six hours and feels tired every afternoon."
COACH_ROLE = "You are a health coach. Ask about the user's habits and agree on one small next step."


@pytest.fixture(scope="module")
def sandbox():
    with BackgroundServer(create_app()) as server:
        yield server


@pytest.fixture(autouse=True)
def clean_sandbox(sandbox):
    for path in ("/_sandbox/faults", "/_sandbox/usage", "/_sandbox/requests"):
        httpx.delete(sandbox.url + path)
    yield
    httpx.delete(sandbox.url + "/_sandbox/faults")


def make_model(server, name: str = "sandbox-judge", **options):
    from clients.llm import OpenAICompatibleModel

    options.setdefault("api_key", "test-key")
    return OpenAICompatibleModel(name, base_url=f"{server.url}/v1", **options)


def in_thread(fn):
    """Run `fn` as a sync simulator actor would: in a plain thread with asyncio's default loop
    (DeepEval creates one there), never inside a running (uv)loop."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            outcome["error"] = exc
        finally:
            try:
                loop = asyncio.get_event_loop_policy().get_event_loop()
            except RuntimeError:
                loop = None
            if loop is not None and not loop.is_running():
                loop.close()

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "DeepEval run did not finish"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def chat(server, body: dict, key: str = "test-key") -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=10)


def conversation_prompt(turns: list[tuple[str, str]]) -> str:
    quoted = json.dumps([{"role": r, "content": c} for r, c in turns], indent=2)
    return (f'Scenario: "{SCENARIO}"\nExpected Outcome: "{OUTCOME}"\n'
            f"Conversation:\n{quoted}\nJSON Output:")


SLEEP_TURNS = [("user", "I sleep about six hours and feel exhausted by mid afternoon."),
               ("assistant", "What does your evening routine look like before bed?")]


# --- the server ---------------------------------------------------------------------------

def test_bearer_key_is_required(sandbox):
    body = {"model": "sandbox-coach", "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic abc"}):
        response = httpx.post(f"{sandbox.url}/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{sandbox.url}/v1/models").status_code == 401

    assert chat(sandbox, body, key="any-key").status_code == 200
    models = httpx.get(f"{sandbox.url}/v1/models", headers={"Authorization": "Bearer k"}).json()
    assert models["object"] == "list" and {m["object"] for m in models["data"]} == {"model"}


def test_completion_shape_determinism_and_usage_counter(sandbox):
    body = {"model": "sandbox-coach",
            "messages": [{"role": "system", "content": COACH_ROLE},
                         {"role": "user", "content": "I keep waking up at three in the morning"}]}
    first, second = chat(sandbox, body).json(), chat(sandbox, body).json()

    assert first["object"] == "chat.completion" and first["model"] == "sandbox-coach"
    message = first["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"].startswith("[sandbox] ")
    assert first["choices"][0]["finish_reason"] == "stop"
    assert message["content"] == second["choices"][0]["message"]["content"]
    assert first["usage"] == second["usage"]
    prompt_words = len(COACH_ROLE.split()) + len("I keep waking up at three in the morning".split())
    assert first["usage"]["prompt_tokens"] == prompt_words
    assert first["usage"]["completion_tokens"] == len(message["content"].split())
    assert first["usage"]["total_tokens"] == prompt_words + first["usage"]["completion_tokens"]

    usage = httpx.get(f"{sandbox.url}/_sandbox/usage").json()
    assert usage["requests"] == 2
    assert usage["total_tokens"] == 2 * first["usage"]["total_tokens"]
    assert usage["by_model"] == {"sandbox-coach": 2}


def test_bad_requests_get_openai_style_errors(sandbox):
    for body in ({"model": "m", "messages": []}, {"messages": [{"role": "user", "content": "x"}]},
                 {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True},
                 {"model": "m", "messages": [{"role": "user", "content": "x"}],
                  "response_format": {"type": "yaml"}}):
        response = chat(sandbox, body)
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"


# --- JSON output validates against the schema ------------------------------------------------

class Step(BaseModel):
    title: str = Field(max_length=40)
    minutes_per_day: int = Field(ge=5, le=60)
    kind: Literal["sleep", "activity", "nutrition"]


class CoachPlan(BaseModel):
    goal: str
    steps: list[Step] = Field(min_length=2, max_length=3)
    confidence: float = Field(gt=0, lt=1)
    follow_up: Optional[Step] = None
    tags: set[str]
    notes: dict[str, list[str]]
    on_track: bool


HAND_WRITTEN = {
    "type": "object",
    "$defs": {
        "node": {"type": "object", "properties": {
            "label": {"type": "string", "minLength": 3},
            "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            "required": ["label", "children"], "additionalProperties": False},
    },
    "properties": {
        "tree": {"$ref": "#/$defs/node"},
        "mode": {"const": "sandbox"},
        "level": {"type": ["integer", "null"], "minimum": 2, "maximum": 4},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "when": {"type": "string", "format": "date-time"},
        "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
                 "items": False, "minItems": 2},
        "merged": {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}},
                              "required": ["a"]},
                             {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]},
        "either": {"oneOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
        "many": {"type": "array", "items": {"type": "string"}, "minItems": 3, "uniqueItems": True},
    },
    "required": ["tree", "mode", "level", "ratio", "when", "pair", "merged", "either", "many"],
    "additionalProperties": False,
}


def _deepeval_schemas() -> list[type[BaseModel]]:
    from deepeval.metrics.conversation_completeness.schema import (
        ConversationCompletenessScoreReason, ConversationCompletenessVerdict, UserIntentions)
    from deepeval.metrics.knowledge_retention.schema import (
        Knowledge, KnowledgeRetentionScoreReason, KnowledgeRetentionVerdict)
    from deepeval.metrics.role_adherence.schema import (
        OutOfCharacterResponseVerdicts, RoleAdherenceScoreReason)
    from deepeval.metrics.turn_relevancy.schema import (
        TurnRelevancyScoreReason, TurnRelevancyVerdict)
    from deepeval.simulator.schema import (
        ConversationCompletion, EdgeChoice, InterruptDecision, SimulatedInput)

    return [SimulatedInput, ConversationCompletion, EdgeChoice, InterruptDecision, UserIntentions,
            ConversationCompletenessVerdict, ConversationCompletenessScoreReason,
            TurnRelevancyVerdict, TurnRelevancyScoreReason, Knowledge, KnowledgeRetentionVerdict,
            KnowledgeRetentionScoreReason, OutOfCharacterResponseVerdicts, RoleAdherenceScoreReason]


SCHEMAS = [("hand_written", HAND_WRITTEN), ("CoachPlan", CoachPlan),
           *[(s.__name__, s) for s in _deepeval_schemas()]]


@pytest.mark.parametrize("schema", [s for _, s in SCHEMAS], ids=[n for n, _ in SCHEMAS])
def test_json_schema_output_validates(sandbox, schema):
    json_schema = schema if isinstance(schema, dict) else schema.model_json_schema()
    body = {"model": "sandbox-judge",
            "messages": [{"role": "user", "content": conversation_prompt(SLEEP_TURNS)}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "out", "schema": json_schema}}}
    response = chat(sandbox, body)
    assert response.status_code == 200
    value = json.loads(response.json()["choices"][0]["message"]["content"])
    jsonschema.validate(value, json_schema)
    if not isinstance(schema, dict):
        schema.model_validate(value)
    assert chat(sandbox, body).json()["choices"][0]["message"]["content"] == json.dumps(value)


def test_json_object_mode_follows_the_prompts_example(sandbox):
    prompt = ('Return JSON.\nExample JSON Output:\n{"is_complete": false, "reason": "why", '
              '"turns": 2, "topics": ["sleep"]}\n' + conversation_prompt(SLEEP_TURNS))
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}],
            "response_format": {"type": "json_object"}}
    value = json.loads(chat(sandbox, body).json()["choices"][0]["message"]["content"])
    assert set(value) == {"is_complete", "reason", "turns", "topics"}
    assert value["is_complete"] is False and isinstance(value["turns"], int)
    assert isinstance(value["topics"], list) and all(isinstance(t, str) for t in value["topics"])


def test_judgements_follow_deepeval_prompts(sandbox):
    from deepeval.metrics.knowledge_retention.knowledge_retention import KnowledgeRetentionTemplate
    from deepeval.metrics.knowledge_retention.schema import KnowledgeRetentionVerdict
    from deepeval.simulator.controller.template import SimulatorControllerTemplate
    from deepeval.simulator.schema import ConversationCompletion, SimulatedInput
    from deepeval.simulator.template import SimulationTemplate
    from deepeval.dataset import ConversationalGolden
    from deepeval.test_case import Turn

    judge = make_model(sandbox)
    short = [Turn(role=r, content=c) for r, c in SLEEP_TURNS]
    long = short + [Turn(role="user", content="I scroll my phone until midnight."),
                    Turn(role="assistant", content="Try putting the phone away at ten."),
                    Turn(role="user", content="OK, I will try that this week."),
                    Turn(role="assistant", content="Great, let's check in on Friday.")]

    def completion(turns):
        prompt = SimulatorControllerTemplate.check_expected_outcome(
            json.dumps([t.model_dump_for_prompt() for t in turns]), OUTCOME)
        return judge.generate(prompt, schema=ConversationCompletion)

    assert completion(short).is_complete is False
    done = completion(long)
    assert done.is_complete is True and done.reason

    golden = ConversationalGolden(scenario=SCENARIO, expected_outcome=OUTCOME)
    opening = judge.generate(SimulationTemplate.simulate_first_user_turn(golden, "English"),
                             schema=SimulatedInput)
    assert opening.simulated_input.startswith("Hi, I want a health assessment of my sleep")

    # In knowledge retention "yes" means the assistant forgot something: the sandbox says "no".
    prompt = KnowledgeRetentionTemplate.generate_verdict(
        llm_message="How many hours do you sleep?", accumulated_knowledge=[{"sleep": "six hours"}])
    assert judge.generate(prompt, schema=KnowledgeRetentionVerdict).verdict == "no"


# --- the DeepEval model -------------------------------------------------------------------

def test_model_parses_schemas_and_counts_usage_and_cost(sandbox):
    from deepeval.models import DeepEvalBaseLLM
    from deepeval.simulator.schema import SimulatedInput

    model = make_model(sandbox, "openai/sandbox-user", prompt_price_per_1k=0.5,
                       completion_price_per_1k=1.5)
    assert isinstance(model, DeepEvalBaseLLM)
    assert model.get_model_name() == "openai/sandbox-user"  # DeepEval's own name strips the prefix

    result = model.generate(conversation_prompt(SLEEP_TURNS), schema=SimulatedInput)
    assert isinstance(result, SimulatedInput) and result.simulated_input
    text = model.generate("Say something encouraging about sleep")
    assert isinstance(text, str) and text.startswith("[sandbox]")
    # Separate loops, as DeepEval's asyncio.run shims create: no client is shared between them.
    for _ in range(2):
        result = asyncio.run(model.a_generate("hi", schema=SimulatedInput))
        assert isinstance(result, SimulatedInput)

    server = httpx.get(f"{sandbox.url}/_sandbox/usage").json()
    usage = model.usage
    assert usage["calls"] == server["requests"] == 4
    assert usage["prompt_tokens"] == server["prompt_tokens"]
    assert usage["completion_tokens"] == server["completion_tokens"]
    assert usage["total_tokens"] == server["total_tokens"]
    expected_cost = (server["prompt_tokens"] * 0.5 + server["completion_tokens"] * 1.5) / 1000
    assert usage["cost_usd"] == pytest.approx(expected_cost)
    assert server["by_model"] == {"openai/sandbox-user": 4}
    model.reset_usage()
    assert model.usage["calls"] == 0


def test_importing_the_client_does_not_import_deepeval():
    code = "import sys, clients.llm; assert 'deepeval' not in sys.modules, 'eager import'"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=60)


def test_models_from_settings(sandbox):
    assert models_from_settings(Settings(llm_base_url="")) is None

    settings = Settings(llm_base_url=f"{sandbox.url}/v1", llm_api_key="k", llm_coach_model="c",
                        llm_user_model="u", llm_judge_model="j", llm_timeout_seconds=5)
    coach, user, judge = models_from_settings(settings)
    assert [m.get_model_name() for m in (coach, user, judge)] == ["c", "u", "j"]
    assert coach.timeout == 5 and judge.temperature == 0.0
    assert coach.generate("hello").startswith("[sandbox]")


# --- the simulator and metrics --------------------------------------------------------------

def simulate(sandbox, *, async_mode: bool, max_user_turns: int = 4):
    from deepeval.dataset import ConversationalGolden, Persona
    from deepeval.simulator import ConversationSimulator
    from deepeval.test_case import Turn

    coach = make_model(sandbox, "sandbox-coach", system_prompt=COACH_ROLE)
    user = make_model(sandbox, "sandbox-user")

    def history(turns):
        return [{"role": t.role, "content": t.content} for t in turns]

    async def a_coach(input: str, turns: list[Turn], thread_id: str) -> Turn:
        return Turn(role="assistant", content=await coach.a_chat(history(turns)))

    def coach_callback(input: str, turns: list[Turn]) -> Turn:
        return Turn(role="assistant", content=coach.chat(history(turns)))

    simulator = ConversationSimulator(model_callback=a_coach if async_mode else coach_callback,
                                      simulator_model=user, async_mode=async_mode,
                                      max_concurrent=1)
    golden = ConversationalGolden(scenario=SCENARIO, expected_outcome=OUTCOME,
                                  persona=Persona(characteristics=PERSONA))
    cases = in_thread(lambda: simulator.simulate([golden], max_user_simulations=max_user_turns))
    return cases, coach, user


@pytest.mark.parametrize("async_mode", [True, False], ids=["async_mode", "sync_mode"])
def test_simulator_drives_the_coach(sandbox, async_mode):
    from deepeval.test_case import ConversationalTestCase

    cases, coach, user = simulate(sandbox, async_mode=async_mode)
    assert len(cases) == 1 and isinstance(cases[0], ConversationalTestCase)
    case = cases[0]
    roles = [t.role for t in case.turns]
    assert roles == ["user", "assistant"] * (len(roles) // 2)
    # The sandbox's completion check says "done" once six turns exist, before the fourth user turn.
    assert roles.count("user") == 3
    assert case.turns[0].content.startswith("Hi, I want a health assessment")
    assert all(t.content.startswith("[sandbox] ") for t in case.turns if t.role == "assistant")
    assert case.scenario == SCENARIO and case.expected_outcome == OUTCOME
    assert case.user_description == PERSONA  # DeepEval keeps it in sync with the persona
    assert case.metadata["Persona"] == PERSONA

    assert coach.usage["calls"] == roles.count("assistant")
    # One simulated input per user turn, one completion check before each later user turn
    # and a final one that ends the conversation.
    assert user.usage["calls"] == 3 + 3
    usage = httpx.get(f"{sandbox.url}/_sandbox/usage").json()
    assert usage["by_model"] == {"sandbox-coach": 3, "sandbox-user": 6}


def test_user_description_is_the_deprecated_spelling_of_persona():
    from deepeval.dataset import ConversationalGolden

    with pytest.warns(DeprecationWarning):
        golden = ConversationalGolden(scenario=SCENARIO, user_description=PERSONA)
    assert golden.persona.characteristics == PERSONA


def test_max_user_turns_caps_the_conversation(sandbox):
    cases, _, _ = simulate(sandbox, async_mode=True, max_user_turns=2)
    assert [t.role for t in cases[0].turns] == ["user", "assistant", "user", "assistant"]


def test_conversational_metrics_with_the_judge(sandbox):
    from deepeval.metrics import (ConversationCompletenessMetric, KnowledgeRetentionMetric,
                                  RoleAdherenceMetric, TurnRelevancyMetric)

    cases, _, _ = simulate(sandbox, async_mode=True)
    case = cases[0]
    case.chatbot_role = COACH_ROLE  # RoleAdherenceMetric requires it
    judge = make_model(sandbox, "sandbox-judge", temperature=0.0)
    metrics = [ConversationCompletenessMetric(model=judge, eval_mode="llm"),
               TurnRelevancyMetric(model=judge, eval_mode="llm"),
               KnowledgeRetentionMetric(model=judge, eval_mode="llm", async_mode=False),
               RoleAdherenceMetric(model=judge, eval_mode="llm")]

    def measure_all():
        return [(m.__name__, m.measure(case, _show_indicator=False)) for m in metrics]

    scores = dict(in_thread(measure_all))
    for metric in metrics:
        assert 0.0 <= metric.score <= 1.0
        assert scores[metric.__name__] == metric.score
        assert isinstance(metric.reason, str) and metric.reason
        assert metric.evaluation_model == "sandbox-judge"
        assert metric.evaluation_cost is None  # custom models report no cost to DeepEval
    # The sandbox judge finds its own coach relevant, complete, consistent and in role.
    assert all(m.score == 1.0 and m.success for m in metrics)
    assert judge.usage["calls"] > len(metrics)


# --- retries and timeouts -------------------------------------------------------------------

@pytest.mark.parametrize("status", [500, 429])
def test_one_injected_failure_is_retried(sandbox, status):
    httpx.post(f"{sandbox.url}/_sandbox/faults",
               json={"path_prefix": "/v1/chat/completions", "fail_status": status, "fail_count": 1})
    model = make_model(sandbox, max_retries=2)
    assert model.generate("hello").startswith("[sandbox]")
    requests = httpx.get(f"{sandbox.url}/_sandbox/requests").json()["requests"]
    assert requests == ["POST /v1/chat/completions"] * 2
    assert model.usage["calls"] == 1


def test_persistent_failures_raise_after_retries(sandbox):
    httpx.post(f"{sandbox.url}/_sandbox/faults",
               json={"path_prefix": "/v1/chat/completions", "fail_status": 503})
    model = make_model(sandbox, max_retries=1)
    with pytest.raises(UpstreamError) as caught:
        model.generate("hello")
    assert caught.value.details == {"status": 503}
    assert len(httpx.get(f"{sandbox.url}/_sandbox/requests").json()["requests"]) == 2


def test_client_errors_are_not_retried(sandbox):
    httpx.post(f"{sandbox.url}/_sandbox/faults",
               json={"path_prefix": "/v1/chat/completions", "fail_status": 401, "fail_count": 1})
    with pytest.raises(UpstreamClientError) as caught:
        make_model(sandbox, max_retries=2).generate("hello")
    assert caught.value.status_code == 401
    assert len(httpx.get(f"{sandbox.url}/_sandbox/requests").json()["requests"]) == 1


@pytest.fixture
def hanging_sandbox():
    server = BackgroundServer(create_app()).start()
    httpx.post(f"{server.url}/_sandbox/faults", json={"path_prefix": "/v1", "hang": True})
    yield server
    # The hung handlers sleep for an hour; don't wait for them on shutdown.
    server._server.force_exit = True
    server.stop()


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_hang_times_out_within_bounds(hanging_sandbox, use_async):
    model = OpenAIChat("sandbox-judge", base_url=f"{hanging_sandbox.url}/v1", api_key="k",
                       timeout=0.5, max_retries=1)
    messages = [{"role": "user", "content": "hello"}]
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        if use_async:
            asyncio.run(model.a_chat(messages))
        else:
            model.chat(messages)
    elapsed = time.monotonic() - started
    # Two attempts of 0.5 s plus at most one backoff (<= 1 s).
    assert 1.0 <= elapsed < 3.5
    assert model.usage["calls"] == 0
