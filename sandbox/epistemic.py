"""In-memory Epistemic Me server speaking the Connect protocol (unary calls, JSON codec).

Wire rules follow the real server (connect-go + protojson): `POST /EpistemicMeService/<Method>`,
`Content-Type: application/json`, lowerCamelCase fields (snake_case accepted on input), enums
by name, int64 as strings, default-valued fields omitted, unknown request fields ignored, and
errors as a non-200 status with `{"code", "message"}`. Like the real handlers, the body is
decoded before the `x-api-key` check, and lookup failures come back as `internal`.

Questions and extracted beliefs are scripted and deterministic; every response carries an
`X-Sandbox: epistemic-me` header so nobody mistakes it for the real platform.
"""
from __future__ import annotations

import copy
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sandbox.faults import install_faults

SERVICE = "EpistemicMeService"
KEYS_ENV = "SMA_SANDBOX_EPISTEMIC_KEYS"
SANDBOX_HEADERS = {"X-Sandbox": "epistemic-me"}

# connectrpc.com/docs/protocol#error-codes
CODE_TO_HTTP = {
    "canceled": 499, "unknown": 500, "invalid_argument": 400, "deadline_exceeded": 504,
    "not_found": 404, "already_exists": 409, "permission_denied": 403,
    "resource_exhausted": 429, "failed_precondition": 400, "aborted": 409,
    "out_of_range": 400, "unimplemented": 501, "internal": 500, "unavailable": 503,
    "data_loss": 500, "unauthenticated": 401,
}

ENUMS = {
    "BeliefType": ("BELIEF_TYPE_INVALID", "STATEMENT", "FALSIFIABLE", "CAUSAL"),
    "DialecticType": ("INVALID", "DEFAULT", "HEGELIAN", "SLEEP_DIET_EXERCISE"),
}

# Request messages as protojson sees them: field -> kind ("msg:X" nests, "[string]" repeats).
MESSAGES: dict[str, dict[str, str]] = {
    "CreateDeveloperRequest": {"name": "string", "email": "string"},
    "CreateSelfModelRequest": {"id": "string", "philosophies": "[string]"},
    "GetSelfModelRequest": {"selfModelId": "string"},
    "CreateBeliefRequest": {"selfModelId": "string", "beliefContent": "string",
                            "beliefType": "enum:BeliefType"},
    "ListBeliefsRequest": {"selfModelId": "string", "beliefIds": "[string]"},
    "GetBeliefSystemRequest": {"selfModelId": "string", "includeMetrics": "bool",
                               "conceptualize": "bool"},
    "LearningObjective": {"description": "string", "topics": "[string]",
                          "targetBeliefType": "enum:BeliefType", "completionPercentage": "float"},
    "CreateDialecticRequest": {"selfModelId": "string", "dialecticType": "enum:DialecticType",
                               "perspectiveModelIds": "[string]",
                               "learningObjective": "msg:LearningObjective"},
    "UserAnswer": {"userAnswer": "string", "createdAtMillisUtc": "int64"},
    "UpdateDialecticRequest": {"id": "string", "selfModelId": "string", "answer": "msg:UserAnswer",
                               "dryRun": "bool", "customQuestion": "string"},
    "ListDialecticsRequest": {"selfModelId": "string"},
}

INT64_FIELDS = {"createdAtMillisUtc", "updatedAtMillisUtc", "createdAt", "updatedAt"}
ENUM_FIELDS = {"type", "status", "dialecticType", "agentType", "targetBeliefType"}
ZERO_ENUMS = {"BELIEF_TYPE_INVALID", "INVALID", "STATUS_INVALID", "INTERACTION_TYPE_INVALID",
              "AGENT_TYPE_INVALID"}

QUESTIONS = {
    "DEFAULT": (
        "What does being healthy mean to you day to day?",
        "Which one habit do you believe has the biggest effect on how you feel?",
        "What makes it hard for you to keep the habits you believe in?",
        "How do you tell whether a health change is actually working for you?",
        "What health advice have you stopped believing, and why?",
    ),
    "HEGELIAN": (
        "What is one health habit you are convinced is good for you?",
        "What is the strongest argument you have heard against that habit?",
        "How would you reconcile those two views in what you actually do?",
        "What evidence would make you change your mind about it?",
    ),
    "SLEEP_DIET_EXERCISE": (
        "How many hours of sleep do you need to feel rested, and what gets in the way?",
        "What do you believe a healthy diet looks like for you on an ordinary weekday?",
        "How much exercise do you think is enough to make a real difference to your health?",
        "Which of sleep, diet or exercise is hardest for you to keep consistent, and why?",
        "When you sleep badly, how does it change what you eat or how you move?",
    ),
}
TOPIC_QUESTION = "Thinking about {topic}: what do you believe works for you, and how do you know?"
CAUSAL_MARKERS = re.compile(
    r"\b(because|causes?|leads? to|makes? me|keeps? me|helps?|hurts?|ruins?|so that|if)\b", re.I)


class ConnectError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> ConnectError:
    return ConnectError("invalid_argument", message)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def _canonical_key(key: str) -> str | None:
    try:
        return str(uuid.UUID(key.strip()))
    except (ValueError, AttributeError):
        return None


# --- protojson-like decoding -------------------------------------------------------------

def decode(message: str, data: object, path: str = "") -> dict:
    if not isinstance(data, dict):
        raise _invalid(f"proto: syntax error: {path or message} must be a JSON object")
    out = {}
    for name, kind in MESSAGES[message].items():
        raw = data.get(name, data.get(_snake(name)))
        out[name] = _decode_value(kind, raw, f"{path}{name}")
    return out


def _decode_value(kind: str, raw: object, path: str) -> object:
    def bad() -> ConnectError:
        return _invalid(f"proto: invalid value for {kind} field {path}: {json.dumps(raw)}")

    if kind.startswith("msg:"):
        return None if raw is None else decode(kind[4:], raw, path + ".")
    if kind == "[string]":
        if raw is None:
            return []
        if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
            raise bad()
        return list(raw)
    if kind.startswith("enum:"):
        names = ENUMS[kind[5:]]
        if raw is None:
            return names[0]
        if isinstance(raw, str):
            return raw if raw in names else names[0]  # unknown names are discarded
        if isinstance(raw, int) and not isinstance(raw, bool):
            return names[raw] if 0 <= raw < len(names) else names[0]
        raise bad()
    if kind == "string":
        if raw is None:
            return ""
        if not isinstance(raw, str):
            raise bad()
        return raw
    if kind == "bool":
        if raw is None:
            return False
        if not isinstance(raw, bool):
            raise bad()
        return raw
    if kind == "int64":
        if raw is None:
            return 0
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and re.fullmatch(r"-?\d+", raw):
            return int(raw)
        raise bad()
    if kind == "float":
        if raw is None:
            return 0.0
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        try:
            return float(raw)  # protojson also takes numbers as strings
        except (TypeError, ValueError):
            raise bad() from None
    raise AssertionError(kind)


def encode(value: object, key: str = "") -> object:
    """Drop default-valued fields and stringify int64s, as protojson does on output."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            v = encode(v, k)
            if v is None or v == "" or v == [] or v is False:
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0:
                continue
            if k in ENUM_FIELDS and v in ZERO_ENUMS:
                continue
            out[k] = str(v) if k in INT64_FIELDS else v
        return out
    if isinstance(value, list):
        return [encode(v, key) for v in value]
    return value


# --- state -------------------------------------------------------------------------------

@dataclass
class SelfModelRecord:
    id: str
    philosophies: list[str]
    beliefs: list[dict] = field(default_factory=list)
    dialectics: dict[str, dict] = field(default_factory=dict)

    def belief_system(self) -> dict:
        return {"beliefs": copy.deepcopy(self.beliefs)}

    def wire(self) -> dict:
        return {"id": self.id, "philosophies": list(self.philosophies),
                "beliefSystem": self.belief_system(),
                "dialectics": copy.deepcopy(list(self.dialectics.values()))}


@dataclass
class Store:
    api_keys: set[str] = field(default_factory=set)
    developers: dict[str, dict] = field(default_factory=dict)
    self_models: dict[str, SelfModelRecord] = field(default_factory=dict)

    def self_model(self, self_model_id: str) -> SelfModelRecord:
        record = self.self_models.get(self_model_id)
        if record is None:
            raise ConnectError("internal", f"self model not found: {self_model_id!r}")
        return record


def _belief(self_model_id: str, content: str, belief_type: str) -> dict:
    return {"id": f"bl_{uuid.uuid4()}", "selfModelId": self_model_id, "version": 1,
            "type": belief_type, "content": [{"rawStr": content}]}


def _extract_beliefs(self_model_id: str, answer: str, target_type: str) -> list[dict]:
    """Each substantial sentence of the answer becomes one belief (at most three)."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", answer) if s.strip()]
    sentences = [s for s in sentences if len(s.split()) >= 3] or [answer.strip()]
    beliefs = []
    for sentence in sentences[:3]:
        text = sentence[0].upper() + sentence[1:]
        if text[-1] not in ".!?":
            text += "."
        kind = "CAUSAL" if CAUSAL_MARKERS.search(text) else target_type
        beliefs.append(_belief(self_model_id, text, kind if kind in ENUMS["BeliefType"][1:]
                               else "STATEMENT"))
    return beliefs


def _question(dialectic: dict, index: int) -> str:
    topics = (dialectic.get("learningObjective") or {}).get("topics") or []
    if topics:
        return TOPIC_QUESTION.format(topic=topics[index % len(topics)])
    bank = QUESTIONS.get(dialectic["agent"]["dialecticType"], QUESTIONS["DEFAULT"])
    return bank[index % len(bank)]


def _pending_interaction(question: str) -> dict:
    now = _now_ms()
    return {"id": f"dl_{uuid.uuid4()}", "status": "PENDING_ANSWER", "type": "QUESTION_ANSWER",
            "interaction": {"questionAnswer": {"question": {"question": question,
                                                            "createdAtMillisUtc": now}}},
            "updatedAtMillisUtc": now}


# --- methods -----------------------------------------------------------------------------

def create_developer(store: Store, req: dict) -> dict:
    if not req["name"].strip() or not req["email"].strip():
        raise _invalid("name and email are required")
    key = str(uuid.uuid4())
    now = _now_ms()
    developer = {"id": str(uuid.uuid4()), "name": req["name"], "email": req["email"],
                 "apiKeys": [key], "createdAt": now, "updatedAt": now}
    store.developers[developer["id"]] = developer
    store.api_keys.add(key)
    return {"developer": developer}


def create_self_model(store: Store, req: dict) -> dict:
    if not req["id"]:
        raise ConnectError("internal", "self model ID cannot be empty")
    # The real server overwrites an existing self model with an empty one; so do we.
    record = SelfModelRecord(id=req["id"], philosophies=req["philosophies"])
    store.self_models[record.id] = record
    return {"selfModel": record.wire()}


def get_self_model(store: Store, req: dict) -> dict:
    return {"selfModel": store.self_model(req["selfModelId"]).wire()}


def create_belief(store: Store, req: dict) -> dict:
    if req["beliefType"] == "BELIEF_TYPE_INVALID":
        raise _invalid("beliefType must be set (STATEMENT, FALSIFIABLE or CAUSAL)")
    if not req["beliefContent"].strip():
        raise _invalid("beliefContent must not be empty")
    record = store.self_model(req["selfModelId"])
    belief = _belief(record.id, req["beliefContent"], req["beliefType"])
    record.beliefs.append(belief)
    return {"belief": copy.deepcopy(belief), "beliefSystem": record.belief_system()}


def list_beliefs(store: Store, req: dict) -> dict:
    record = store.self_model(req["selfModelId"])
    wanted = set(req["beliefIds"])
    beliefs = [b for b in record.beliefs if not wanted or b["id"] in wanted]
    return {"beliefs": copy.deepcopy(beliefs), "beliefSystem": record.belief_system()}


def get_belief_system(store: Store, req: dict) -> dict:
    return {"beliefSystem": store.self_model(req["selfModelId"]).belief_system()}


def create_dialectic(store: Store, req: dict) -> dict:
    record = store.self_model(req["selfModelId"])
    objective = req["learningObjective"]
    if objective is not None and not 0 <= objective["completionPercentage"] <= 100:
        raise _invalid("learningObjective.completionPercentage must be between 0 and 100")
    dialectic_type = req["dialecticType"] if req["dialecticType"] != "INVALID" else "DEFAULT"
    dialectic = {"id": f"di_{uuid.uuid4()}", "selfModelId": record.id,
                 "agent": {"agentType": "AGENT_TYPE_GPT_LATEST", "dialecticType": dialectic_type},
                 "learningObjective": objective, "userInteractions": []}
    dialectic["userInteractions"].append(_pending_interaction(_question(dialectic, 0)))
    record.dialectics[dialectic["id"]] = dialectic
    return {"dialectic": copy.deepcopy(dialectic)}


def update_dialectic(store: Store, req: dict) -> dict:
    record = store.self_model(req["selfModelId"])
    stored = record.dialectics.get(req["id"])
    if stored is None:
        raise ConnectError("internal", f"dialectic not found: {req['id']!r}")
    answer = req["answer"] or {"userAnswer": "", "createdAtMillisUtc": 0}
    if not answer["userAnswer"].strip():
        raise _invalid("answer.userAnswer must not be empty")
    dialectic = copy.deepcopy(stored)
    pending = dialectic["userInteractions"][-1]
    objective = dialectic.get("learningObjective")
    target = (objective or {}).get("targetBeliefType") or "STATEMENT"
    now = _now_ms()
    beliefs = _extract_beliefs(record.id, answer["userAnswer"], target)
    qa = pending["interaction"]["questionAnswer"]
    qa["answer"] = {"userAnswer": answer["userAnswer"],
                    "createdAtMillisUtc": answer["createdAtMillisUtc"] or now}
    qa["extractedBeliefs"] = beliefs
    qa["updatedAtMillisUtc"] = now
    pending.update(status="ANSWERED", updatedAtMillisUtc=now)
    answered = sum(1 for i in dialectic["userInteractions"] if i["status"] == "ANSWERED")
    if objective is not None:
        goal = max(len(objective.get("topics") or []), 3)
        objective["completionPercentage"] = min(100.0, round(answered * 100 / goal, 1))
    question = req["customQuestion"] or _question(dialectic, answered)
    dialectic["userInteractions"].append(_pending_interaction(question))
    if not req["dryRun"]:
        record.dialectics[dialectic["id"]] = dialectic
        record.beliefs.extend(copy.deepcopy(beliefs))
    return {"dialectic": copy.deepcopy(dialectic)}


def list_dialectics(store: Store, req: dict) -> dict:
    record = store.self_model(req["selfModelId"])
    return {"dialectics": copy.deepcopy(list(record.dialectics.values()))}


Handler = Callable[[Store, dict], dict]
METHODS: dict[str, tuple[str, Handler, bool]] = {  # name -> (request message, handler, needs key)
    "CreateDeveloper": ("CreateDeveloperRequest", create_developer, False),
    "CreateSelfModel": ("CreateSelfModelRequest", create_self_model, True),
    "GetSelfModel": ("GetSelfModelRequest", get_self_model, True),
    "CreateBelief": ("CreateBeliefRequest", create_belief, True),
    "ListBeliefs": ("ListBeliefsRequest", list_beliefs, True),
    "GetBeliefSystem": ("GetBeliefSystemRequest", get_belief_system, True),
    "CreateDialectic": ("CreateDialecticRequest", create_dialectic, True),
    "UpdateDialectic": ("UpdateDialecticRequest", update_dialectic, True),
    "ListDialectics": ("ListDialecticsRequest", list_dialectics, True),
}


# --- app ---------------------------------------------------------------------------------

def _error(code: str, message: str, status: int | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message},
                        status_code=status or CODE_TO_HTTP.get(code, 500), headers=SANDBOX_HEADERS)


def _check_key(store: Store, key: str | None) -> None:
    if not key:
        raise ConnectError("unauthenticated", "missing API key")
    canonical = _canonical_key(key)
    if canonical is None:
        raise ConnectError("unauthenticated", "invalid API key format")
    if canonical not in store.api_keys:
        raise ConnectError("unauthenticated", "unknown API key")


def _configured_keys(api_keys: Iterable[str] | None) -> set[str]:
    raw = list(api_keys or []) + os.environ.get(KEYS_ENV, "").split(",")
    return {k for k in (_canonical_key(r) for r in raw if r.strip()) if k}


def create_app(api_keys: Iterable[str] | None = None) -> FastAPI:
    app = FastAPI(title="Epistemic Me sandbox (local, in-memory)",
                  description="Scripted stand-in for the Epistemic Me Connect API. Not real data.")
    store = Store(api_keys=_configured_keys(api_keys))
    app.state.store = store
    install_faults(app)

    @app.post(f"/{SERVICE}/{{method}}", include_in_schema=False)
    async def call(method: str, request: Request) -> Response:
        spec = METHODS.get(method)
        if spec is None:
            return _error("unimplemented", f"{SERVICE}/{method} is not implemented", 404)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return Response(status_code=415, headers={"Accept-Post": "application/json",
                                                      **SANDBOX_HEADERS})
        message, handler, needs_key = spec
        try:
            body = await request.body()
            if not body:
                raise _invalid("zero-length payload is not a valid JSON object")
            try:
                data = json.loads(body)
            except (ValueError, UnicodeDecodeError) as exc:
                raise _invalid(f"proto: syntax error: {exc}") from None
            req = decode(message, data)
            if needs_key:
                _check_key(store, request.headers.get("x-api-key"))
            result = handler(store, req)
        except ConnectError as exc:
            return _error(exc.code, exc.message)
        return JSONResponse(encode(result), headers=SANDBOX_HEADERS)

    @app.post("/{path:path}", include_in_schema=False)
    async def unknown(path: str) -> Response:
        return _error("unimplemented", f"/{path} is not a Connect procedure", 404)

    return app
