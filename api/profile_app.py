"""The profile app: users, self-models, measurements and the rest of SPEC §4."""
from __future__ import annotations

from fastapi import FastAPI

from api.app import create_app
from api.context import AppContext
from api.routers import admin_tokens, beliefs, measurements, users
from core.settings import Settings, get_settings

ROUTERS = [users.router, beliefs.router, measurements.router, admin_tokens.router]


def build_profile_app(settings: Settings | None = None, ctx: AppContext | None = None,
                      behind_serve: bool = False) -> FastAPI:
    settings = settings or get_settings()
    ctx = ctx or AppContext.from_settings("profile", settings)
    return create_app(ctx, title="profile", routers=ROUTERS, behind_serve=behind_serve,
                      description="Users, self-models and beliefs, measurements, files, checklist, "
                                  "protocols, trends, conversations, dialectics, simulations, "
                                  "Don't Die data cache.")
