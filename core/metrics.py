"""Project metrics, exported through `ray.util.metrics` (Ray dashboard / Prometheus).

Outside a Ray worker the metric objects are inert, so the same code runs in tests and tools.
Names are prefixed `sma_`; Ray's exporter adds `ray_` in front.
"""
from __future__ import annotations

import time
from contextlib import asynccontextmanager
from functools import lru_cache

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
DURATION_S = [0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600]


class Metrics:
    def __init__(self) -> None:
        self.http_requests = Counter(
            "sma_http_requests", description="HTTP requests by app, route, method and status",
            tag_keys=("app", "route", "method", "status"))
        self.http_latency = Histogram(
            "sma_http_request_duration_ms", description="HTTP request duration",
            boundaries=LATENCY_MS, tag_keys=("app", "route"))
        self.upstream_calls = Counter(
            "sma_upstream_calls", description="Calls to upstreams by outcome",
            tag_keys=("upstream", "outcome"))
        self.upstream_latency = Histogram(
            "sma_upstream_duration_ms", description="Upstream call duration",
            boundaries=LATENCY_MS, tag_keys=("upstream",))
        self.cache_lookups = Counter(
            "sma_cache_lookups", description="Cache lookups by cache and result (hit/miss)",
            tag_keys=("cache", "result"))
        self.dd_syncs = Counter(
            "sma_dd_syncs", description="Don't Die refreshes by outcome", tag_keys=("outcome",))
        self.dd_sync_duration = Histogram(
            "sma_dd_sync_duration_s", description="Don't Die refresh duration",
            boundaries=DURATION_S, tag_keys=("outcome",))
        self.sim_queue_depth = Gauge(
            "sma_sim_queue_depth", description="Simulation jobs waiting, by list",
            tag_keys=("queue",))
        self.sim_jobs = Counter(
            "sma_sim_jobs", description="Simulation jobs finished by outcome", tag_keys=("outcome",))
        self.sim_job_duration = Histogram(
            "sma_sim_job_duration_s", description="Simulation job duration",
            boundaries=DURATION_S, tag_keys=("template",))
        self.llm_tokens = Counter(
            "sma_llm_tokens", description="LLM tokens by model and kind (prompt/completion)",
            tag_keys=("model", "kind"))

    def observe_request(self, app: str, route: str, method: str, status: int, duration_ms: float) -> None:
        self.http_requests.inc(1, tags={"app": app, "route": route, "method": method, "status": str(status)})
        self.http_latency.observe(duration_ms, tags={"app": app, "route": route})

    def observe_upstream(self, upstream: str, outcome: str, duration_ms: float) -> None:
        self.upstream_calls.inc(1, tags={"upstream": upstream, "outcome": outcome})
        self.upstream_latency.observe(duration_ms, tags={"upstream": upstream})

    def cache(self, cache: str, hit: bool) -> None:
        self.cache_lookups.inc(1, tags={"cache": cache, "result": "hit" if hit else "miss"})


@lru_cache
def metrics() -> Metrics:
    return Metrics()


def _outcome(exc: BaseException) -> str:
    from core import errors
    for kind, name in ((errors.UpstreamTimeout, "timeout"), (errors.DependencyUnavailable, "unavailable"),
                       (errors.UpstreamClientError, "client_error"), (errors.ValidationFailed, "client_error"),
                       (errors.NotFound, "client_error")):
        if isinstance(exc, kind):
            return name
    return "error"


@asynccontextmanager
async def upstream_call(upstream: str):
    """Counts one call to an upstream by outcome and records its duration."""
    started, outcome = time.perf_counter(), "ok"
    try:
        yield
    except BaseException as exc:
        outcome = _outcome(exc)
        raise
    finally:
        metrics().observe_upstream(upstream, outcome, (time.perf_counter() - started) * 1000)
