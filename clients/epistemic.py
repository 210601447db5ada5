"""The one Epistemic Me client: Connect unary calls in JSON, typed with pydantic.

`POST {base}/EpistemicMeService/<Method>` with `x-api-key`; the wire uses lowerCamelCase
names, enum names, int64 as strings and omits default values, which the models below absorb.
Upstream failures become `core.errors` exceptions so the routes never see httpx or raw JSON.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from enum import StrEnum
from typing import Annotated, Any, TypeVar

import httpx
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer,
                      ValidationError, model_validator)
from pydantic.alias_generators import to_camel

from core.errors import (AppError, DependencyUnavailable, NotFound, UpstreamError,
                         UpstreamTimeout, ValidationFailed)
from core.metrics import upstream_call

log = logging.getLogger(__name__)

SERVICE = "EpistemicMeService"
API_KEY_SETTING = "SMA_EPISTEMIC_API_KEY"
BASE_URL_SETTING = "SMA_EPISTEMIC_BASE_URL"
REGISTER_HINT = "python -m clients.epistemic_cli register --base-url URL --name NAME --email EMAIL"
MAX_UPSTREAM_MESSAGE = 500


# --- wire types --------------------------------------------------------------------------

def _int64(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


# protojson writes int64 as a JSON string but accepts either; we expose a Python int.
Int64 = Annotated[int, BeforeValidator(_int64), PlainSerializer(str, return_type=str,
                                                                  when_used="json")]
Int32 = Annotated[int, BeforeValidator(_int64)]  # a JSON number, but tolerate a string


class BeliefType(StrEnum):
    BELIEF_TYPE_INVALID = "BELIEF_TYPE_INVALID"
    STATEMENT = "STATEMENT"
    FALSIFIABLE = "FALSIFIABLE"
    CAUSAL = "CAUSAL"


class DialecticType(StrEnum):
    INVALID = "INVALID"
    DEFAULT = "DEFAULT"
    HEGELIAN = "HEGELIAN"
    SLEEP_DIET_EXERCISE = "SLEEP_DIET_EXERCISE"


class InteractionStatus(StrEnum):
    STATUS_INVALID = "STATUS_INVALID"
    PENDING_ANSWER = "PENDING_ANSWER"
    ANSWERED = "ANSWERED"
    BELIEFS_UPDATED = "BELIEFS_UPDATED"


class InteractionType(StrEnum):
    INTERACTION_TYPE_INVALID = "INTERACTION_TYPE_INVALID"
    QUESTION_ANSWER = "QUESTION_ANSWER"
    HYPOTHESIS_EVIDENCE = "HYPOTHESIS_EVIDENCE"
    ACTION_OUTCOME = "ACTION_OUTCOME"


class AgentType(StrEnum):
    AGENT_TYPE_INVALID = "AGENT_TYPE_INVALID"
    AGENT_TYPE_GPT_LATEST = "AGENT_TYPE_GPT_LATEST"
    AGENT_TYPE_HUMAN = "AGENT_TYPE_HUMAN"


E = TypeVar("E", bound=StrEnum)


def _lenient(enum: type[E]) -> Any:
    # A newer server may add enum values; keep them as plain strings instead of failing.
    return Annotated[enum | str, Field(union_mode="left_to_right")]


LenientBeliefType = _lenient(BeliefType)
LenientDialecticType = _lenient(DialecticType)
LenientStatus = _lenient(InteractionStatus)
LenientInteractionType = _lenient(InteractionType)
LenientAgentType = _lenient(AgentType)


class Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Content(Wire):
    raw_str: str = ""


class Belief(Wire):
    id: str = ""
    self_model_id: str = ""
    version: Int32 = 0
    type: LenientBeliefType = BeliefType.BELIEF_TYPE_INVALID
    content: list[Content] = []

    @property
    def text(self) -> str:
        return " ".join(c.raw_str for c in self.content if c.raw_str)


class BeliefSystem(Wire):
    beliefs: list[Belief] = []


class Question(Wire):
    question: str = ""
    created_at_millis_utc: Int64 = 0


class UserAnswer(Wire):
    user_answer: str = ""
    created_at_millis_utc: Int64 | None = None


class QuestionAnswer(Wire):
    question: Question = Question()
    answer: UserAnswer | None = None
    extracted_beliefs: list[Belief] = []
    updated_at_millis_utc: Int64 = 0


class InteractionData(Wire):
    question_answer: QuestionAnswer | None = None


class DialecticalInteraction(Wire):
    id: str = ""
    status: LenientStatus = InteractionStatus.STATUS_INVALID
    type: LenientInteractionType = InteractionType.INTERACTION_TYPE_INVALID
    interaction: InteractionData = InteractionData()
    updated_at_millis_utc: Int64 = 0

    @model_validator(mode="before")
    @classmethod
    def _lift_flat_oneof(cls, data: Any) -> Any:
        # Older protos put the oneof member directly on the interaction.
        if isinstance(data, dict) and "interaction" not in data:
            flat = data.get("questionAnswer", data.get("question_answer"))
            if flat is not None:
                data = {**data, "interaction": {"questionAnswer": flat}}
        return data

    @property
    def question_answer(self) -> QuestionAnswer | None:
        return self.interaction.question_answer

    @property
    def question(self) -> str:
        qa = self.question_answer
        return qa.question.question if qa else ""


class Agent(Wire):
    agent_type: LenientAgentType = AgentType.AGENT_TYPE_INVALID
    dialectic_type: LenientDialecticType = DialecticType.INVALID


class LearningObjective(Wire):
    description: str = ""
    topics: list[str] = []
    target_belief_type: LenientBeliefType = BeliefType.BELIEF_TYPE_INVALID
    completion_percentage: float = Field(default=0.0, ge=0, le=100)


class Dialectic(Wire):
    id: str = ""
    self_model_id: str = ""
    agent: Agent = Agent()
    user_interactions: list[DialecticalInteraction] = []
    learning_objective: LearningObjective | None = None

    @model_validator(mode="before")
    @classmethod
    def _accept_top_level_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and "agent" not in data and "dialecticType" in data:
            data = {**data, "agent": {"dialecticType": data["dialecticType"]}}
        return data

    @property
    def dialectic_type(self) -> DialecticType | str:
        return self.agent.dialectic_type

    @property
    def pending_interaction(self) -> DialecticalInteraction | None:
        last = self.user_interactions[-1] if self.user_interactions else None
        return last if last and last.status == InteractionStatus.PENDING_ANSWER else None


class SelfModel(Wire):
    id: str = ""
    philosophies: list[str] = []
    belief_system: BeliefSystem = BeliefSystem()
    dialectics: list[Dialectic] = []


class Developer(Wire):
    id: str = ""
    name: str = ""
    email: str = ""
    api_keys: list[str] = []
    created_at: Int64 = 0
    updated_at: Int64 = 0


# --- requests ----------------------------------------------------------------------------

class CreateDeveloperRequest(Wire):
    name: str
    email: str


class CreateSelfModelRequest(Wire):
    id: str
    philosophies: list[str] = []


class SelfModelIdRequest(Wire):
    """GetSelfModel, ListBeliefs, GetBeliefSystem and ListDialectics all take just this."""
    self_model_id: str


class CreateBeliefRequest(Wire):
    self_model_id: str
    belief_content: str
    belief_type: BeliefType


class CreateDialecticRequest(Wire):
    self_model_id: str
    dialectic_type: DialecticType = DialecticType.DEFAULT
    learning_objective: LearningObjective | None = None


class UpdateDialecticRequest(Wire):
    id: str
    self_model_id: str
    answer: UserAnswer
    dry_run: bool = False


# --- responses ---------------------------------------------------------------------------

class CreateDeveloperResponse(Wire):
    developer: Developer | None = None


class SelfModelResponse(Wire):
    self_model: SelfModel | None = None


class CreateBeliefResponse(Wire):
    belief: Belief | None = None
    belief_system: BeliefSystem = BeliefSystem()


class ListBeliefsResponse(Wire):
    beliefs: list[Belief] = []
    belief_system: BeliefSystem = BeliefSystem()


class GetBeliefSystemResponse(Wire):
    belief_system: BeliefSystem = BeliefSystem()


class DialecticResponse(Wire):
    dialectic: Dialectic | None = None


class ListDialecticsResponse(Wire):
    dialectics: list[Dialectic] = []


R = TypeVar("R", bound=Wire)


# --- helpers -----------------------------------------------------------------------------

def validate_api_key(key: Any) -> str | None:
    """A human explanation of what is wrong with the configured key, or None if it looks usable."""
    value = key.get_secret_value() if hasattr(key, "get_secret_value") else key
    if not value or not str(value).strip():
        return (f"{API_KEY_SETTING} is not set; register a developer with `{REGISTER_HINT}` "
                "and set the printed key")
    try:
        uuid.UUID(str(value).strip())
    except ValueError:
        return f"{API_KEY_SETTING} is not a valid Epistemic Me API key (expected a UUID)"
    return None


# Connect's HTTP-status fallback for error bodies that are not Connect JSON.
_HTTP_TO_CODE = {400: "internal", 401: "unauthenticated", 403: "permission_denied",
                 404: "unimplemented", 429: "unavailable", 502: "unavailable",
                 503: "unavailable", 504: "unavailable"}


def _enum(enum: type[E], value: Any, name: str) -> E:
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(m.value for m in list(enum)[1:])
        raise ValidationFailed(f"{name} must be one of {allowed}",
                               details=[{"field": name, "message": "unknown value"}]) from None


def _error_for(method: str, status: int, code: str, message: str) -> AppError:
    message = (message or "")[:MAX_UPSTREAM_MESSAGE]
    details = {"upstream": "epistemic_me", "method": method, "upstream_code": code,
               "upstream_status": status}
    if code == "unauthenticated":
        return UpstreamError(
            f"Epistemic Me rejected the API key ({message or 'unauthenticated'}); set "
            f"{API_KEY_SETTING} to a key from CreateDeveloper (`{REGISTER_HINT}`)",
            details={**details, "setting": API_KEY_SETTING})
    if code == "invalid_argument":
        return ValidationFailed(f"Epistemic Me rejected the request: {message}", details=details)
    if code == "not_found":
        return NotFound(f"Epistemic Me: {message or 'not found'}", details=details)
    if code == "deadline_exceeded":
        return UpstreamTimeout(f"Epistemic Me {method} timed out upstream", details=details)
    return UpstreamError(f"Epistemic Me {method} failed ({code}): {message}", details=details)


class EpistemicClient:
    def __init__(self, base_url: str, api_key: Any, *, timeout: float = 10.0,
                 http: httpx.AsyncClient | None = None):
        self.base_url = (base_url or "").rstrip("/")
        secret = api_key.get_secret_value() if hasattr(api_key, "get_secret_value") else api_key
        self._api_key = (secret or "").strip()
        self.timeout = timeout
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._owns_http = http is None

    @classmethod
    def from_settings(cls, settings: Any,
                      http: httpx.AsyncClient | None = None) -> EpistemicClient:
        return cls(settings.epistemic_base_url, settings.epistemic_api_key,
                   timeout=settings.epistemic_timeout_seconds, http=http)

    def __repr__(self) -> str:  # never show the key
        return f"EpistemicClient(base_url={self.base_url!r})"

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> EpistemicClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # -- methods --

    async def create_developer(self, name: str, email: str) -> Developer:
        resp = await self._call("CreateDeveloper", CreateDeveloperRequest(name=name, email=email),
                                CreateDeveloperResponse)
        return self._required(resp.developer, "CreateDeveloper", "developer")

    async def create_self_model(self, self_model_id: str,
                                philosophies: list[str] | None = None) -> SelfModel:
        req = CreateSelfModelRequest(id=self_model_id, philosophies=philosophies or [])
        resp = await self._call("CreateSelfModel", req, SelfModelResponse)
        return self._required(resp.self_model, "CreateSelfModel", "selfModel")

    async def get_self_model(self, self_model_id: str) -> SelfModel:
        resp = await self._call("GetSelfModel", SelfModelIdRequest(self_model_id=self_model_id),
                                SelfModelResponse, idempotent=True)
        return self._required(resp.self_model, "GetSelfModel", "selfModel")

    async def create_belief(self, self_model_id: str, content: str,
                            belief_type: BeliefType | str = BeliefType.STATEMENT
                            ) -> CreateBeliefResponse:
        belief_type = _enum(BeliefType, belief_type, "belief_type")
        if belief_type is BeliefType.BELIEF_TYPE_INVALID:  # the server rejects an unset type
            raise ValidationFailed("belief_type must be STATEMENT, FALSIFIABLE or CAUSAL",
                                   details=[{"field": "belief_type", "message": "unset"}])
        req = CreateBeliefRequest(self_model_id=self_model_id, belief_content=content,
                                  belief_type=belief_type)
        resp = await self._call("CreateBelief", req, CreateBeliefResponse)
        self._required(resp.belief, "CreateBelief", "belief")
        return resp

    async def list_beliefs(self, self_model_id: str) -> list[Belief]:
        resp = await self._call("ListBeliefs", SelfModelIdRequest(self_model_id=self_model_id),
                                ListBeliefsResponse, idempotent=True)
        return resp.beliefs

    async def get_belief_system(self, self_model_id: str) -> BeliefSystem:
        resp = await self._call("GetBeliefSystem",
                                SelfModelIdRequest(self_model_id=self_model_id),
                                GetBeliefSystemResponse, idempotent=True)
        return resp.belief_system

    async def create_dialectic(self, self_model_id: str,
                               dialectic_type: DialecticType | str = DialecticType.DEFAULT,
                               learning_objective: LearningObjective | dict | None = None
                               ) -> Dialectic:
        if isinstance(learning_objective, dict):
            try:
                learning_objective = LearningObjective.model_validate(learning_objective)
            except ValidationError as exc:
                raise ValidationFailed("invalid learning_objective", details=exc.errors(
                    include_url=False, include_input=False, include_context=False)) from None
        req = CreateDialecticRequest(self_model_id=self_model_id,
                                     dialectic_type=_enum(DialecticType, dialectic_type,
                                                          "dialectic_type"),
                                     learning_objective=learning_objective)
        resp = await self._call("CreateDialectic", req, DialecticResponse)
        return self._required(resp.dialectic, "CreateDialectic", "dialectic")

    async def update_dialectic(self, dialectic_id: str, self_model_id: str, answer: str, *,
                               dry_run: bool = False) -> Dialectic:
        req = UpdateDialecticRequest(id=dialectic_id, self_model_id=self_model_id,
                                     answer=UserAnswer(user_answer=answer), dry_run=dry_run)
        resp = await self._call("UpdateDialectic", req, DialecticResponse)
        return self._required(resp.dialectic, "UpdateDialectic", "dialectic")

    async def list_dialectics(self, self_model_id: str) -> list[Dialectic]:
        resp = await self._call("ListDialectics", SelfModelIdRequest(self_model_id=self_model_id),
                                ListDialecticsResponse, idempotent=True)
        return resp.dialectics

    # -- transport --

    @staticmethod
    def _required(value: Any, method: str, name: str) -> Any:
        if value is None:
            raise UpstreamError(f"Epistemic Me {method} answered without {name}",
                                details={"upstream": "epistemic_me", "method": method})
        return value

    async def _call(self, method: str, request: Wire, response_model: type[R], *,
                    idempotent: bool = False) -> R:
        async with upstream_call("epistemic_me"):
            return await self._perform_call(method, request, response_model, idempotent=idempotent)

    async def _perform_call(self, method: str, request: Wire, response_model: type[R], *,
                            idempotent: bool) -> R:
        if not self.base_url:
            raise DependencyUnavailable(
                f"Epistemic Me is not configured: set {BASE_URL_SETTING}")
        headers = {"Content-Type": "application/json", "Connect-Protocol-Version": "1",
                   "Connect-Timeout-Ms": str(int(self.timeout * 1000))}
        if self._api_key:
            headers["x-api-key"] = self._api_key
        url = f"{self.base_url}/{SERVICE}/{method}"
        attempts = 2 if idempotent else 1
        for attempt in range(1, attempts + 1):
            try:
                async with asyncio.timeout(self.timeout):  # one deadline for the whole call
                    response = await self._http.post(url, json=request.to_wire(),
                                                     headers=headers, timeout=self.timeout)
                break
            except (httpx.TimeoutException, TimeoutError):
                log.warning("epistemic %s timed out after %.1fs", method, self.timeout)
                raise UpstreamTimeout(
                    f"Epistemic Me did not answer {method} within {self.timeout:g}s",
                    details={"upstream": "epistemic_me", "method": method}) from None
            except (httpx.ConnectError, httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
                if attempt < attempts and isinstance(exc, httpx.ConnectError):
                    continue
                log.warning("epistemic %s unreachable: %s", method, type(exc).__name__)
                raise DependencyUnavailable(
                    f"Epistemic Me at {self.base_url} is unreachable",
                    details={"upstream": "epistemic_me", "method": method}) from None
            except httpx.TransportError as exc:
                log.warning("epistemic %s transport error: %s", method, type(exc).__name__)
                raise UpstreamError(f"Epistemic Me {method} failed: connection broke off",
                                    details={"upstream": "epistemic_me", "method": method}
                                    ) from None
        return self._parse(method, response, response_model)

    def _parse(self, method: str, response: httpx.Response, response_model: type[R]) -> R:
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200:
            if isinstance(body, dict) and isinstance(body.get("code"), str):
                code, message = body["code"], str(body.get("message") or "")
            else:
                code = _HTTP_TO_CODE.get(response.status_code, "unknown")
                message = f"HTTP {response.status_code}"
            log.warning("epistemic %s failed: HTTP %s %s", method, response.status_code, code)
            raise _error_for(method, response.status_code, code, message)
        if not isinstance(body, dict):
            raise UpstreamError(f"Epistemic Me {method} returned a non-JSON answer",
                                details={"upstream": "epistemic_me", "method": method})
        try:
            return response_model.model_validate(body)
        except ValidationError as exc:
            raise UpstreamError(f"Epistemic Me {method} returned an unexpected shape",
                                details={"upstream": "epistemic_me", "method": method,
                                         "errors": exc.errors(include_url=False,
                                                              include_input=False,
                                                              include_context=False)}) from None
