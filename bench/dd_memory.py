"""(c) Memory of the Don't Die sync hosts as the number of synced users grows: 10, 100, 1,000.

Users are placed on `SMA_DD_SYNC_HOSTS` (default 2) named Ray actor processes by a hash of
their id; each host keeps per-user state in an LRU-bounded cache. This links N sandbox
accounts (rows written directly), syncs them through the real hosts (the same facade the
profile app uses) and reads each host's RSS/USS after 10, 100 and 1,000 users.

    .venv/bin/python -m bench.dd_memory [--users 10,100,1000] [--concurrency 32]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from contextlib import ExitStack

from bench.dd_common import Environment
from core.crypto import cipher_from_settings
from core.settings import get_settings
from storage.db import Database
from storage.models import DDCredential, User
from tests.support.dd import dd_uid, new_dd_token

MB = 1024 * 1024


async def seed_linked_users(database_url: str, count: int) -> list[uuid.UUID]:
    cipher = cipher_from_settings(get_settings())
    db = Database(database_url)
    ids = [uuid.uuid4() for _ in range(count)]
    try:
        async with db.transaction() as session:
            for user_id in ids:
                token = new_dd_token()
                session.add(User(id=user_id, dontdie_uid=dd_uid(token)))
                await session.flush()
                session.add(DDCredential(user_id=user_id, dontdie_uid=dd_uid(token),
                                         client_id="bench", token_ciphertext=cipher.encrypt(token)))
    finally:
        await db.dispose()
    return ids


async def measure(milestones: list[int], concurrency: int, database_url: str) -> dict:
    from actors.dd_sync import DDSync

    settings = get_settings()
    users = await seed_linked_users(database_url, max(milestones))
    facade = DDSync(settings, use_ray=True)
    baseline = await facade.host_stats()
    rows = [_row(0, baseline, 0.0)]
    gate = asyncio.Semaphore(concurrency)
    failures = 0

    async def one(user_id: uuid.UUID) -> None:
        nonlocal failures
        async with gate:
            result = await facade.sync(user_id)
            failures += result["sync_status"] != "success"

    done, started = 0, time.perf_counter()
    for target in sorted(milestones):
        await asyncio.gather(*(one(u) for u in users[done:target]))
        done = target
        rows.append(_row(target, await facade.host_stats(), time.perf_counter() - started))
    per_host_baseline = sum(s["rss_bytes"] for s in baseline) / len(baseline)
    return {"hosts": facade.hosts, "rows": rows, "failed_syncs": failures,
            "one_actor_per_user_estimate_mb": {
                str(n): round(n * per_host_baseline / MB) for n in sorted(milestones)}}


def _row(users: int, stats: list[dict], seconds: float) -> dict:
    return {"users": users, "sync_seconds": round(seconds, 1),
            "users_cached": sum(s["users_cached"] for s in stats),
            "rss_mb_per_host": [round(s["rss_bytes"] / MB, 1) for s in stats],
            "uss_mb_per_host": [round(s["uss_bytes"] / MB, 1) for s in stats],
            "rss_mb_total": round(sum(s["rss_bytes"] for s in stats) / MB, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", default="10,100,1000")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    milestones = [int(n) for n in args.users.split(",")]

    with ExitStack() as stack:
        env = Environment(stack)
        env.start_ray(stack)
        result = asyncio.run(measure(milestones, args.concurrency, env.env["SMA_DATABASE_URL"]))
    result["settings"] = {**vars(args), "database": env.database_kind}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
