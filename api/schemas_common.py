"""Field types shared by the request and response schemas of every resource."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated

from typing import Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from storage.types import as_utc

UTCDatetime = Annotated[datetime, AfterValidator(as_utc)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Statement = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
TurnContent = Annotated[str, StringConstraints(min_length=1, max_length=32000)]
Confidence = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Limit = Annotated[int, Field(ge=1, le=100)]
# Bounded so that a huge offset is a 422, not a database integer overflow (a 500).
Offset = Annotated[int, Field(ge=0, le=2**31 - 1)]


class Model(BaseModel):
    """Response models read straight from ORM rows."""
    model_config = ConfigDict(from_attributes=True)


def _reject_nul(value: Any, path: str = "") -> None:
    # PostgreSQL text and jsonb cannot hold U+0000: refuse it as a 422, never a database error.
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{path or 'value'} must not contain NUL characters")
    elif isinstance(value, dict):
        for key, item in value.items():
            _reject_nul(key, path)
            _reject_nul(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for item in value:
            _reject_nul(item, path)
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _reject_nul(getattr(value, name), name)


class Request(BaseModel):
    """Request bodies reject unknown fields (typos surface as 422, not silent no-ops) and
    NUL characters (which PostgreSQL cannot store)."""
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _no_nul(self):
        _reject_nul(self)
        return self
