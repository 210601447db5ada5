"""Pure-ASGI middleware: request id, access log, body-size limit, rate-limit headers."""
from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.exceptions import HTTPException

from core.request_context import principal_kind_var, request_id_var
from api.envelope import error_body

log = logging.getLogger("sma.access")
log_errors = logging.getLogger("sma.errors")
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class _BodyTooLarge(HTTPException):
    """Raised from `receive` once a (chunked) body passes the limit. An HTTPException so that
    FastAPI's body parsing lets it through (it turns any other error into a 400), and the
    app's HTTP error handler answers it with the 413 envelope."""

    def __init__(self, limit: int):
        super().__init__(status_code=413, detail=f"Request body exceeds {limit} bytes")


class RequestContextMiddleware:
    """Sets X-Request-ID, enforces body limits, adds rate-limit headers, logs one line."""

    def __init__(self, app, *, app_name: str, body_limit, metrics=None, echo_request_id: bool = True):
        self.app = app
        # Behind the Serve proxy, the proxy itself echoes X-Request-ID on every response.
        self.echo_request_id = echo_request_id
        self.app_name = app_name
        self.body_limit = body_limit  # callable(path) -> max bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _SAFE_REQUEST_ID.match(given) else uuid.uuid4().hex
        rid_token = request_id_var.set(request_id)
        kind_token = principal_kind_var.set("-")
        scope.setdefault("state", {})
        started = time.perf_counter()
        status_holder = {"status": 500}
        path = scope.get("path", "")
        limit = self.body_limit(path)

        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject_too_large(send, request_id, limit)
            self._log(scope, 413, started)
            request_id_var.reset(rid_token)
            principal_kind_var.reset(kind_token)
            return

        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                extra = [(b"x-request-id", request_id.encode())] if self.echo_request_id else []
                rate = scope["state"].get("rate_limit")
                if rate:
                    extra += [(b"x-ratelimit-limit", str(rate[0]).encode()),
                              (b"x-ratelimit-remaining", str(rate[1]).encode()),
                              (b"x-ratelimit-reset", str(rate[2]).encode())]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_headers)
        except _BodyTooLarge:
            if status_holder.get("started"):
                raise
            await self._reject_too_large(send, request_id, limit)
            status_holder["status"] = 413
        except Exception:
            # Answer unexpected errors here, while the request id is still bound: past this
            # middleware Starlette's error handler would send the 500 without the id.
            if status_holder.get("started"):
                raise
            log_errors.exception("unhandled error")
            await self._send_error(send, request_id, 500, "internal_error", "Internal error")
            status_holder["status"] = 500
        finally:
            self._log(scope, status_holder["status"], started)
            request_id_var.reset(rid_token)
            principal_kind_var.reset(kind_token)

    async def _reject_too_large(self, send, request_id: str, limit: int) -> None:
        await self._send_error(send, request_id, 413, "payload_too_large",
                               f"Request body exceeds {limit} bytes")

    async def _send_error(self, send, request_id: str, status: int, code: str, message: str) -> None:
        body = json.dumps(error_body(code, message, request_id)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"x-request-id", request_id.encode())]})
        await send({"type": "http.response.body", "body": body})

    def _log(self, scope, status: int, started: float) -> None:
        duration_ms = round((time.perf_counter() - started) * 1000, 2)
        route = scope.get("route")
        route_path = getattr(route, "path", None) or scope.get("path", "")
        if self.metrics is not None:
            self.metrics.observe_request(self.app_name, route_path, scope.get("method", ""), status,
                                         duration_ms)
        if route_path in ("/health",):
            return
        log.info("request", extra={"app": self.app_name, "route": route_path,
                                   "method": scope.get("method"), "status": status,
                                   "duration_ms": duration_ms})
