"""Field types shared by the request and response schemas of every resource."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from storage.types import as_utc

UTCDatetime = Annotated[datetime, AfterValidator(as_utc)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Statement = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
TurnContent = Annotated[str, StringConstraints(min_length=1, max_length=32000)]
Confidence = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Limit = Annotated[int, Field(ge=1, le=100)]
Offset = Annotated[int, Field(ge=0)]


class Model(BaseModel):
    """Response models read straight from ORM rows."""
    model_config = ConfigDict(from_attributes=True)


class Request(BaseModel):
    """Request bodies reject unknown fields so typos surface as 422, not silent no-ops."""
    model_config = ConfigDict(extra="forbid")
