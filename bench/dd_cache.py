"""(a) Don't Die data for the UI: served from the cache vs fetched from the upstream.

Through the Serve proxy, N concurrent clients (default 32) for a fixed time each, then one
client (per-request latency without queueing); `GET /profile/health` (no auth, no I/O) at the
same concurrency is measured first as the Serve proxy's ceiling on the machine:
  cached    GET /profile/dd-data/checklist-item-data?bucket_code=measurements
  uncached  GET /dontdie/getMeasurements with the sandbox upstream answering in 300 ms

    .venv/bin/python -m bench.dd_cache [--seconds 15] [--concurrency 32] [--profile-replicas 1]

Loopback only: a SQLite file, an embedded redis-server and the Don't Die sandbox in a temp dir.
"""
from __future__ import annotations

import argparse
import asyncio
import json
from contextlib import ExitStack

from bench.dd_common import Environment, link_and_sync
from bench.loadgen import run_load, summary
from tests.support.dd import new_dd_token


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--serial-seconds", type=float, default=5,
                        help="the same paths with a single client, for per-request latency")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--upstream-latency-ms", type=int, default=300)
    parser.add_argument("--profile-replicas", type=int, default=1)
    parser.add_argument("--dontdie-replicas", type=int, default=1)
    args = parser.parse_args()

    with ExitStack() as stack:
        env = Environment(stack)
        user_id, token = env.user_with_token()
        env.start_ray(stack)
        base = env.deploy(("profile", "dontdie"), {"ProfileAPI": args.profile_replicas,
                                                   "DontDieAPI": args.dontdie_replicas})
        synced = link_and_sync(base, user_id, token, new_dd_token())
        headers = {"Authorization": f"Bearer {token}"}
        results = {}

        cached_url = f"{base}/profile/dd-data/checklist-item-data?bucket_code=measurements"
        uncached_url = f"{base}/dontdie/getMeasurements"

        def load(url: str, concurrency: int, seconds: float) -> dict:
            return summary(asyncio.run(run_load(url, headers=headers, concurrency=concurrency,
                                                seconds=seconds)))

        # the proxy's own ceiling on this machine: no auth, no I/O
        results["reference_health"] = load(f"{base}/profile/health", args.concurrency,
                                           args.serial_seconds)
        env.sandbox.clear_requests()
        results["cached"] = load(cached_url, args.concurrency, args.seconds)
        results["cached_one_client"] = load(cached_url, 1, args.serial_seconds)
        results["cached"]["upstream_requests"] = len(env.sandbox.requests())

        env.sandbox.latency(args.upstream_latency_ms)
        results["uncached"] = load(uncached_url, args.concurrency, args.seconds)
        results["uncached_one_client"] = load(uncached_url, 1, args.serial_seconds)

    cached, uncached = results["cached"], results["uncached"]
    one, one_uncached = results["cached_one_client"], results["uncached_one_client"]
    results["speedup"] = {"rps": round(cached["rps"] / uncached["rps"], 1),
                          "p50": round(uncached["p50_ms"] / cached["p50_ms"], 1),
                          "p99": round(uncached["p99_ms"] / cached["p99_ms"], 1),
                          "one_client_p50": round(one_uncached["p50_ms"] / one["p50_ms"], 1)}
    results["settings"] = {**vars(args), "database": env.database_kind,
                           "records_synced": synced["records_synced"]}
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
