"""Per-user Don't Die sync owners on a fixed, small number of Ray actor processes.

One actor process per user would cost ~90 MB each (DESIGN.md), so users are placed by a stable
hash of their id on `settings.dd_sync_hosts` named, detached async actors (`dd-sync-host-<i>`
in namespace `sma`). Each host runs a `services.dd_sync.SyncCoordinator`: per user, one
refresh at a time, concurrent requests joined to the one in flight, the throttle, and an
LRU-bounded cache of sync state. A host that dies is restarted (`max_restarts=-1`) or
recreated on the next call (`get_if_exists=True`) and reloads state from the database.

`DDSync` is what the profile app calls. Inside a Serve replica (or with `use_ray=True`) it
routes to the hosts; without Ray it runs one coordinator in-process with the same semantics.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import uuid
from typing import Any, Callable

import psutil
import ray
from ray.exceptions import RayActorError

from core import errors as app_errors
from core.errors import AppError, DependencyUnavailable
from core.settings import Settings, get_settings
from services.dd_runtime import DDRuntime
from services.dd_sync import SyncCoordinator

log = logging.getLogger(__name__)

NAMESPACE = "sma"
HOST_NAME = "dd-sync-host-{index}"
HOST_MAX_CONCURRENCY = 1000
CALL_ATTEMPTS = 4


def host_index(user_id: uuid.UUID, hosts: int) -> int:
    """Stable across processes and restarts (unlike `hash()`)."""
    digest = hashlib.sha256(user_id.bytes).digest()
    return int.from_bytes(digest[:8], "big") % max(1, hosts)


def host_name(index: int) -> str:
    return HOST_NAME.format(index=index)


def _error_reply(exc: AppError) -> dict[str, Any]:
    return {"ok": False, "error": {"type": type(exc).__name__, "status_code": exc.status_code,
                                   "code": exc.code, "message": exc.message,
                                   "details": exc.details, "headers": exc.headers}}


def _unwrap(reply: dict[str, Any]) -> Any:
    if reply["ok"]:
        return reply["result"]
    err = reply["error"]
    exc = AppError(err["message"], code=err["code"], details=err["details"], headers=err["headers"])
    cls = getattr(app_errors, err["type"], None)
    if isinstance(cls, type) and issubclass(cls, AppError) and cls.status_code == err["status_code"]:
        exc.__class__ = cls  # same fields; keeps `except NotFound` and friends working
    exc.status_code = err["status_code"]
    raise exc


@ray.remote
class DDSyncHost:
    """Hosts the sync owners of every user that hashes to it."""

    def __init__(self) -> None:
        settings = get_settings()
        self._runtime = DDRuntime.from_settings(settings)
        self._coordinator = SyncCoordinator(self._runtime)

    async def _guard(self, call) -> dict[str, Any]:
        try:
            return {"ok": True, "result": await call}
        except AppError as exc:
            return _error_reply(exc)
        except Exception:
            log.exception("Don't Die sync host call failed")
            return _error_reply(AppError("Internal error in the Don't Die sync host"))

    async def sync(self, user_id: str, force: bool, trigger: str) -> dict[str, Any]:
        return await self._guard(self._coordinator.sync(uuid.UUID(user_id), force=force,
                                                        trigger=trigger))

    async def start(self, user_id: str, force: bool, trigger: str) -> dict[str, Any]:
        return await self._guard(self._coordinator.start(uuid.UUID(user_id), force=force,
                                                         trigger=trigger))

    async def forget(self, user_id: str) -> dict[str, Any]:
        self._coordinator.forget(uuid.UUID(user_id))
        return {"ok": True, "result": None}

    async def stats(self) -> dict[str, Any]:
        memory = psutil.Process().memory_full_info()
        return {**self._coordinator.stats(), "pid": os.getpid(), "rss_bytes": memory.rss,
                "uss_bytes": memory.uss}


def get_or_create_host(index: int):
    return DDSyncHost.options(
        name=host_name(index), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        max_restarts=-1, max_concurrency=HOST_MAX_CONCURRENCY, num_cpus=0).remote()


def _inside_serve_replica() -> bool:
    if not ray.is_initialized():
        return False
    from ray import serve
    try:
        serve.get_replica_context()
    except Exception:
        return False
    return True


class DDSync:
    """The profile app's handle on the per-user sync owners."""

    def __init__(self, settings: Settings, runtime_factory: Callable[[], DDRuntime] | None = None,
                 *, use_ray: bool | None = None):
        self.settings = settings
        self.hosts = max(1, settings.dd_sync_hosts)
        self._runtime_factory = runtime_factory
        self._use_ray = use_ray
        self._local: SyncCoordinator | None = None
        self._handles: dict[int, Any] = {}
        self._handle_lock = asyncio.Lock()

    @property
    def uses_ray(self) -> bool:
        if self._use_ray is None:
            self._use_ray = _inside_serve_replica()
        return self._use_ray

    async def sync(self, user_id: uuid.UUID, *, force: bool = False,
                   trigger: str = "manual") -> dict[str, Any]:
        if not self.uses_ray:
            return await self._coordinator().sync(user_id, force=force, trigger=trigger)
        return await self._call(user_id, "sync", force, trigger)

    async def start(self, user_id: uuid.UUID, *, force: bool = False,
                    trigger: str = "background") -> str:
        if not self.uses_ray:
            return await self._coordinator().start(user_id, force=force, trigger=trigger)
        return await self._call(user_id, "start", force, trigger)

    async def forget(self, user_id: uuid.UUID) -> None:
        """Best effort: at worst the host answers one more throttled sync from old state."""
        if not self.uses_ray:
            if self._local is not None:
                self._local.forget(user_id)
            return
        try:
            await self._call(user_id, "forget")
        except AppError as exc:
            log.warning("could not reset Don't Die sync state: %s", exc.message)

    async def host_stats(self) -> list[dict[str, Any]]:
        if not self.uses_ray:
            return [self._coordinator().stats()]
        handles = [await self._handle(i) for i in range(self.hosts)]
        return list(await asyncio.gather(*(h.stats.remote() for h in handles)))

    async def drain(self) -> None:
        """Wait for in-process refreshes (tests); hosts run theirs on their own."""
        if self._local is not None:
            await self._local.drain()

    async def aclose(self) -> None:
        if self._local is not None:
            await self._local.aclose()  # the runtime belongs to whoever made it
            self._local = None

    def _coordinator(self) -> SyncCoordinator:
        if self._local is None:
            if self._runtime_factory is None:
                raise DependencyUnavailable("No Ray cluster and no local Don't Die runtime")
            self._local = SyncCoordinator(self._runtime_factory())
        return self._local

    async def _handle(self, index: int):
        handle = self._handles.get(index)
        if handle is None:
            async with self._handle_lock:
                handle = self._handles.get(index)
                if handle is None:
                    handle = await asyncio.to_thread(get_or_create_host, index)
                    self._handles[index] = handle
        return handle

    async def _call(self, user_id: uuid.UUID, method: str, *args: Any) -> Any:
        index = host_index(user_id, self.hosts)
        for attempt in range(CALL_ATTEMPTS):
            handle = await self._handle(index)
            try:
                reply = await getattr(handle, method).remote(str(user_id), *args)
            except RayActorError as exc:
                # Died or restarting: forget the handle; the next one restarts or recreates it.
                log.warning("Don't Die sync host %d unavailable (%s), retrying", index,
                            type(exc).__name__)
                if self._handles.get(index) is handle:
                    self._handles.pop(index, None)
                await asyncio.sleep(0.25 * (attempt + 1))
                continue
            return _unwrap(reply)
        raise DependencyUnavailable("The Don't Die sync service is unavailable; try again shortly",
                                    code="sync_host_unavailable")
