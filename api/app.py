"""Builds one FastAPI app (profile, dontdie or epistemic) with the shared conventions."""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Iterable

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from api.context import AppContext
from api.envelope import ERROR_RESPONSES, error_body, ok
from api.errors import install_error_handlers
from api.mcp import mount_mcp
from api.middleware import RequestContextMiddleware
from core.logging import configure_logging
from core.metrics import metrics as project_metrics
from core.request_context import request_id_var

READY_TIMEOUT_SECONDS = 3.0


async def _check_database(ctx: AppContext) -> str:
    await ctx.db.ping()
    return "ok"


async def _check_redis(ctx: AppContext) -> str:
    await ctx.redis.ping()
    return "ok"


def _health_router(ctx: AppContext) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/health", operation_id="health", summary="Liveness (no dependency calls)")
    async def health():
        return ok({"app": ctx.name, "alive": True})

    @router.get("/ready", operation_id="ready", summary="Readiness of every dependency")
    async def ready():
        checks = {"database": _check_database, "redis": _check_redis, **ctx.readiness}
        names = list(checks)
        results = await asyncio.gather(
            *(asyncio.wait_for(checks[n](ctx), READY_TIMEOUT_SECONDS) for n in names),
            return_exceptions=True)
        report, healthy = {}, True
        for name, result in zip(names, results):
            if isinstance(result, BaseException):
                healthy = False
                message = getattr(result, "message", None) or type(result).__name__
                report[name] = {"ok": False, "error": message}
            else:
                report[name] = {"ok": True, "detail": result}
        if healthy:
            return ok({"app": ctx.name, "ready": True, "dependencies": report})
        return JSONResponse(
            error_body("not_ready", "Some dependencies are unavailable", request_id_var.get(),
                       {"dependencies": report}), status_code=503)

    return router


def create_app(ctx: AppContext, *, title: str, description: str,
               routers: Iterable[APIRouter], body_limits: dict[str, int] | None = None,
               metrics=None, behind_serve: bool = False) -> FastAPI:
    configure_logging(ctx.settings.log_level)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await ctx.aclose()

    app = FastAPI(title=title, description=description, version="1.0.0", lifespan=lifespan,
                  responses=ERROR_RESPONSES)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.include_router(_health_router(ctx))
    for router in routers:
        app.include_router(router)
    mount_mcp(app)

    limits = body_limits or {}
    default_limit = ctx.settings.max_body_bytes

    def body_limit(path: str) -> int:
        # Under Serve the path still carries the app's route prefix.
        for suffix, limit in limits.items():
            if path.endswith(suffix):
                return limit
        return default_limit

    app.add_middleware(RequestContextMiddleware, app_name=ctx.name, body_limit=body_limit,
                       metrics=metrics or project_metrics(), echo_request_id=not behind_serve)
    return app
