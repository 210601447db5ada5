"""The epistemic app: a proxy to the Epistemic Me platform (SPEC §6)."""
from __future__ import annotations

import asyncio

from fastapi import FastAPI

from api.app import READY_TIMEOUT_SECONDS, create_app
from api.context import AppContext
from api.routers import epistemic
from clients.epistemic import validate_api_key
from core.errors import AppError, DependencyUnavailable
from core.settings import Settings, get_settings
from services.epistemic import is_upstream_missing

ROUTERS: list = [epistemic.router]

READINESS_PROBE_ID = "sma-readiness-probe"


async def check_epistemic_me(ctx: AppContext) -> str:
    """Ready when the API key is a UUID and Epistemic Me answers a keyed call with it.

    The probe asks for a self-model that does not exist: "not found" proves the platform is
    reachable and accepted the key; `unauthenticated` names the key setting.
    """
    problem = validate_api_key(ctx.settings.epistemic_api_key)
    if problem:
        raise DependencyUnavailable(problem)
    client = epistemic.epistemic_client(ctx)
    budget = max(0.5, min(client.timeout, READY_TIMEOUT_SECONDS - 0.5))
    try:
        async with asyncio.timeout(budget):
            await client.get_self_model(READINESS_PROBE_ID)
    except TimeoutError:
        raise DependencyUnavailable(
            f"Epistemic Me at {client.base_url} did not answer within {budget:g}s") from None
    except AppError as exc:
        if not is_upstream_missing(exc):
            raise
    return f"reachable at {client.base_url}; API key accepted"


def build_epistemic_app(settings: Settings | None = None, ctx: AppContext | None = None,
                      behind_serve: bool = False) -> FastAPI:
    settings = settings or get_settings()
    ctx = ctx or AppContext.from_settings("epistemic", settings)
    ctx.readiness.setdefault("epistemic_me", check_epistemic_me)
    return create_app(ctx, title="epistemic", routers=ROUTERS, behind_serve=behind_serve,
                      description="Proxy to the Epistemic Me belief and dialectic platform.")
