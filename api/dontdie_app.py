"""The dontdie app: a proxy to the Don't Die health platform (SPEC §5)."""
from __future__ import annotations

from fastapi import FastAPI

from api.app import create_app
from api.context import AppContext
from api.dd_context import check_dontdie_upstream
from api.routers import dontdie
from core.settings import Settings, get_settings

ROUTERS: list = [dontdie.router]


def build_dontdie_app(settings: Settings | None = None, ctx: AppContext | None = None,
                      behind_serve: bool = False) -> FastAPI:
    settings = settings or get_settings()
    ctx = ctx or AppContext.from_settings("dontdie", settings)
    ctx.readiness.setdefault("dontdie_api", check_dontdie_upstream)
    return create_app(ctx, title="dontdie", routers=ROUTERS, behind_serve=behind_serve,
                      description="Proxy to the Don't Die health platform API.")
