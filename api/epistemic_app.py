"""The epistemic app: a proxy to the Epistemic Me platform (SPEC §6)."""
from __future__ import annotations

from fastapi import FastAPI

from api.app import create_app
from api.context import AppContext
from core.settings import Settings, get_settings

ROUTERS: list = []


def build_epistemic_app(settings: Settings | None = None, ctx: AppContext | None = None,
                      behind_serve: bool = False) -> FastAPI:
    settings = settings or get_settings()
    ctx = ctx or AppContext.from_settings("epistemic", settings)
    return create_app(ctx, title="epistemic", routers=ROUTERS, behind_serve=behind_serve,
                      description="Proxy to the Epistemic Me belief and dialectic platform.")
