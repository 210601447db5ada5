"""Latency and failure knobs shared by every sandbox server.

A test (or a curious operator) sets them with `POST /_sandbox/faults` and clears them with
`DELETE /_sandbox/faults`; they apply to every request whose path starts with `path_prefix`.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel


class FaultConfig(BaseModel):
    path_prefix: str = "/"
    latency_ms: int = 0
    hang: bool = False
    fail_status: int | None = None
    fail_body: dict | None = None
    fail_count: int | None = None  # None: every matching request fails


@dataclass
class FaultState:
    config: FaultConfig | None = None
    failures_served: int = 0
    requests: list[str] = field(default_factory=list)


def install_faults(app: FastAPI) -> FaultState:
    state = FaultState()
    app.state.faults = state

    @app.post("/_sandbox/faults", include_in_schema=False)
    async def set_faults(config: FaultConfig):
        state.config = config
        state.failures_served = 0
        return {"ok": True}

    @app.delete("/_sandbox/faults", include_in_schema=False)
    async def clear_faults():
        state.config = None
        state.failures_served = 0
        return {"ok": True}

    @app.get("/_sandbox/requests", include_in_schema=False)
    async def list_requests():
        return {"requests": state.requests}

    @app.delete("/_sandbox/requests", include_in_schema=False)
    async def clear_requests():
        state.requests.clear()
        return {"ok": True}

    @app.middleware("http")
    async def apply_faults(request: Request, call_next):
        path = request.url.path
        if path.startswith("/_sandbox"):
            return await call_next(request)
        state.requests.append(f"{request.method} {path}")
        cfg = state.config
        if cfg and path.startswith(cfg.path_prefix):
            if cfg.hang:
                await asyncio.sleep(3600)
            if cfg.latency_ms:
                await asyncio.sleep(cfg.latency_ms / 1000)
            if cfg.fail_status and (cfg.fail_count is None or state.failures_served < cfg.fail_count):
                state.failures_served += 1
                body = cfg.fail_body or {"message": f"sandbox injected failure {cfg.fail_status}"}
                return JSONResponse(body, status_code=cfg.fail_status)
        return await call_next(request)

    return state
