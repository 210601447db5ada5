"""The response envelope every app speaks (SPEC §2)."""
from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

T = TypeVar("T")


class Envelope(BaseModel, Generic[T]):
    status: Literal["ok"] = "ok"
    data: T


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorEnvelope(BaseModel):
    status: Literal["error"] = "error"
    error: ErrorBody
    request_id: str


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class PageParams(BaseModel):
    limit: int = Field(50, ge=1, le=100)
    offset: int = Field(0, ge=0)


def ok(data: Any) -> dict[str, Any]:
    return {"status": "ok", "data": data}


def error_body(code: str, message: str, request_id: str, details: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return {"status": "error", "error": err, "request_id": request_id}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorEnvelope, "description": text}
    for status, text in {
        400: "Malformed request (e.g. a body that is not UTF-8)",
        401: "Missing or invalid bearer token", 403: "Not allowed for this token",
        404: "Unknown resource", 409: "State conflict", 413: "Request body too large",
        422: "Validation error",
        429: "Rate limited", 503: "A dependency is unavailable",
    }.items()
}
