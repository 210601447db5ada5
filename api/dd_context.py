"""Per-app Don't Die plumbing: the shared runtime (HTTP pool), the sync facade, readiness."""
from __future__ import annotations

from typing import Annotated, Any

import httpx
from fastapi import Depends

from actors.dd_sync import DDSync
from api.context import AppContext
from api.deps import get_ctx
from core.errors import DependencyUnavailable
from services.dd_runtime import DDRuntime


def dd_runtime(ctx: AppContext) -> DDRuntime:
    runtime = ctx.extras.get("dd_runtime")
    if runtime is None:
        runtime = ctx.extras["dd_runtime"] = DDRuntime.borrowing(ctx.settings, ctx.db, ctx.redis)
    return runtime


def dd_sync(ctx: AppContext) -> DDSync:
    facade = ctx.extras.get("dd_sync")
    if facade is None:
        facade = ctx.extras["dd_sync"] = DDSync(ctx.settings, lambda: dd_runtime(ctx))
    return facade


async def _runtime_dep(ctx: Annotated[AppContext, Depends(get_ctx)]) -> DDRuntime:
    return dd_runtime(ctx)


async def _sync_dep(ctx: Annotated[AppContext, Depends(get_ctx)]) -> DDSync:
    return dd_sync(ctx)


DDRuntimeDep = Annotated[DDRuntime, Depends(_runtime_dep)]
DDSyncDep = Annotated[DDSync, Depends(_sync_dep)]


async def check_dontdie_upstream(ctx: AppContext) -> dict[str, Any]:
    """Readiness: the Don't Die base URL is configured and answers HTTP (any status)."""
    base_url = ctx.settings.dontdie_base_url.strip()
    if not base_url:
        raise DependencyUnavailable("SMA_DONTDIE_BASE_URL is not configured")
    try:
        response = await dd_runtime(ctx).http.get(base_url, timeout=2.0)
    except httpx.HTTPError as exc:
        raise DependencyUnavailable(
            f"Don't Die API at {base_url} is unreachable ({type(exc).__name__})") from None
    return {"base_url": base_url, "http_status": response.status_code}
