"""Who is calling, and the one place that decides what they may touch."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import Enum

from core.errors import Forbidden, NotFound, ValidationFailed


class TokenKind(str, Enum):
    user = "user"
    service = "service"
    admin = "admin"


@dataclass(frozen=True)
class Principal:
    token_id: uuid.UUID
    kind: TokenKind
    user_id: uuid.UUID | None = None

    @property
    def is_privileged(self) -> bool:
        """Service and admin tokens act on any user."""
        return self.kind in (TokenKind.service, TokenKind.admin)

    def can_access(self, user_id: uuid.UUID) -> bool:
        return self.is_privileged or self.user_id == user_id

    def ensure_user(self, user_id: uuid.UUID) -> None:
        """For a `user_id` the caller names: a foreign one is forbidden."""
        if not self.can_access(user_id):
            raise Forbidden("This token may only act on its own user")

    def ensure_owner(self, owner_id: uuid.UUID, what: str = "resource") -> None:
        """For objects looked up by id: a foreign one looks like it does not exist."""
        if not self.can_access(owner_id):
            raise NotFound(f"Unknown {what}")

    def require(self, *kinds: TokenKind) -> None:
        if self.kind not in kinds:
            names = " or ".join(k.value for k in kinds)
            raise Forbidden(f"This route needs a token of kind {names}")

    def default_user(self, user_id: uuid.UUID | None) -> uuid.UUID:
        """A user token may omit its own user id; others must name one."""
        if user_id is not None:
            self.ensure_user(user_id)
            return user_id
        if self.user_id is None:
            raise ValidationFailed("user_id is required for service and admin tokens",
                                   details=[{"loc": ["user_id"], "msg": "field required"}])
        return self.user_id
