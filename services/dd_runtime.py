"""What Don't Die work needs besides a session: settings, database, Redis and one HTTP pool.

The profile and dontdie apps borrow their AppContext's connections; a sync host actor owns
its own. Every Don't Die call goes through `clients.dontdie.DontDieClient`.
"""
from __future__ import annotations

from dataclasses import dataclass

import httpx
from redis.asyncio import Redis

from clients.dontdie import DontDieClient
from core.settings import Settings
from storage.db import Database
from storage.redis import make_redis

HTTP_LIMITS = httpx.Limits(max_connections=200, max_keepalive_connections=50)


@dataclass
class DDRuntime:
    settings: Settings
    db: Database
    redis: Redis | None
    http: httpx.AsyncClient
    owns_connections: bool = False

    @classmethod
    def borrowing(cls, settings: Settings, db: Database, redis: Redis | None) -> "DDRuntime":
        """Uses an app's database and Redis; only the HTTP pool is its own."""
        return cls(settings, db, redis, httpx.AsyncClient(limits=HTTP_LIMITS))

    @classmethod
    def from_settings(cls, settings: Settings) -> "DDRuntime":
        return cls(settings, Database(settings.resolved_database_url()), make_redis(settings.redis_url),
                   httpx.AsyncClient(limits=HTTP_LIMITS), owns_connections=True)

    def client(self, token: str, client_id: str) -> DontDieClient:
        return DontDieClient.from_settings(self.settings, token, client_id, redis=self.redis,
                                           http=self.http)

    async def aclose(self) -> None:
        await self.http.aclose()
        if self.owns_connections:
            if self.redis is not None:
                await self.redis.aclose()
            await self.db.dispose()
