"""What a running app holds: settings and connections, created once per process."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from redis.asyncio import Redis

from core.settings import Settings
from storage.db import Database
from storage.redis import make_redis

if TYPE_CHECKING:
    from storage.objects import ObjectStore

ReadinessCheck = Callable[["AppContext"], Awaitable[Any]]


@dataclass
class AppContext:
    name: str
    settings: Settings
    db: Database
    redis: Redis
    readiness: dict[str, ReadinessCheck] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, name: str, settings: Settings) -> "AppContext":
        return cls(name=name, settings=settings, db=Database(settings.resolved_database_url()),
                   redis=make_redis(settings.redis_url))

    @property
    def objects(self) -> "ObjectStore":
        """The object store for user files, created on first use and closed with the context."""
        store = self.extras.get("objects")
        if store is None:
            from storage.objects import object_store_from_settings
            store = self.extras["objects"] = object_store_from_settings(self.settings)
        return store

    async def aclose(self) -> None:
        for extra in self.extras.values():
            closer = getattr(extra, "aclose", None)
            if closer is not None:
                await closer()
        await self.redis.aclose()
        await self.db.dispose()
