"""The one client for the Don't Die API (https://api.dontdie.com).

Each instance acts for one Don't Die account (its token and client id). Every call has a
timeout; idempotent GETs are retried with jittered exponential backoff on 5xx, timeouts and
connection errors; POSTs are sent once. Failures surface as `core.errors` exceptions:
upstream 4xx → `UpstreamClientError` (same status, upstream message), 5xx or a malformed
answer → `UpstreamError`, timeout → `UpstreamTimeout`, unreachable → `DependencyUnavailable`.
The token never appears in logs, error messages or cache keys.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from datetime import date
from typing import Any

import httpx
from redis.exceptions import RedisError
from tenacity import (AsyncRetrying, retry_if_exception, stop_after_attempt,
                      wait_exponential_jitter)

from core.errors import (AppError, DependencyUnavailable, NotFound, UpstreamClientError,
                         UpstreamError, UpstreamTimeout, ValidationFailed)
from core.metrics import upstream_call

log = logging.getLogger(__name__)

CACHE_TTL_SECONDS = 24 * 3600


class _ServerError(Exception):
    """A 5xx answer, raised inside the retry loop so tenacity can retry it."""

    def __init__(self, response: httpx.Response):
        self.response = response


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, (_ServerError, httpx.TimeoutException, httpx.TransportError))


def _upstream_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            value = body.get(key)
            if isinstance(value, list):
                value = "; ".join(str(v) for v in value)
            if isinstance(value, str) and value:
                return value
    text = response.text.strip()
    return text[:300] if text else f"Don't Die API answered HTTP {response.status_code}"


def _check_header_safe(name: str, value: str) -> None:
    """The token and client id travel as HTTP headers: non-ASCII or control characters
    cannot be sent (httpx would raise), so they are the caller's mistake (422)."""
    if not (value.isascii() and value.isprintable()):
        raise ValidationFailed(f"{name} must be printable ASCII",
                               details=[{"loc": [name], "msg": "must be printable ASCII"}])


class DontDieClient:
    def __init__(self, base_url: str, token: str, client_id: str, *, timeout: float = 10.0,
                 retries: int = 2, concurrency: int = 8, redis: Any = None,
                 http: httpx.AsyncClient | None = None, cache_prefix: str = "dd",
                 backoff_seconds: float = 0.2, backoff_max_seconds: float = 2.0):
        _check_header_safe("dd_token", token)
        _check_header_safe("dd_client_id", client_id)
        self._base_url = base_url.rstrip("/")
        self._token = token
        self._client_id = client_id
        self._timeout = httpx.Timeout(timeout)
        self._timeout_seconds = timeout
        self._retries = max(0, retries)
        self._semaphore = asyncio.Semaphore(max(1, concurrency))
        self._redis = redis
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient()
        self._backoff = (backoff_seconds, backoff_max_seconds)
        # keyed by upstream too, so a sandbox and the real API never share cached ids
        upstream = hashlib.sha256(self._base_url.encode()).hexdigest()[:12]
        self._cache_prefix = f"{cache_prefix}:{upstream}"
        self._uid: str | None = None

    @classmethod
    def from_settings(cls, settings: Any, token: str, client_id: str, *, redis: Any = None,
                      http: httpx.AsyncClient | None = None, **kwargs: Any) -> "DontDieClient":
        return cls(settings.dontdie_base_url, token, client_id,
                   timeout=settings.dontdie_timeout_seconds, retries=settings.dontdie_retries,
                   concurrency=settings.dontdie_concurrency, redis=redis, http=http, **kwargs)

    def __repr__(self) -> str:
        return f"DontDieClient({self._base_url!r})"

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> "DontDieClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # --- account ------------------------------------------------------------------------

    async def get_account(self) -> dict[str, Any]:
        account = await self._get("/account")
        if not isinstance(account, dict) or not account.get("id"):
            raise UpstreamError("Don't Die API returned an account without an id")
        return account

    def uid_cache_key(self) -> str:
        return f"{self._cache_prefix}:uid:{hashlib.sha256(self._token.encode()).hexdigest()}"

    async def get_user_id(self) -> str:
        if self._uid:
            return self._uid
        key = self.uid_cache_key()
        cached = await self._cache_get(key)
        if cached:
            self._uid = cached
            return cached
        self._uid = str((await self.get_account())["id"])
        await self._cache_set(key, self._uid)
        return self._uid

    # --- scores -------------------------------------------------------------------------

    async def get_score(self, uid: str, date: date | str) -> dict[str, Any]:
        return await self._get(f"/user-profile/{uid}/score-v2", params={"date": str(date)})

    async def get_scores(self, uid: str, dates: list[date | str]) -> dict[str, Any]:
        """Per-day results keyed by date; a failed day is `{"error", "status_code"}`."""
        async def one(day: date | str) -> Any:
            try:
                return await self.get_score(uid, day)
            except AppError as exc:
                return {"error": exc.message, "status_code": exc.status_code}

        keys = [str(d) for d in dates]
        results = await asyncio.gather(*(one(d) for d in dates))
        return dict(zip(keys, results))

    # --- biomarkers ---------------------------------------------------------------------

    async def list_categories(self) -> list[dict[str, Any]]:
        key = f"{self._cache_prefix}:biomarker-categories"
        cached = await self._cache_get(key)
        if cached:
            return json.loads(cached)
        categories = await self._get("/system/biomarker-categories")
        if not isinstance(categories, list):
            raise UpstreamError("Don't Die API returned malformed biomarker categories")
        await self._cache_set(key, json.dumps(categories))
        return categories

    async def get_category_readings(self, name: str) -> list[dict[str, Any]]:
        for category in await self.list_categories():
            if str(category.get("name", "")).lower() == name.lower():
                return await self._readings(category["id"])
        raise NotFound(f"Don't Die has no biomarker category named {name!r}")

    async def get_all_biomarkers(self) -> dict[str, Any]:
        """Every category's readings by name; a failed category is `{"error", "status_code"}`."""
        categories = await self.list_categories()

        async def one(category: dict[str, Any]) -> Any:
            try:
                return await self._readings(category["id"])
            except AppError as exc:
                return {"error": exc.message, "status_code": exc.status_code}

        results = await asyncio.gather(*(one(c) for c in categories))
        return {c["name"]: r for c, r in zip(categories, results)}

    async def _readings(self, category_id: str) -> list[dict[str, Any]]:
        return await self._get("/account/biomarkers", params={"categoryId": category_id})

    # --- protocols ----------------------------------------------------------------------

    async def list_protocols(self, uid: str, include_sections: bool = False) -> list[dict]:
        protocols = await self._get(f"/user-health/{uid}/protocols")
        if not include_sections or not isinstance(protocols, list):
            return protocols

        async def with_sections(protocol: dict[str, Any]) -> dict[str, Any]:
            result = dict(protocol)
            try:
                result["sections"] = await self._get(
                    f"/user-health/{uid}/protocols/{protocol['id']}/sections")
            except AppError as exc:
                result["sections_error"] = exc.message
            return result

        return list(await asyncio.gather(*(with_sections(p) for p in protocols)))

    async def create_protocol(self, uid: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._post(f"/user-health/{uid}/protocols", {"status": "Draft", **body})

    async def create_protocol_section(self, uid: str, protocol_id: str,
                                      body: dict[str, Any]) -> dict[str, Any]:
        return await self._post(f"/user-health/{uid}/protocols/{protocol_id}/sections",
                                {"status": "Draft", **body})

    # --- transport ----------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}", "x-dd-client-id": self._client_id,
                "X-Client-Id": self._client_id, "Accept": "application/json"}

    async def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return await self._request("GET", path, params=params, attempts=self._retries + 1)

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        return await self._request("POST", path, json_body=body, attempts=1)

    async def _request(self, method: str, path: str, *, params: dict | None = None,
                       json_body: Any = None, attempts: int) -> Any:
        async with upstream_call("dontdie"):
            return await self._perform(method, path, params=params, json_body=json_body,
                                       attempts=attempts)

    async def _perform(self, method: str, path: str, *, params: dict | None,
                       json_body: Any, attempts: int) -> Any:
        url = self._base_url + path

        async def attempt() -> httpx.Response:
            async with self._semaphore:
                response = await self._http.request(
                    method, url, params=params, json=json_body, headers=self._headers(),
                    timeout=self._timeout)
            if response.status_code >= 500:
                raise _ServerError(response)
            return response

        initial, maximum = self._backoff
        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts), retry=retry_if_exception(_retryable),
            wait=wait_exponential_jitter(initial=initial, max=maximum, jitter=initial),
            before_sleep=lambda state: log.warning(
                "Don't Die %s %s failed (%s), retrying", method, path,
                type(state.outcome.exception()).__name__),
            reraise=True)
        try:
            response = await retrying(attempt)
        except _ServerError as exc:
            status = exc.response.status_code
            log.warning("Don't Die %s %s answered %s", method, path, status)
            raise UpstreamError(f"Don't Die API failed with HTTP {status}",
                                details={"upstream_status": status}) from None
        except httpx.TimeoutException:
            log.warning("Don't Die %s %s timed out", method, path)
            raise UpstreamTimeout(
                f"Don't Die API did not answer within {self._timeout_seconds:g}s") from None
        except (httpx.ConnectError, httpx.UnsupportedProtocol):
            log.warning("Don't Die %s %s: cannot connect", method, path)
            raise DependencyUnavailable("Don't Die API is unreachable") from None
        except httpx.TransportError as exc:
            log.warning("Don't Die %s %s: %s", method, path, type(exc).__name__)
            raise UpstreamError("Don't Die API connection failed") from None

        if response.status_code >= 400:
            message = self._scrub(_upstream_message(response))
            log.info("Don't Die %s %s answered %s", method, path, response.status_code)
            raise UpstreamClientError(response.status_code, message,
                                      details={"upstream_status": response.status_code})
        try:
            return response.json()
        except ValueError:
            raise UpstreamError("Don't Die API returned a malformed response") from None

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "[redacted]") if self._token else text

    # --- cache (best effort: a Redis outage only costs extra upstream calls) -------------

    async def _cache_get(self, key: str) -> str | None:
        if self._redis is None:
            return None
        try:
            value = await self._redis.get(key)
        except (RedisError, OSError) as exc:
            log.warning("Redis read failed for Don't Die cache: %s", type(exc).__name__)
            return None
        return value.decode() if isinstance(value, bytes) else value

    async def _cache_set(self, key: str, value: str) -> None:
        if self._redis is None:
            return
        try:
            await self._redis.set(key, value, ex=CACHE_TTL_SECONDS)
        except (RedisError, OSError) as exc:
            log.warning("Redis write failed for Don't Die cache: %s", type(exc).__name__)
