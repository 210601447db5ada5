"""Soak: mixed traffic on the profile, dontdie and epistemic apps for a fixed time, against
PostgreSQL and Redis, on a local Ray cluster running every app of serve_config.yaml.

    .venv/bin/python -m bench.soak --seconds 300 [--concurrency 8] [--users 16] [--replicas 2]

SMA_DATABASE_URL: used as is; otherwise a fresh database is created on --postgres (default
postgresql://postgres@127.0.0.1:5432/postgres), migrated, and dropped at the end.
SMA_REDIS_URL: default redis://127.0.0.1:6379/14 (keys are per user and token; nothing is
flushed). The Don't Die, Epistemic Me and LLM sandboxes run in their own processes.
Prints a JSON report and a markdown table (per-route p50/p99 and 5xx, RSS of every Ray
process at the start and the end); exits 1 if any request got a 5xx.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import uuid
from contextlib import ExitStack

from cryptography.fernet import Fernet

from bench.dd_common import _shutdown_ray, fresh_postgres, start_sandbox, wait_http
from core import cluster
from core.principal import TokenKind
from sandbox.server import free_port
from storage.db import Database
from tests.support.actors import make_token, make_user
from tests.support.soak import markdown, prepare_users, soak

APPS = ("profile", "dontdie", "epistemic", "simulator")


def environment(stack: ExitStack, postgres_admin_url: str) -> dict[str, str]:
    epistemic_key = str(uuid.uuid4())
    env = {
        "SMA_DATABASE_URL": os.environ.get("SMA_DATABASE_URL") or fresh_postgres(stack, postgres_admin_url),
        "SMA_REDIS_URL": os.environ.get("SMA_REDIS_URL", "redis://127.0.0.1:6379/14"),
        "SMA_DATA_DIR": tempfile.mkdtemp(prefix="sma-soak-"),
        "SMA_CREDENTIAL_KEY": Fernet.generate_key().decode(),
        "SMA_RATE_LIMIT_PER_MINUTE": "1000000", "SMA_LOG_LEVEL": "WARNING",
        "SMA_DONTDIE_BASE_URL": start_sandbox(stack, "sandbox.dontdie:create_app"),
        "SMA_EPISTEMIC_BASE_URL": start_sandbox(stack, "sandbox.epistemic:create_app",
                                                {"SMA_SANDBOX_EPISTEMIC_KEYS": epistemic_key}),
        "SMA_EPISTEMIC_API_KEY": epistemic_key,
        "SMA_LLM_BASE_URL": start_sandbox(stack, "sandbox.llm:create_app") + "/v1",
        "SMA_LLM_API_KEY": "sandbox-key",
    }
    # HAProxy's stats/metrics and Serve's fallback proxy listen on fixed ports by default;
    # free ones let this run beside another local cluster (tests, other benchmarks).
    for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                 "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"):
        env.setdefault(name, os.environ.get(name) or str(free_port()))
    return env


async def seed_users(database_url: str, count: int) -> list[tuple[str, str]]:
    db = Database(database_url)
    try:
        users = []
        for _ in range(count):
            user_id = await make_user(db)
            token, _ = await make_token(db, TokenKind.user, user_id)
            users.append((str(user_id), token))
        return users
    finally:
        await db.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--warmup", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=None,
                        help="fixed replicas per API app (default: serve_config.yaml's autoscaling)")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--json", help="also write the JSON report to this file")
    args = parser.parse_args()

    with ExitStack() as stack:
        env = environment(stack, args.postgres)
        credentials = asyncio.run(seed_users(env["SMA_DATABASE_URL"], args.users))
        cluster.start_local_ray(gcs_port=None, dashboard_port=free_port(), include_dashboard=False,
                                object_store_mb=100, env=env)
        stack.callback(_shutdown_ray)
        http_port = free_port()
        overrides = ({name: {"num_replicas": args.replicas}
                      for name in ("ProfileAPI", "DontDieAPI", "EpistemicAPI")} if args.replicas else None)
        cluster.deploy(cluster.load_serve_config(http_port, overrides))
        base = f"http://127.0.0.1:{http_port}"
        for app in APPS:
            wait_http(f"{base}/{app}/health")
        users = asyncio.run(prepare_users(base, credentials))
        report = asyncio.run(soak(base, users, seconds=args.seconds, concurrency=args.concurrency,
                                  warmup=args.warmup))
        report["database"] = env["SMA_DATABASE_URL"].split(":")[0]
        report["replicas"] = args.replicas or "serve_config.yaml"
        print(json.dumps(report, indent=2))
        print()
        print(markdown(report))
        if args.json:
            with open(args.json, "w") as out:
                json.dump(report, out, indent=2)
    return 1 if report["5xx"] else 0


if __name__ == "__main__":
    sys.exit(main())
