"""One error hierarchy for the whole system; `api.errors` maps it to the envelope."""
from __future__ import annotations

from typing import Any


class AppError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.details = details
        self.headers = headers or {}


class BadRequest(AppError):
    status_code, code = 400, "bad_request"


class Unauthorized(AppError):
    status_code, code = 401, "unauthorized"

    def __init__(self, message: str = "Missing or invalid bearer token", **kw: Any):
        super().__init__(message, **kw)
        self.headers.setdefault("WWW-Authenticate", "Bearer")


class Forbidden(AppError):
    status_code, code = 403, "forbidden"


class NotFound(AppError):
    status_code, code = 404, "not_found"


class Conflict(AppError):
    status_code, code = 409, "conflict"


class PayloadTooLarge(AppError):
    status_code, code = 413, "payload_too_large"


class UnsupportedMediaType(AppError):
    status_code, code = 415, "unsupported_media_type"


class ValidationFailed(AppError):
    status_code, code = 422, "validation_error"


class RateLimited(AppError):
    status_code, code = 429, "rate_limited"

    def __init__(self, message: str, retry_after: int, **kw: Any):
        super().__init__(message, **kw)
        self.headers["Retry-After"] = str(retry_after)


class NotSupported(AppError):
    status_code, code = 501, "not_implemented"


class UpstreamError(AppError):
    """The upstream answered, but with a failure (5xx or a malformed answer)."""
    status_code, code = 502, "upstream_error"


class DependencyUnavailable(AppError):
    """A dependency (database, Redis, upstream) is unreachable or not configured."""
    status_code, code = 503, "dependency_unavailable"


class UpstreamTimeout(AppError):
    status_code, code = 504, "upstream_timeout"


class UpstreamClientError(AppError):
    """An upstream 4xx passed through with the upstream's own status."""
    code = "upstream_client_error"

    def __init__(self, status_code: int, message: str, **kw: Any):
        super().__init__(message, **kw)
        self.status_code = status_code
