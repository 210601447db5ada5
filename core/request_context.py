"""Per-request values that logs need (set by the HTTP middleware)."""
from contextvars import ContextVar

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
principal_kind_var: ContextVar[str] = ContextVar("principal_kind", default="-")
