"""A small closed-loop HTTP load generator: N concurrent clients for a fixed duration.

aiohttp rather than httpx: on this 2-core machine the generator shares the CPUs with the
server under test, and aiohttp spends about a third of httpx's CPU per request, leaving
more of the machine to what is being measured.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import aiohttp


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
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(headers=headers, connector=connector, timeout=timeout) as client:
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
                    async with client.get(url) as response:
                        await response.read()
                        ok = response.status == 200
                except (aiohttp.ClientError, asyncio.TimeoutError):
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
