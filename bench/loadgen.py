"""A small closed-loop HTTP load generator: N concurrent clients for a fixed duration."""
from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import httpx


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        data = sorted(self.latencies_ms)
        return data[min(len(data) - 1, int(q * len(data)))] if data else float("nan")

    def row(self, label: str) -> str:
        return (f"| {label} | {self.rps:,.0f} | {self.pct(0.50):.1f} | {self.pct(0.99):.1f} | "
                f"{self.errors} |")


async def run_load(url: str, *, headers: dict[str, str], concurrency: int = 32,
                   seconds: float = 15.0, warmup: float = 2.0) -> LoadResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=30) as client:
        latencies: list[float] = []
        errors = 0
        start = time.perf_counter()
        measuring_from = start + warmup
        stop_at = measuring_from + seconds

        async def worker() -> None:
            nonlocal errors
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                try:
                    response = await client.get(url)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                t1 = time.perf_counter()
                if t0 >= measuring_from:
                    latencies.append((t1 - t0) * 1000)
                    errors += 0 if ok else 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LoadResult(len(latencies), errors, seconds, latencies)


def summary(result: LoadResult) -> dict:
    return {"rps": round(result.rps, 1), "p50_ms": round(result.pct(0.5), 2),
            "p99_ms": round(result.pct(0.99), 2), "errors": result.errors,
            "mean_ms": round(statistics.fmean(result.latencies_ms), 2) if result.latencies_ms else None}
