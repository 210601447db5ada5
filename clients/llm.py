"""LLM access for the conversation simulator: any OpenAI-compatible chat completions endpoint.

`OpenAIChat` makes the calls: timeouts from settings, retries on 429/5xx/timeouts with the
`openai` client's own exponential backoff, token usage and cost counters, and errors mapped
onto `core.errors`. `OpenAICompatibleModel` adapts it to DeepEval's `DeepEvalBaseLLM`; the
class is built on first access (`from clients.llm import OpenAICompatibleModel`), so importing
this module does not import DeepEval.

DeepEval 4.3.1 treats any custom `DeepEvalBaseLLM` as non-native: it calls
`generate(prompt, schema=SchemaCls)` / `await a_generate(prompt, schema=SchemaCls)` and uses
the return value as is, so these return the schema instance (or the text when no schema is
given), never a `(result, cost)` tuple; cost is kept in `model.usage` instead.
"""
from __future__ import annotations

import functools
import os
import re
import threading
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from core.errors import (AppError, DependencyUnavailable, UpstreamClientError, UpstreamError,
                         UpstreamTimeout)

if TYPE_CHECKING:
    from core.settings import Settings

os.environ.setdefault("DEEPEVAL_TELEMETRY_OPT_OUT", "1")
os.environ.setdefault("DEEPEVAL_DISABLE_DOTENV", "1")

# Local OpenAI-compatible servers often need no key, but the openai client insists on one.
PLACEHOLDER_API_KEY = "no-key"


def json_schema_format(schema: type[BaseModel]) -> dict:
    """`response_format` asking for JSON matching a pydantic model.

    Not `strict`: OpenAI's strict mode rejects pydantic schemas with optional fields, which
    DeepEval's schemas have.
    """
    name = re.sub(r"[^A-Za-z0-9_-]", "_", schema.__name__)[:64]
    return {"type": "json_schema",
            "json_schema": {"name": name, "schema": schema.model_json_schema(), "strict": False}}


def parse_structured(content: str, schema: type[BaseModel]) -> BaseModel:
    try:
        return schema.model_validate_json(content)
    except ValidationError as first_error:
        # Some servers wrap the JSON in prose or a code fence.
        start, end = content.find("{"), content.rfind("}")
        if 0 <= start < end:
            try:
                return schema.model_validate_json(content[start:end + 1])
            except ValidationError:
                pass
        raise UpstreamError(f"LLM answer does not match schema {schema.__name__}",
                            details={"errors": first_error.errors(include_url=False)[:5],
                                     "content": content[:500]}) from first_error


def _upstream_error(exc: Exception) -> AppError:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return UpstreamTimeout(f"LLM request timed out: {exc}")
    if isinstance(exc, openai.APIConnectionError):
        return DependencyUnavailable(f"LLM endpoint unreachable: {exc}")
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code == 429 or exc.status_code >= 500:
            return UpstreamError(f"LLM endpoint failed with {exc.status_code}: {exc.message}",
                                 details={"status": exc.status_code})
        return UpstreamClientError(exc.status_code,
                                   f"LLM endpoint refused the request: {exc.message}")
    return UpstreamError(f"LLM call failed: {exc}")


class OpenAIChat:
    """Chat completions against one model on one OpenAI-compatible endpoint."""

    def __init__(self, model: str, *, base_url: str, api_key: str = "", timeout: float = 60.0,
                 max_retries: int = 2, temperature: float | None = None, seed: int | None = None,
                 system_prompt: str | None = None, prompt_price_per_1k: float = 0.0,
                 completion_price_per_1k: float = 0.0):
        self.model_id = model
        self.base_url = base_url
        self.timeout = timeout
        self.max_retries = max_retries
        self.temperature = temperature
        self.seed = seed
        self.system_prompt = system_prompt
        self.prompt_price_per_1k = prompt_price_per_1k
        self.completion_price_per_1k = completion_price_per_1k
        self._api_key = api_key or PLACEHOLDER_API_KEY
        self._lock = threading.Lock()
        self._sync_client: Any = None
        self._usage = self._zero_usage()

    # usage

    @staticmethod
    def _zero_usage() -> dict:
        return {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                "cost_usd": 0.0}

    @property
    def usage(self) -> dict:
        """A snapshot: calls, prompt/completion/total tokens and estimated cost in USD."""
        with self._lock:
            return dict(self._usage)

    def reset_usage(self) -> None:
        with self._lock:
            self._usage = self._zero_usage()

    def _record(self, completion: Any) -> None:
        usage = getattr(completion, "usage", None)
        prompt = getattr(usage, "prompt_tokens", 0) or 0
        answer = getattr(usage, "completion_tokens", 0) or 0
        cost = (prompt * self.prompt_price_per_1k + answer * self.completion_price_per_1k) / 1000
        with self._lock:
            self._usage["calls"] += 1
            self._usage["prompt_tokens"] += prompt
            self._usage["completion_tokens"] += answer
            self._usage["total_tokens"] += prompt + answer
            self._usage["cost_usd"] += cost

    # calls

    def _client_options(self) -> dict:
        return {"base_url": self.base_url, "api_key": self._api_key, "timeout": self.timeout,
                "max_retries": self.max_retries}

    def _sync(self) -> Any:
        with self._lock:
            if self._sync_client is None:
                import openai

                self._sync_client = openai.OpenAI(**self._client_options())
            return self._sync_client

    def _request(self, messages: list[dict], response_format: dict | None) -> dict:
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        request: dict = {"model": self.model_id, "messages": messages}
        if response_format is not None:
            request["response_format"] = response_format
        if self.temperature is not None:
            request["temperature"] = self.temperature
        if self.seed is not None:
            request["seed"] = self.seed
        return request

    def _content(self, completion: Any) -> str:
        self._record(completion)
        content = completion.choices[0].message.content if completion.choices else None
        if content is None:
            raise UpstreamError("LLM answered without content")
        return content

    def complete(self, messages: list[dict], response_format: dict | None = None) -> str:
        import openai

        try:
            completion = self._sync().chat.completions.create(
                **self._request(messages, response_format))
        except openai.OpenAIError as exc:
            raise _upstream_error(exc) from exc
        return self._content(completion)

    async def a_complete(self, messages: list[dict], response_format: dict | None = None) -> str:
        import openai

        # A fresh client per call: an AsyncOpenAI client is bound to the loop it first ran on,
        # and DeepEval runs coroutines on several loops (its own, plus asyncio.run shims).
        try:
            async with openai.AsyncOpenAI(**self._client_options()) as client:
                completion = await client.chat.completions.create(
                    **self._request(messages, response_format))
        except openai.OpenAIError as exc:
            raise _upstream_error(exc) from exc
        return self._content(completion)

    def chat(self, messages: list[dict]) -> str:
        """A plain reply to a chat history (`[{"role", "content"}, ...]`)."""
        return self.complete(messages)

    async def a_chat(self, messages: list[dict]) -> str:
        return await self.a_complete(messages)

    def ask(self, prompt: str, schema: type[BaseModel] | None = None) -> BaseModel | str:
        """One prompt as one user message; with a schema, the parsed schema instance."""
        fmt = json_schema_format(schema) if schema is not None else None
        content = self.complete([{"role": "user", "content": prompt}], fmt)
        return parse_structured(content, schema) if schema is not None else content

    async def a_ask(self, prompt: str, schema: type[BaseModel] | None = None) -> BaseModel | str:
        fmt = json_schema_format(schema) if schema is not None else None
        content = await self.a_complete([{"role": "user", "content": prompt}], fmt)
        return parse_structured(content, schema) if schema is not None else content

    def close(self) -> None:
        with self._lock:
            client, self._sync_client = self._sync_client, None
        if client is not None:
            client.close()


@functools.cache
def _model_class() -> type:
    from deepeval.models import DeepEvalBaseLLM

    class OpenAICompatibleModel(OpenAIChat, DeepEvalBaseLLM):
        """A DeepEval model (simulated user, judge, or coach) behind an OpenAI-compatible API."""

        def __init__(self, model: str, **options: Any):
            OpenAIChat.__init__(self, model, **options)
            DeepEvalBaseLLM.__init__(self, model)

        def load_model(self) -> "OpenAICompatibleModel":
            return self

        def generate(self, prompt: str, schema: type[BaseModel] | None = None) -> BaseModel | str:
            return self.ask(str(prompt), schema)

        async def a_generate(self, prompt: str,
                             schema: type[BaseModel] | None = None) -> BaseModel | str:
            return await self.a_ask(str(prompt), schema)

        def get_model_name(self) -> str:
            return self.model_id

        def supports_structured_outputs(self) -> bool:
            return True

        def supports_json_mode(self) -> bool:
            return True

    return OpenAICompatibleModel


def __getattr__(name: str) -> Any:
    if name == "OpenAICompatibleModel":
        return _model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def models_from_settings(settings: "Settings", *, max_retries: int = 2,
                         prompt_price_per_1k: float = 0.0,
                         completion_price_per_1k: float = 0.0) -> tuple[Any, Any, Any] | None:
    """(coach, simulated_user, judge) models, or None when no LLM endpoint is configured."""
    if not settings.llm_configured:
        return None
    model_class = _model_class()
    options = {"base_url": settings.llm_base_url,
               "api_key": settings.llm_api_key.get_secret_value(),
               "timeout": settings.llm_timeout_seconds, "max_retries": max_retries,
               "prompt_price_per_1k": prompt_price_per_1k,
               "completion_price_per_1k": completion_price_per_1k}
    return (model_class(settings.llm_coach_model, **options),
            model_class(settings.llm_user_model, **options),
            model_class(settings.llm_judge_model, temperature=0.0, **options))
