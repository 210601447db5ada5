"""Structured JSON logs. Secrets never reach them: only ids, kinds, routes and timings."""
from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone

from core.request_context import principal_kind_var, request_id_var

_SECRET = re.compile(r"(sma_[A-Za-z0-9_\-]{20,}|Bearer\s+\S+|sk-[A-Za-z0-9]{10,})")


def redact(text: str) -> str:
    return _SECRET.sub("[redacted]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact(record.getMessage()),
            "request_id": request_id_var.get(),
            "principal_kind": principal_kind_var.get(),
        }
        for key in ("route", "method", "status", "duration_ms", "app", "user_id", "job_id"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    root = logging.getLogger("sma")
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
