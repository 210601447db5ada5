"""The Epistemic Me client against the Connect sandbox, over real HTTP."""
from __future__ import annotations

import re
import time
import uuid

import httpx
import pytest
from pydantic import SecretStr

from clients import epistemic_cli
from clients.epistemic import (Belief, BeliefType, CreateBeliefResponse, Dialectic, DialecticType,
                               EpistemicClient, InteractionStatus, LearningObjective, Wire,
                               validate_api_key)
from core.errors import (DependencyUnavailable, NotFound, UpstreamError, UpstreamTimeout,
                         ValidationFailed)
from sandbox.epistemic import KEYS_ENV, create_app
from sandbox.server import BackgroundServer, free_port

KEY = str(uuid.uuid4())
DIGITS = re.compile(r"^\d+$")


@pytest.fixture(scope="module")
def sandbox():
    server = BackgroundServer(create_app(api_keys=[KEY])).start()
    yield server
    server.stop()


@pytest.fixture
async def client(sandbox):
    async with EpistemicClient(sandbox.url, KEY, timeout=5) as c:
        yield c


@pytest.fixture
async def self_model_id(client) -> str:
    sm_id = str(uuid.uuid4())
    await client.create_self_model(sm_id, ["sandbox-test"])
    return sm_id


def rpc(sandbox, method: str, body=None, *, key: str | None = KEY, content: bytes | None = None,
        content_type: str = "application/json") -> httpx.Response:
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["x-api-key"] = key
    if content is None:
        content = httpx.Request("POST", "/", json=body).content
    return httpx.post(f"{sandbox.url}/EpistemicMeService/{method}", content=content,
                      headers=headers, timeout=5)


def sandbox_requests(sandbox) -> list[str]:
    return httpx.get(f"{sandbox.url}/_sandbox/requests").json()["requests"]


# --- raw wire format ---------------------------------------------------------------------

def test_wire_create_developer_needs_no_key_and_writes_int64_as_strings(sandbox):
    resp = rpc(sandbox, "CreateDeveloper", {"name": "Ada", "email": "ada@example.com"}, key=None)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["x-sandbox"] == "epistemic-me"
    developer = resp.json()["developer"]
    assert set(developer) == {"id", "name", "email", "apiKeys", "createdAt", "updatedAt"}
    assert uuid.UUID(developer["apiKeys"][0])
    assert DIGITS.match(developer["createdAt"]) and DIGITS.match(developer["updatedAt"])


def test_wire_omits_default_values(sandbox):
    sm_id = str(uuid.uuid4())
    created = rpc(sandbox, "CreateSelfModel", {"id": sm_id, "philosophies": []}).json()
    # philosophies and dialectics are empty, so absent; the set-but-empty belief system is {}.
    assert created == {"selfModel": {"id": sm_id, "beliefSystem": {}}}
    assert rpc(sandbox, "GetBeliefSystem", {"selfModelId": sm_id}).json() == {"beliefSystem": {}}
    assert rpc(sandbox, "ListBeliefs", {"selfModelId": sm_id}).json() == {"beliefSystem": {}}
    assert rpc(sandbox, "ListDialectics", {"selfModelId": sm_id}).json() == {}


def test_wire_belief_is_camel_case_and_accepts_snake_case_and_unknown_fields(sandbox):
    sm_id = str(uuid.uuid4())
    rpc(sandbox, "CreateSelfModel", {"id": sm_id})
    resp = rpc(sandbox, "CreateBelief", {"self_model_id": sm_id, "beliefContent": "Walking helps",
                                         "beliefType": "FALSIFIABLE", "notAField": 1})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"belief", "beliefSystem"}
    belief = body["belief"]
    assert set(belief) == {"id", "selfModelId", "version", "type", "content"}
    assert belief["selfModelId"] == sm_id
    assert belief["version"] == 1  # int32: a JSON number
    assert belief["type"] == "FALSIFIABLE"
    assert belief["content"] == [{"rawStr": "Walking helps"}]
    assert body["beliefSystem"]["beliefs"] == [belief]


def test_wire_dialectic_shape(sandbox):
    sm_id = str(uuid.uuid4())
    rpc(sandbox, "CreateSelfModel", {"id": sm_id})
    resp = rpc(sandbox, "CreateDialectic", {
        "selfModelId": sm_id, "dialecticType": "SLEEP_DIET_EXERCISE",
        "learningObjective": {"description": "sleep beliefs", "topics": ["sleep"],
                              "targetBeliefType": "STATEMENT", "completionPercentage": 0}})
    assert resp.status_code == 200, resp.text
    dialectic = resp.json()["dialectic"]
    assert dialectic["id"].startswith("di_")
    assert dialectic["agent"]["dialecticType"] == "SLEEP_DIET_EXERCISE"
    # completionPercentage 0 is a default and therefore omitted
    assert dialectic["learningObjective"] == {"description": "sleep beliefs", "topics": ["sleep"],
                                              "targetBeliefType": "STATEMENT"}
    [interaction] = dialectic["userInteractions"]
    assert interaction["status"] == "PENDING_ANSWER"
    assert interaction["type"] == "QUESTION_ANSWER"
    assert DIGITS.match(interaction["updatedAtMillisUtc"])
    qa = interaction["interaction"]["questionAnswer"]
    assert set(qa) == {"question"}  # no answer, no extracted beliefs yet
    assert "sleep" in qa["question"]["question"]
    assert DIGITS.match(qa["question"]["createdAtMillisUtc"])


def test_wire_int64_input_as_number_or_string(sandbox):
    sm_id = str(uuid.uuid4())
    rpc(sandbox, "CreateSelfModel", {"id": sm_id})
    d_id = rpc(sandbox, "CreateDialectic", {"selfModelId": sm_id}).json()["dialectic"]["id"]
    for stamp in (1700000000000, "1700000000001"):
        resp = rpc(sandbox, "UpdateDialectic", {
            "id": d_id, "selfModelId": sm_id, "dryRun": True,
            "answer": {"userAnswer": "I sleep seven hours.", "createdAtMillisUtc": stamp}})
        assert resp.status_code == 200, resp.text
        answer = resp.json()["dialectic"]["userInteractions"][0]["interaction"][
            "questionAnswer"]["answer"]
        assert answer["createdAtMillisUtc"] == str(stamp)


@pytest.mark.parametrize("method, body, key, status, code", [
    ("GetSelfModel", {"selfModelId": "x"}, None, 401, "unauthenticated"),
    ("GetSelfModel", {"selfModelId": "x"}, "not-a-uuid", 401, "unauthenticated"),
    ("GetSelfModel", {"selfModelId": "x"}, str(uuid.uuid4()), 401, "unauthenticated"),
    ("CreateBelief", {"selfModelId": "x", "beliefContent": "c"}, KEY, 400, "invalid_argument"),
    ("CreateBelief", {"selfModelId": "x", "beliefContent": "c", "beliefType": "BOGUS"}, KEY, 400,
     "invalid_argument"),
    ("CreateBelief",
     {"selfModelId": "x", "beliefContent": "c", "beliefType": "BELIEF_TYPE_INVALID"},
     KEY, 400, "invalid_argument"),
    ("GetSelfModel", {"selfModelId": 5}, KEY, 400, "invalid_argument"),
    ("GetSelfModel", ["not", "an", "object"], KEY, 400, "invalid_argument"),
    ("GetSelfModel", {"selfModelId": "no-such-model"}, KEY, 500, "internal"),
    ("ListBeliefs", {"selfModelId": "no-such-model"}, KEY, 500, "internal"),
    ("CreateDialectic", {"selfModelId": "no-such-model"}, KEY, 500, "internal"),
    ("NoSuchMethod", {}, KEY, 404, "unimplemented"),
])
def test_wire_connect_errors(sandbox, method, body, key, status, code):
    resp = rpc(sandbox, method, body, key=key)
    assert resp.status_code == status
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()
    assert set(error) == {"code", "message"}
    assert error["code"] == code and error["message"]


def test_wire_malformed_json_and_empty_body_are_invalid_argument(sandbox):
    for content in (b"{not json", b""):
        resp = rpc(sandbox, "GetSelfModel", content=content)
        assert resp.status_code == 400
        assert resp.json()["code"] == "invalid_argument"


def test_wire_wrong_content_type_is_415(sandbox):
    resp = rpc(sandbox, "GetSelfModel", content=b"selfModelId=x",
               content_type="application/x-www-form-urlencoded")
    assert resp.status_code == 415


async def test_sandbox_accepts_keys_from_the_environment(monkeypatch):
    env_key = str(uuid.uuid4())
    monkeypatch.setenv(KEYS_ENV, f" {env_key} , ")
    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport) as http:
        client = EpistemicClient("http://sandbox", env_key, timeout=5, http=http)
        model = await client.create_self_model("env-user")
        assert model.id == "env-user"
        with pytest.raises(UpstreamError):
            await EpistemicClient("http://sandbox", KEY, http=http).get_self_model("env-user")


# --- client happy paths ------------------------------------------------------------------

async def test_create_developer_key_works_for_other_calls(sandbox):
    async with EpistemicClient(sandbox.url, "", timeout=5) as anonymous:
        developer = await anonymous.create_developer("Grace", "grace@example.com")
    assert developer.name == "Grace" and developer.email == "grace@example.com"
    assert developer.created_at > 0
    [key] = developer.api_keys
    assert validate_api_key(key) is None
    async with EpistemicClient(sandbox.url, SecretStr(key), timeout=5) as registered:
        model = await registered.create_self_model(str(uuid.uuid4()))
        assert (await registered.get_self_model(model.id)).id == model.id


async def test_self_model_round_trip(client):
    sm_id = str(uuid.uuid4())
    created = await client.create_self_model(sm_id, ["stoic", "sandbox-test"])
    assert created.id == sm_id and created.philosophies == ["stoic", "sandbox-test"]
    assert created.belief_system.beliefs == [] and created.dialectics == []
    fetched = await client.get_self_model(sm_id)
    assert fetched.philosophies == ["stoic", "sandbox-test"]


async def test_beliefs(client, self_model_id):
    first = await client.create_belief(self_model_id, "Sleep drives my mood")
    assert isinstance(first, CreateBeliefResponse)
    assert first.belief.type is BeliefType.STATEMENT  # our default, never sent unset
    assert first.belief.text == "Sleep drives my mood"
    assert first.belief.version == 1 and first.belief.self_model_id == self_model_id
    second = await client.create_belief(self_model_id, "Late caffeine ruins my sleep",
                                        belief_type="CAUSAL")
    assert second.belief.type is BeliefType.CAUSAL
    assert [b.id for b in second.belief_system.beliefs] == [first.belief.id, second.belief.id]

    listed = await client.list_beliefs(self_model_id)
    assert [b.text for b in listed] == ["Sleep drives my mood", "Late caffeine ruins my sleep"]
    system = await client.get_belief_system(self_model_id)
    assert [b.id for b in system.beliefs] == [b.id for b in listed]
    model = await client.get_self_model(self_model_id)
    assert [b.id for b in model.belief_system.beliefs] == [b.id for b in listed]


async def test_create_and_list_dialectics(client, self_model_id):
    objective = LearningObjective(description="Exercise beliefs", topics=["exercise", "sleep"],
                                  target_belief_type=BeliefType.FALSIFIABLE)
    dialectic = await client.create_dialectic(self_model_id, DialecticType.HEGELIAN, objective)
    assert dialectic.dialectic_type is DialecticType.HEGELIAN
    assert dialectic.learning_objective.topics == ["exercise", "sleep"]
    assert dialectic.learning_objective.target_belief_type is BeliefType.FALSIFIABLE
    pending = dialectic.pending_interaction
    assert pending is not None and "exercise" in pending.question

    default = await client.create_dialectic(self_model_id)
    assert default.dialectic_type is DialecticType.DEFAULT and default.learning_objective is None
    listed = await client.list_dialectics(self_model_id)
    assert {d.id for d in listed} == {dialectic.id, default.id}


async def test_three_answer_dialectic(client, self_model_id):
    dialectic = await client.create_dialectic(self_model_id, "SLEEP_DIET_EXERCISE")
    answers = ["I need about eight hours of sleep. Screens before bed keep me awake.",
               "I eat mostly vegetables and too many snacks at night.",
               "Thirty minutes of walking a day is enough for me."]
    questions = [dialectic.pending_interaction.question]
    for n, answer in enumerate(answers, start=1):
        dialectic = await client.update_dialectic(dialectic.id, self_model_id, answer)
        interactions = dialectic.user_interactions
        assert len(interactions) == n + 1
        answered = interactions[n - 1]
        assert answered.status is InteractionStatus.ANSWERED
        assert answered.question == questions[-1]
        qa = answered.question_answer
        assert qa.answer.user_answer == answer and qa.answer.created_at_millis_utc > 0
        assert qa.extracted_beliefs and all(isinstance(b, Belief) for b in qa.extracted_beliefs)
        assert all(b.text and b.text.rstrip(".") in answer for b in qa.extracted_beliefs)
        assert interactions[-1].status is InteractionStatus.PENDING_ANSWER
        questions.append(interactions[-1].question)
        assert questions[-1] and questions[-1] not in questions[:-1]

    first_qa = dialectic.user_interactions[0].question_answer
    assert [b.type for b in first_qa.extracted_beliefs] == [BeliefType.STATEMENT,
                                                            BeliefType.CAUSAL]
    [stored] = await client.list_dialectics(self_model_id)
    assert stored.model_dump() == dialectic.model_dump()
    extracted = [b.id for i in dialectic.user_interactions[:3]
                 for b in i.question_answer.extracted_beliefs]
    assert [b.id for b in await client.list_beliefs(self_model_id)] == extracted


async def test_dry_run_does_not_persist(client, self_model_id):
    dialectic = await client.create_dialectic(self_model_id)
    question = dialectic.pending_interaction.question
    preview = await client.update_dialectic(dialectic.id, self_model_id,
                                            "Stretching every morning keeps my back healthy.",
                                            dry_run=True)
    assert len(preview.user_interactions) == 2
    assert preview.user_interactions[0].question_answer.extracted_beliefs
    [stored] = await client.list_dialectics(self_model_id)
    assert len(stored.user_interactions) == 1
    assert stored.pending_interaction.question == question
    assert await client.list_beliefs(self_model_id) == []

    real = await client.update_dialectic(dialectic.id, self_model_id, "Stretching helps my back.")
    assert real.user_interactions[0].question == question
    assert len(await client.list_beliefs(self_model_id)) == 1


# --- client error mapping ----------------------------------------------------------------

@pytest.mark.parametrize("bad_key", ["", "garbage-key", str(uuid.uuid4())])
async def test_rejected_api_key_is_502_naming_the_setting(sandbox, bad_key, caplog):
    async with EpistemicClient(sandbox.url, bad_key, timeout=5) as c:
        with pytest.raises(UpstreamError) as info:
            await c.get_self_model("anyone")
    err = info.value
    assert err.status_code == 502
    assert "SMA_EPISTEMIC_API_KEY" in err.message
    assert err.details["upstream_code"] == "unauthenticated"
    if bad_key:
        assert bad_key not in err.message and bad_key not in caplog.text
    assert KEY not in caplog.text


class _UntypedBelief(Wire):
    self_model_id: str
    belief_content: str


async def test_unset_belief_type_upstream_is_validation_failed(client, self_model_id):
    with pytest.raises(ValidationFailed) as info:
        await client._call("CreateBelief", _UntypedBelief(self_model_id=self_model_id,
                                                          belief_content="x"),
                           CreateBeliefResponse)
    assert info.value.status_code == 422
    assert "beliefType" in info.value.message
    assert info.value.details["upstream_code"] == "invalid_argument"


async def test_client_refuses_to_send_an_unset_belief_type(client, sandbox, self_model_id):
    before = len(sandbox_requests(sandbox))
    for bad in (BeliefType.BELIEF_TYPE_INVALID, "NOT_A_TYPE"):
        with pytest.raises(ValidationFailed):
            await client.create_belief(self_model_id, "x", belief_type=bad)
    assert len(sandbox_requests(sandbox)) == before


async def test_invalid_learning_objective_is_validation_failed(client, self_model_id):
    with pytest.raises(ValidationFailed):
        await client.create_dialectic(self_model_id, learning_objective={
            "description": "d", "completion_percentage": 150})


@pytest.mark.parametrize("call", [
    lambda c: c.get_self_model("missing"),
    lambda c: c.list_beliefs("missing"),
    lambda c: c.get_belief_system("missing"),
    lambda c: c.create_belief("missing", "content"),
    lambda c: c.create_dialectic("missing"),
    lambda c: c.update_dialectic("di_missing", "missing", "answer"),
    lambda c: c.list_dialectics("missing"),
])
async def test_unknown_self_model_is_502(client, call):
    with pytest.raises(UpstreamError) as info:
        await call(client)
    assert info.value.status_code == 502
    assert info.value.details["upstream_code"] == "internal"


async def test_injected_non_connect_failure_is_502(client, sandbox, self_model_id):
    httpx.post(f"{sandbox.url}/_sandbox/faults",
               json={"path_prefix": "/EpistemicMeService/ListBeliefs", "fail_status": 503})
    try:
        with pytest.raises(UpstreamError) as info:
            await client.list_beliefs(self_model_id)
    finally:
        httpx.delete(f"{sandbox.url}/_sandbox/faults")
    assert info.value.details["upstream_status"] == 503
    assert await client.list_beliefs(self_model_id) == []


async def test_unreachable_server_is_dependency_unavailable():
    async with EpistemicClient(f"http://127.0.0.1:{free_port()}", KEY, timeout=2) as c:
        with pytest.raises(DependencyUnavailable) as info:
            await c.get_self_model("anyone")
        assert info.value.status_code == 503
        with pytest.raises(DependencyUnavailable):
            await c.create_belief("anyone", "x")


async def test_unconfigured_base_url_is_dependency_unavailable():
    async with EpistemicClient("", KEY) as c:
        with pytest.raises(DependencyUnavailable, match="SMA_EPISTEMIC_BASE_URL"):
            await c.list_dialectics("anyone")


async def test_hanging_server_times_out_within_the_timeout():
    server = BackgroundServer(create_app(api_keys=[KEY])).start()
    # Not stopped: uvicorn would wait for the hung request on shutdown. It is a daemon thread.
    httpx.post(f"{server.url}/_sandbox/faults", json={"hang": True})
    async with EpistemicClient(server.url, KEY, timeout=0.5) as c:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout) as info:
            await c.get_self_model("anyone")
        elapsed = time.monotonic() - started
    assert info.value.status_code == 504
    assert 0.4 < elapsed < 1.5


def _mock_client(handler) -> EpistemicClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return EpistemicClient("http://em.test", KEY, timeout=2, http=http)


async def test_non_json_answer_is_502():
    client = _mock_client(lambda request: httpx.Response(200, text="<html>proxy</html>"))
    with pytest.raises(UpstreamError, match="non-JSON"):
        await client.get_self_model("x")
    client = _mock_client(lambda request: httpx.Response(502, text="Bad Gateway"))
    with pytest.raises(UpstreamError) as info:
        await client.get_self_model("x")
    assert info.value.details["upstream_code"] == "unavailable"


async def test_unexpected_shape_and_missing_message_are_502():
    client = _mock_client(lambda request: httpx.Response(200, json={"selfModel": {"id": 5}}))
    with pytest.raises(UpstreamError, match="unexpected shape"):
        await client.get_self_model("x")
    client = _mock_client(lambda request: httpx.Response(200, json={}))
    with pytest.raises(UpstreamError, match="without selfModel"):
        await client.get_self_model("x")


async def test_not_found_code_maps_to_not_found():
    client = _mock_client(lambda request: httpx.Response(
        404, json={"code": "not_found", "message": "no such dialectic"}))
    with pytest.raises(NotFound, match="no such dialectic"):
        await client.list_dialectics("x")


async def test_reads_retry_once_on_connection_errors_but_writes_do_not():
    calls: list[str] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) % 2 == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"selfModel": {"id": "x"}})

    client = _mock_client(flaky)
    assert (await client.get_self_model("x")).id == "x"
    assert len(calls) == 2
    with pytest.raises(DependencyUnavailable):
        await client.create_self_model("x")
    assert len(calls) == 3


async def test_client_sends_connect_headers_and_tolerates_newer_fields():
    seen: dict = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(request.headers)
        seen["path"] = request.url.path
        return httpx.Response(200, json={"dialectic": {
            "id": "di_1", "dialecticType": "HEGELIAN", "futureField": True,
            "userInteractions": [{"status": "SOME_NEW_STATUS", "type": "QUESTION_ANSWER",
                                  "questionAnswer": {"question": {"question": "Why?"}}}]}})

    dialectic = await _mock_client(handler).create_dialectic("x")
    assert seen["path"] == "/EpistemicMeService/CreateDialectic"
    assert seen["content-type"] == "application/json"
    assert seen["x-api-key"] == KEY and seen["connect-protocol-version"] == "1"
    assert isinstance(dialectic, Dialectic)
    assert dialectic.dialectic_type == DialecticType.HEGELIAN
    assert dialectic.user_interactions[0].status == "SOME_NEW_STATUS"
    assert dialectic.user_interactions[0].question == "Why?"
    assert dialectic.pending_interaction is None


# --- helpers -----------------------------------------------------------------------------

@pytest.mark.parametrize("key, problem", [
    (None, "not set"), ("", "not set"), ("   ", "not set"), (SecretStr(""), "not set"),
    ("garbage", "not a valid"), (SecretStr("1234"), "not a valid"),
    (KEY, None), (SecretStr(KEY), None), (f" {KEY}\n", None),
])
def test_validate_api_key(key, problem):
    message = validate_api_key(key)
    if problem is None:
        assert message is None
    else:
        assert problem in message and "SMA_EPISTEMIC_API_KEY" in message
        assert "garbage" not in message and "1234" not in message


def test_cli_register_prints_a_working_key(sandbox, capsys):
    code = epistemic_cli.main(["register", "--base-url", sandbox.url, "--name", "Ops",
                               "--email", "ops@example.com"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "Registered" in err
    name, key = out.strip().split("=")
    assert name == "SMA_EPISTEMIC_API_KEY" and validate_api_key(key) is None
    assert rpc(sandbox, "CreateSelfModel", {"id": "cli-user"}, key=key).status_code == 200


def test_cli_register_reports_an_unreachable_server(capsys):
    code = epistemic_cli.main(["register", "--base-url", f"http://127.0.0.1:{free_port()}",
                               "--name", "Ops", "--email", "ops@example.com"])
    assert code == 1
    assert "unreachable" in capsys.readouterr().err
