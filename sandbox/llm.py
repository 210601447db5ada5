"""A local stand-in for an OpenAI-compatible chat completions endpoint.

It speaks enough of the OpenAI protocol (`POST /v1/chat/completions`, `GET /v1/models`) for
the `openai` package and DeepEval to run against it, and answers deterministically: the same
request always gets the same content and usage. Conventions:

- Auth: `Authorization: Bearer <any non-empty key>`; otherwise 401 with an OpenAI-style error.
- Token usage is counted in words (prompt: all message contents; completion: the reply).
  `GET /_sandbox/usage` totals it across requests, `DELETE /_sandbox/usage` resets it.
- `response_format` `json_schema` (or `json_object`) answers with JSON built by walking the
  given schema (for `json_object`, the schema is inferred from the last example JSON object in
  the prompt). Values come from the prompt: the conversation it quotes, its scenario, the last
  user message. Yes/no verdicts follow the prompt's own definition of "yes"; completion checks
  (`is_complete`) stay false until the quoted conversation has `complete_after_turns` turns.
- Plain requests get a coach-like reply, or a user-like one when the system prompt casts the
  model as the user; plain replies start with "[sandbox]".
- `install_faults` knobs apply (`/_sandbox/faults`).
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from sandbox.faults import install_faults

SANDBOX_MODELS = ("sandbox-coach", "sandbox-user", "sandbox-judge", "gpt-4o-mini")
SANDBOX_NS = uuid.UUID("0b5e55ed-11a0-4c0a-9e55-5a4db0c0ffee")
MAX_DEPTH = 8

_STOPWORDS = frozenset("""
about above after again also always another around because been before being below between
both could does doing down during each even every from further have having here into just
like make many more most much must need only other over really same should some still such
than that their them then there these they thing think this those through under until very
want what when where which while with would your yours you're i'm it's that's there's don't
can't hello thanks thank please help sure okay assistant user conversation message tell feel
feeling badly well good know going lately maybe sounds great things little quite tried trying
honest mostly notice doable start sandbox telling wants typical
""".split())
_USER_CAST = re.compile(r"\b(?:you are|pretend you are|act as|play)\s+(?:a|an|the)?\s*"
                        r"(?:simulated\s+)?(?:user|patient|client)\b", re.I)
_YES_MEANS = re.compile(r"""["'`]*yes["'`]*\s*(?:means|indicates|if|=|:)\s*([^\n]{0,160})""", re.I)
_NEGATIVE = re.compile(r"contradict|forget|forgot|violat|irrelevan|harm|toxic|bias|hallucinat|"
                       r"leak|unsafe|fail|incorrect|did not|does not adhere|out of character", re.I)
_COMPLETION_NAME = re.compile(r"complete|finished|done|should_end|ended", re.I)
_LIST_OF_ASKS = re.compile(r"intention|statement|claim|truth|fact|topic|goal", re.I)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        self.status, self.message = status, message
        self.type, self.param, self.code = type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# --- reading the prompt ---------------------------------------------------------------------

def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _words(text: str) -> list[str]:
    return re.findall(r"\S+", text)


def _keywords(text: str, n: int = 3) -> list[str]:
    seen: list[str] = []
    for w in re.findall(r"[A-Za-z][A-Za-z'-]{3,}", text):
        w = w.lower().strip("'-")
        if w not in _STOPWORDS and w not in seen:
            seen.append(w)
        if len(seen) == n:
            break
    return seen


def _snippet(text: str, n_words: int = 12) -> str:
    words = _words(" ".join(text.split()))
    return " ".join(words[:n_words]).rstrip(".,;:!?") if words else ""


def _is_turn_list(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, dict) and isinstance(t.get("content"), str)
                    and t.get("role") in ("user", "assistant", "system") for t in value))


def _literal_at(text: str, start: int, closer: str) -> Any:
    """The JSON or Python literal starting at `start` (DeepEval renders turns with `str()`)."""
    try:
        return json.JSONDecoder().raw_decode(text, start)[0]
    except ValueError:
        pass
    end, attempts = text.find(closer, start), 0
    while end != -1 and attempts < 200:
        try:
            return ast.literal_eval(text[start:end + 1])
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            end, attempts = text.find(closer, end + 1), attempts + 1
    return None


def _last_conversation(text: str) -> list[dict] | None:
    """The last role/content list quoted in the prompt: examples come first in DeepEval's
    templates, the real conversation last."""
    found = None
    for m in re.finditer(r"\[\s*\{", text):
        value = _literal_at(text, m.start(), "]")
        if _is_turn_list(value):
            found = value
    return found


def _last_example_object(text: str) -> dict | None:
    """The last top-level JSON object in the prompt that is not a conversation turn."""
    decoder, found, pos = json.JSONDecoder(), None, 0
    while (start := text.find("{", pos)) != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            pos = start + 1
            continue
        if isinstance(value, dict) and not {"role", "content"} <= value.keys():
            found = value
        pos = end
    return found


def _last_quoted(label: str, text: str) -> str | None:
    matches = re.findall(rf'^\s*{label}:\s*"(.*)"\s*$', text, re.M)
    return matches[-1] if matches else None


@dataclass(frozen=True)
class PromptContext:
    prompt: str                      # the last user message
    system: str
    user_messages: int               # user messages in the request itself
    conversation: list[dict] = field(default_factory=list)  # quoted inside the prompt
    scenario: str | None = None
    expected_outcome: str | None = None

    @property
    def user_turns(self) -> list[str]:
        return [t["content"] for t in self.conversation if t["role"] == "user"]

    @property
    def assistant_turns(self) -> list[str]:
        return [t["content"] for t in self.conversation if t["role"] == "assistant"]

    @property
    def subject(self) -> str:
        """What the request is about: the last quoted user turn, the scenario, or the prompt."""
        turns = self.user_turns
        return turns[-1] if turns else (self.scenario or self.prompt)

    @property
    def yes_means_problem(self) -> bool:
        m = _YES_MEANS.search(self.prompt)
        return bool(m and _NEGATIVE.search(m.group(1)))

    @property
    def casts_model_as_user(self) -> bool:
        return bool(_USER_CAST.search(self.system))

    @property
    def seed(self) -> int:
        return int(hashlib.sha256(self.prompt.encode()).hexdigest()[:8], 16)


def read_prompt(messages: list[dict]) -> PromptContext:
    system = "\n".join(_content_text(m.get("content")) for m in messages
                       if m.get("role") in ("system", "developer"))
    users = [_content_text(m.get("content")) for m in messages if m.get("role") == "user"]
    prompt = users[-1] if users else ""
    quoted = _last_conversation(prompt) or []
    if not quoted and len(messages) > 1:
        # A chat-style request: the messages themselves are the conversation.
        quoted = [{"role": m["role"], "content": _content_text(m.get("content"))}
                  for m in messages if m.get("role") in ("user", "assistant")]
    return PromptContext(prompt=prompt, system=system, user_messages=len(users),
                         conversation=quoted, scenario=_last_quoted("Scenario", prompt),
                         expected_outcome=_last_quoted("Expected Outcome", prompt))


# --- lines of dialogue ----------------------------------------------------------------------

_COACH_QUESTIONS = (
    "What does a typical day look like for your sleep, activity and meals?",
    "Which part of that would you like to work on first?",
    "What has made this hard to change so far?",
    "Shall we set one small, measurable step for this week?",
    "How will you know the change is working for you?",
)


def coach_line(ctx: PromptContext) -> str:
    topic = " and ".join(_keywords(ctx.subject, 2)) or "your health"
    turn = max(len(ctx.user_turns), ctx.user_messages, 1) - 1
    return f"Thanks for telling me about {topic}. {_COACH_QUESTIONS[turn % len(_COACH_QUESTIONS)]}"


_IRREGULAR = {"is": "am", "has": "have", "does": "do"}


def _first_person(scenario: str) -> str | None:
    """"A user wants a check of their sleep" -> "I want a check of my sleep"."""
    m = re.match(r"(?:an?|the)\s+(?:user|person|patient|client)\s+(\w+)\b(.*)", scenario,
                 re.I | re.S)
    if not m:
        return None
    verb = m.group(1).lower()
    verb = _IRREGULAR.get(verb, verb[:-1] if verb.endswith("s") else verb)
    return f"I {verb}" + re.sub(r"\b(their|his|her)\b", "my", m.group(2))


def user_line(ctx: PromptContext) -> str:
    if not ctx.conversation:
        about = (ctx.scenario or _snippet(ctx.prompt, 20) or "my health").strip().rstrip(".")
        mine = _first_person(about)
        return (f"Hi, {mine}. Where should I start?" if mine else
                f"Hi, I'd like some help with this: {about}. Where should I start?")
    said = ctx.assistant_turns[-1] if ctx.assistant_turns else ctx.subject
    topic = " and ".join(_keywords(said, 2)) or "that"
    lines = (
        f"Mostly {topic}, if I'm honest. I notice it most in the evenings.",
        f"I think I'd start with {topic}. What would that look like day to day?",
        f"That sounds doable. Can we turn {topic} into a plan for this week?",
        f"Thanks, that helps with {topic}. I'll try it and tell you how it went.",
    )
    return lines[(len(ctx.user_turns) - 1) % len(lines)]


def plain_reply(ctx: PromptContext) -> str:
    return "[sandbox] " + (user_line(ctx) if ctx.casts_model_as_user else coach_line(ctx))


# --- JSON from a schema ---------------------------------------------------------------------

def infer_schema(example: Any) -> dict:
    """A JSON schema describing an example value (for `json_object` requests)."""
    if isinstance(example, bool):
        return {"type": "boolean"}
    if isinstance(example, int):
        return {"type": "integer"}
    if isinstance(example, float):
        return {"type": "number"}
    if isinstance(example, list):
        items = infer_schema(example[0]) if example else {"type": "string"}
        return {"type": "array", "items": items}
    if isinstance(example, dict):
        return {"type": "object", "properties": {k: infer_schema(v) for k, v in example.items()},
                "required": list(example)}
    return {"type": "string"}


class SchemaFiller:
    """Builds a value that validates against a JSON schema, choosing contents from the prompt.

    Generic walk over object/properties/required/additionalProperties, array/items/prefixItems,
    enum/const, anyOf/oneOf/allOf, $ref into $defs/definitions and type lists, with small
    heuristics by field name for the text, booleans and numbers DeepEval's schemas ask for.
    """

    def __init__(self, root: dict, ctx: PromptContext, complete_after_turns: int):
        self.root, self.ctx, self.complete_after_turns = root, ctx, complete_after_turns

    def fill(self) -> Any:
        return self.value(self.root, name="", required=True, depth=0, index=0)

    # structure

    def resolve(self, schema: Any) -> dict:
        seen = 0
        while isinstance(schema, dict) and "$ref" in schema and seen < 32:
            target: Any = self.root
            for part in schema["$ref"].lstrip("#/").split("/"):
                if part:
                    target = target[part.replace("~1", "/").replace("~0", "~")]
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
            seen += 1
        return schema if isinstance(schema, dict) else {}

    def value(self, schema: Any, *, name: str, required: bool, depth: int, index: int,
              siblings: dict | None = None) -> Any:
        schema = self.resolve(schema)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return self.choose_enum(schema["enum"], name)
        if "allOf" in schema:
            return self.value(self.merge(schema["allOf"]), name=name, required=required,
                              depth=depth, index=index, siblings=siblings)
        branches = schema.get("anyOf") or schema.get("oneOf")
        types = schema.get("type")
        if branches or isinstance(types, list):
            options = ([self.resolve(b) for b in branches] if branches
                       else [{**schema, "type": t} for t in types])
            concrete = [o for o in options if o.get("type") != "null"]
            nullable = len(concrete) < len(options)
            if not concrete or (nullable and (depth > MAX_DEPTH or (
                    not required and concrete[0].get("type") in ("integer", "number")))):
                return None  # e.g. an optional index: "none of the above"
            return self.value(concrete[0], name=name, required=required, depth=depth,
                              index=index, siblings=siblings)
        kind = types or ("object" if "properties" in schema or "additionalProperties" in schema
                         else "array" if "items" in schema else "string")
        if kind == "object":
            return self.object(schema, depth)
        if kind == "array":
            return self.array(schema, name, depth)
        if kind == "boolean":
            return self.boolean(name)
        if kind in ("integer", "number"):
            return self.number(schema, name, kind)
        if kind == "null":
            return None
        return self.string(schema, name, index, siblings or {})

    @staticmethod
    def merge(parts: list[dict]) -> dict:
        merged: dict = {}
        for part in parts:
            for key, val in part.items():
                if key == "properties":
                    merged.setdefault("properties", {}).update(val)
                elif key == "required":
                    merged["required"] = sorted(set(merged.get("required", [])) | set(val))
                else:
                    merged.setdefault(key, val)
        return merged

    def object(self, schema: dict, depth: int) -> dict:
        props = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        out: dict = {}
        for key, sub in props.items():
            if depth > MAX_DEPTH and key not in required:
                continue
            out[key] = self.value(sub, name=key, required=key in required, depth=depth + 1,
                                  index=0, siblings=out)
        extra = schema.get("additionalProperties")
        wanted = max(schema.get("minProperties", 0) - len(out), 0 if props else 1)
        if isinstance(extra, dict) and depth <= MAX_DEPTH:
            keys = _keywords(self.ctx.subject, wanted) or []
            for i in range(wanted):
                key = keys[i] if i < len(keys) else f"sandbox_key_{i + 1}"
                out[key] = self.value(extra, name=key, required=True, depth=depth + 1, index=i)
        return out

    def array(self, schema: dict, name: str, depth: int) -> list:
        prefix = schema.get("prefixItems") or []
        items = schema.get("items", {} if not prefix else False)
        item_schema = self.resolve(items) if isinstance(items, dict) else {}
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        item_props = item_schema.get("properties")
        if depth > MAX_DEPTH:
            count = low
        elif name == "verdicts" and item_props is not None and "verdict" not in item_props:
            count = low  # a list of flagged problems (e.g. role adherence): the sandbox flags none
        elif _LIST_OF_ASKS.search(name):
            count = min(max(len(self.ctx.user_turns), 1), 5)
        else:
            count = 1
        count = max(count, low, len(prefix))
        if items is False:
            count = min(count, len(prefix))
        if high is not None:
            count = min(count, high)
        item_name = name[:-1] if name.endswith("s") else name
        out = []
        for i in range(count):
            sub = prefix[i] if i < len(prefix) else items if isinstance(items, dict) else {}
            out.append(self.value(sub, name=item_name, required=True, depth=depth + 1, index=i))
        if schema.get("uniqueItems"):
            out = [f"{v} #{i + 1}" if isinstance(v, str) and out.index(v) != i else v
                   for i, v in enumerate(out)]
        return out

    # leaves

    def choose_enum(self, options: list, name: str) -> Any:
        lowered = [str(o).lower() for o in options]
        if "yes" in lowered and "no" in lowered:
            return options[lowered.index("no" if self.ctx.yes_means_problem else "yes")]
        return options[0]

    def boolean(self, name: str) -> bool:
        if _COMPLETION_NAME.search(name):
            return len(self.ctx.conversation) >= self.complete_after_turns
        return not (_NEGATIVE.search(name) or "interrupt" in name.lower())

    def number(self, schema: dict, name: str, kind: str) -> int | float:
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        lowered = name.lower()
        if "score" in lowered or "rating" in lowered:
            value: float = (high * 0.8 if high is not None else 8)
        elif "index" in lowered:
            value = low if low is not None else 0
        elif "count" in lowered or "number" in lowered or "total" in lowered:
            value = len(self.ctx.conversation) or 1
        else:
            value = low if low is not None else 1
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            value = schema["exclusiveMinimum"] + 1
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            value = schema["exclusiveMaximum"] - (1 if kind == "integer" else 0.01)
        if low is not None:
            value = max(value, low)
        if high is not None:
            value = min(value, high)
        return int(value) if kind == "integer" else float(value)

    def string(self, schema: dict, name: str, index: int, siblings: dict) -> str:
        text = self.text_for(schema.get("format"), name.lower(), index, siblings)
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        while len(text) < low:
            text += " sandbox"
        return text[:high] if high is not None else text

    def text_for(self, fmt: str | None, name: str, index: int, siblings: dict) -> str:
        ctx = self.ctx
        if fmt == "date-time":
            return "2024-01-01T00:00:00Z"
        if fmt == "date":
            return "2024-01-01"
        if fmt == "uuid" or name == "id" or name.endswith("_id"):
            return str(uuid.uuid5(SANDBOX_NS, f"{ctx.seed}:{name}:{index}"))
        if fmt == "email":
            return "sandbox@example.com"
        if fmt in ("uri", "url"):
            return "https://example.com/sandbox"
        if name in ("simulated_input", "utterance") or name.endswith("user_input"):
            return user_line(ctx)
        if name in ("response", "answer", "reply", "content", "message", "output", "text"):
            return coach_line(ctx)
        if any(k in name for k in ("reason", "explanation", "rationale", "feedback", "comment")):
            return self.reason(siblings)
        if _LIST_OF_ASKS.search(name):
            turns = ctx.user_turns
            said = turns[index] if index < len(turns) else ctx.subject
            return f"User wants help with {_snippet(said, 10) or 'their health'}"
        if name in ("name", "title", "label"):
            return "Sandbox " + " ".join(w.title() for w in _keywords(ctx.subject, 2))
        return _snippet(ctx.subject) or "sandbox"

    def reason(self, siblings: dict) -> str:
        ctx, n = self.ctx, len(self.ctx.conversation)
        grounded = ctx.conversation or ctx.scenario
        about = (" and ".join(_keywords(ctx.subject, 2)) if grounded else ""
                 ) or "the user's requests"
        turns = f"{n} turn" + ("" if n == 1 else "s")
        for key, val in siblings.items():
            if isinstance(val, bool) and _COMPLETION_NAME.search(key):
                return (f"After {turns} the coach has addressed {about}; the outcome is met."
                        if val else
                        f"Only {turns} so far; the conversation about {about} should continue.")
            if str(val).lower() in ("yes", "no"):
                problem = (str(val).lower() == "yes") == ctx.yes_means_problem
                return (f"The assistant did not address {about}." if problem else
                        f"The assistant's replies stay on {about} and respond to the user.")
        scores = re.findall(r"score\s*:\s*([0-9]+(?:\.[0-9]+)?)\s*$", ctx.prompt, re.I | re.M)
        if scores:
            return f"The score is {scores[-1]} because the assistant engaged with {about}."
        return f"Based on the conversation about {about}."


# --- the app --------------------------------------------------------------------------------

@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    by_model: dict[str, int] = field(default_factory=dict)

    def add(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.by_model[model] = self.by_model.get(model, 0) + 1

    def reset(self) -> None:
        self.requests = self.prompt_tokens = self.completion_tokens = 0
        self.by_model.clear()

    def as_dict(self) -> dict:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "by_model": dict(self.by_model)}


def _check_auth(request: Request) -> None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise OpenAIError(401, "Incorrect API key provided: a non-empty bearer key is required.",
                          code="invalid_api_key")


def _answer(body: dict, complete_after_turns: int) -> str:
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        raise OpenAIError(400, "'messages' must be a non-empty array of objects.", param="messages")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise OpenAIError(400, "'model' is required.", param="model")
    if body.get("stream"):
        raise OpenAIError(400, "The sandbox does not stream; send stream=false.", param="stream")
    ctx = read_prompt(messages)
    fmt = body.get("response_format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return plain_reply(ctx)
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise OpenAIError(400, "'response_format.json_schema.schema' must be an object.",
                              param="response_format")
    elif kind == "json_object":
        example = _last_example_object(ctx.prompt)
        schema = infer_schema(example if example else {"response": ""})
    else:
        raise OpenAIError(400, f"Unsupported response_format type {kind!r}.",
                          param="response_format")
    return json.dumps(SchemaFiller(schema, ctx, complete_after_turns).fill(), ensure_ascii=False)


def create_app(*, complete_after_turns: int = 6) -> FastAPI:
    app = FastAPI(title="Sandbox OpenAI-compatible LLM")
    usage = Usage()
    app.state.usage = usage
    install_faults(app)

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError):
        return exc.response()

    @app.get("/v1/models")
    async def list_models(request: Request):
        _check_auth(request)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                            "owned_by": "sandbox"} for m in SANDBOX_MODELS]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _check_auth(request)
        try:
            body = await request.json()
        except ValueError:
            raise OpenAIError(400, "The request body is not valid JSON.")
        if not isinstance(body, dict):
            raise OpenAIError(400, "The request body must be a JSON object.")
        content = _answer(body, complete_after_turns)
        prompt_text = "\n".join(_content_text(m.get("content")) for m in body["messages"])
        prompt_tokens, completion_tokens = len(_words(prompt_text)), len(_words(content))
        usage.add(body["model"], prompt_tokens, completion_tokens)
        digest = hashlib.sha256(f"{body['model']}\n{prompt_text}".encode()).hexdigest()
        return {
            "id": f"chatcmpl-sandbox-{digest[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": "sandbox",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content, "refusal": None}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    @app.get("/_sandbox/usage", include_in_schema=False)
    async def get_usage():
        return usage.as_dict()

    @app.delete("/_sandbox/usage", include_in_schema=False)
    async def reset_usage():
        usage.reset()
        return {"ok": True}

    return app
