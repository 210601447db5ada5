"""The profile app: users, self-models, measurements and the rest of SPEC §4."""
from __future__ import annotations

from fastapi import FastAPI

from api.app import create_app
from api.context import AppContext
from api.routers import admin_tokens, beliefs, measurements, users
from api.routers import files as files_routes
from api.routers import dd_data
from api.routers import checklist, conversations, dialectics, protocols, trends
from api.routers import simulation
from core.settings import Settings, get_settings

ROUTERS = [users.router, beliefs.router, measurements.router, admin_tokens.router,
           files_routes.router, dd_data.router]
ROUTERS += [checklist.router, protocols.router, trends.router, conversations.router,
            dialectics.router]
ROUTERS += [simulation.router]


def build_profile_app(settings: Settings | None = None, ctx: AppContext | None = None,
                      behind_serve: bool = False) -> FastAPI:
    settings = settings or get_settings()
    ctx = ctx or AppContext.from_settings("profile", settings)
    ctx.readiness.setdefault("object_store", lambda c: c.objects.ping())
    # Uploads may carry a file up to max_upload_bytes (plus multipart framing); every other
    # route keeps the 1 MiB default body limit.
    body_limits = {"/uploadUserFile": ctx.settings.max_upload_bytes
                   + files_routes.MULTIPART_OVERHEAD_BYTES}
    return create_app(ctx, title="profile", routers=ROUTERS, behind_serve=behind_serve,
                      body_limits=body_limits,
                      description="Users, self-models and beliefs, measurements, files, checklist, "
                                  "protocols, trends, conversations, dialectics, simulations, "
                                  "Don't Die data cache.")
