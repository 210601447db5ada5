"""(b) 50 concurrent sync requests for one user → exactly one upstream refresh.

Through the Serve proxy (two profile replicas, so requests land on both), against the sandbox
answering in 300 ms so that every request arrives while the refresh is in flight. Upstream
refreshes are counted from the sandbox's own request log (`/_sandbox/requests`): each refresh
lists the user's protocols exactly once.

    .venv/bin/python -m bench.dd_coalesce [--requests 50] [--profile-replicas 2]

Rounds: a never-synced user (no force), then the same user with force=true.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from contextlib import ExitStack

import httpx

from bench.dd_common import Environment
from tests.support.dd import dd_uid, new_dd_token


async def burst(base: str, token: str, user_id: str, n: int, force: bool) -> dict:
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60, limits=limits) as client:
        started = time.perf_counter()
        responses = await asyncio.gather(*(
            client.post(f"/profile/dd-data/sync/{user_id}", params={"force": str(force).lower()})
            for _ in range(n)))
        seconds = time.perf_counter() - started
    data = [r.json().get("data") or {} for r in responses]
    return {"statuses": dict(Counter(r.status_code for r in responses)),
            "coalesced": sum(1 for d in data if d.get("coalesced")),
            "distinct_last_synced": len({d.get("last_synced") for d in data}),
            "wall_seconds": round(seconds, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--upstream-latency-ms", type=int, default=300)
    parser.add_argument("--profile-replicas", type=int, default=2)
    args = parser.parse_args()

    with ExitStack() as stack:
        env = Environment(stack)
        user_id, token = env.user_with_token()
        env.start_ray(stack)
        base = env.deploy(("profile",), {"ProfileAPI": args.profile_replicas})
        dd_token = new_dd_token()
        uid = dd_uid(dd_token)
        httpx.post(f"{base}/profile/dd-data/link", headers={"Authorization": f"Bearer {token}"},
                   json={"user_id": user_id, "dd_token": dd_token, "dd_client_id": "bench"},
                   timeout=60).raise_for_status()
        env.sandbox.latency(args.upstream_latency_ms)

        rounds = {}
        for name, force in (("never_synced", False), ("forced", True)):
            env.sandbox.clear_requests()
            result = asyncio.run(burst(base, token, user_id, args.requests, force))
            result["upstream_refreshes"] = len(env.sandbox.requests(f"GET /user-health/{uid}/protocols"))
            result["upstream_requests"] = len(env.sandbox.requests())
            rounds[name] = result
        logs = httpx.get(f"{base}/profile/dd-data/sync-logs/{user_id}",
                         headers={"Authorization": f"Bearer {token}"}, timeout=30).json()["data"]

    print(json.dumps({"rounds": rounds, "sync_log_rows": logs["total"],
                      "settings": {**vars(args), "database": env.database_kind}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
