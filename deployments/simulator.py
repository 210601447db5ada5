"""Serve host of the simulator pool: Serve keeps one replica alive (restarting it if it dies
or fails its health check), and the replica supervises the simulator actors."""
from __future__ import annotations

import asyncio

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from actors.simulator import SimulatorPool as Pool


@serve.deployment
class SimulatorPool:
    def __init__(self):
        # The constructor runs on the replica's event loop; the supervision loop lives there.
        self._pool = Pool()
        self._loop = asyncio.get_running_loop().create_task(self._pool.run_forever())

    async def status(self) -> dict:
        """Actors, queue depth, restarts and recent scaling (for operators and tests)."""
        return await self._pool.status()

    def check_health(self) -> None:
        if self._loop.done():
            raise RuntimeError("the simulator pool's supervision loop stopped")

    async def __call__(self, request: Request) -> JSONResponse:
        """`GET /simulator/health`: liveness without auth or details (the pool has no API)."""
        if request.method == "GET" and request.url.path.rstrip("/").endswith("/health"):
            return JSONResponse({"status": "ok", "data": {"app": "simulator",
                                                          "alive": not self._loop.done()}})
        return JSONResponse({"status": "error",
                             "error": {"code": "not_found", "message": "Unknown route"},
                             "request_id": request.headers.get("x-request-id", "-")},
                            status_code=404)


deployment = SimulatorPool.bind()
