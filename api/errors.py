"""Map every failure to the error envelope; no stack trace ever reaches a client."""
from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.envelope import error_body
from core.errors import AppError
from core.request_context import request_id_var
from storage.redis import REDIS_ERRORS

log = logging.getLogger("sma.errors")

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
               413: "payload_too_large", 415: "unsupported_media_type", 422: "validation_error",
               429: "rate_limited"}


def error_response(status: int, code: str, message: str, details=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(code, message, request_id_var.get(), details),
                        status_code=status, headers=headers)


def _clean_validation_errors(errors) -> list[dict]:
    cleaned = []
    for err in errors:
        item = {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        cleaned.append(item)
    return jsonable_encoder(cleaned)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_: Request, exc: AppError):
        return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return error_response(422, "validation_error", "The request is not valid",
                              _clean_validation_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError):
        log.warning("database error: %s", type(exc.orig).__name__ if exc.orig else exc)
        return error_response(503, "database_unavailable", "The database is unavailable")

    @app.exception_handler(DBAPIError)
    async def _db_error(_: Request, exc: DBAPIError):
        if exc.connection_invalidated:
            return error_response(503, "database_unavailable", "The database is unavailable")
        sqlstate = str(getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None) or "")
        if sqlstate.startswith("22"):
            # A PostgreSQL "data exception": input the database cannot hold (U+0000, overflow).
            return error_response(422, "validation_error", "The input cannot be stored as given")
        log.exception("database error")
        return error_response(500, "internal_error", "Internal error")

    for exc_type in REDIS_ERRORS:
        @app.exception_handler(exc_type)
        async def _redis_down(_: Request, exc: Exception):
            log.warning("redis unavailable: %s", type(exc).__name__)
            return error_response(503, "redis_unavailable", "Redis is unavailable")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "Internal error")
