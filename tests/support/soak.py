"""A bounded soak: closed-loop mixed traffic on the profile, dontdie and epistemic apps, with
per-route latency and status counts and the RSS of every process of the local Ray session.

One implementation for both lengths: `bench/soak.py` (full length, its own cluster) and
`tests/e2e/test_soak.py` (CI length, the session cluster) call `prepare_users` and `soak`.
"""
from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Awaitable, Callable

import httpx
import psutil

MB = 1024 * 1024


# --- users -------------------------------------------------------------------------------

@dataclass
class SoakUser:
    user_id: str
    token: str
    belief_id: str = ""
    conversation_id: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def prepare_user(client: httpx.AsyncClient, user_id: str, token: str) -> SoakUser:
    """Everything the mix reads must exist: a linked and synced Don't Die account (so the cache
    is warm), a profile self-model with a belief, an Epistemic Me self-model, a conversation."""
    user = SoakUser(str(user_id), token)
    h = user.headers

    async def call(method: str, path: str, **kw) -> dict:
        response = await client.request(method, path, headers=h, **kw)
        assert response.is_success, f"{method} {path}: {response.status_code} {response.text[:300]}"
        return response.json()["data"]

    await call("POST", "/profile/dd-data/link", json={
        "user_id": user.user_id, "dd_token": f"sandbox-soak-{uuid.uuid4().hex}", "dd_client_id": "soak"})
    await call("POST", f"/profile/dd-data/sync/{user.user_id}")
    await call("POST", "/profile/upsertSelfModel", json={"user_id": user.user_id})
    belief = await call("POST", "/profile/upsertBelief", json={
        "user_id": user.user_id, "belief_system_name": "default", "statement": "Sleep matters",
        "confidence": 0.5})
    user.belief_id = belief["id"]
    await call("POST", "/epistemic/createSelfModel", json={"user_id": user.user_id})
    conversation = await call("POST", "/profile/startConversation", json={"user_id": user.user_id})
    user.conversation_id = conversation["conversation_id"]
    return user


async def prepare_users(base_url: str, credentials: list[tuple[str, str]]) -> list[SoakUser]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        return [await prepare_user(client, user_id, token) for user_id, token in credentials]


# --- the traffic mix ---------------------------------------------------------------------

Call = Callable[[httpx.AsyncClient, SoakUser, random.Random], Awaitable[httpx.Response]]


def _now_minus(rng: random.Random) -> str:
    moment = datetime.now(timezone.utc) - timedelta(seconds=rng.uniform(0, 29 * 86400))
    return moment.isoformat()


async def _start_conversation(c, u, rng):
    response = await c.post("/profile/startConversation", headers=u.headers,
                            json={"user_id": u.user_id, "meta": {"soak": True}})
    if response.status_code == 201:
        u.conversation_id = response.json()["data"]["conversation_id"]
    return response


def _today() -> str:
    return datetime.now(timezone.utc).date().isoformat()


# (route, weight, call). Reads outweigh writes; every write either updates in place or is
# bounded by the reads (pages, the current conversation), so latency does not drift with data.
MIX: list[tuple[str, int, Call]] = [
    ("GET /profile/getUser", 4, lambda c, u, r: c.get(
        "/profile/getUser", headers=u.headers, params={"user_id": u.user_id})),
    ("POST /profile/upsertMeasurement", 3, lambda c, u, r: c.post(
        "/profile/upsertMeasurement", headers=u.headers, json={
            "user_id": u.user_id, "type": "weight", "value": round(r.uniform(60, 90), 1),
            "unit": "kg", "captured_at": _now_minus(r)})),
    ("GET /profile/listMeasurements", 2, lambda c, u, r: c.get(
        "/profile/listMeasurements", headers=u.headers,
        params={"user_id": u.user_id, "type": "weight", "limit": 20})),
    ("GET /profile/getProgressTrend", 1, lambda c, u, r: c.get(
        "/profile/getProgressTrend", headers=u.headers,
        params={"user_id": u.user_id, "metric": "weight", "window": 30})),
    ("GET /profile/getChecklistProgress", 2, lambda c, u, r: c.get(
        "/profile/getChecklistProgress", headers=u.headers, params={"user_id": u.user_id})),
    ("POST /profile/markChecklistItem", 1, lambda c, u, r: c.post(
        "/profile/markChecklistItem", headers=u.headers, json={
            "user_id": u.user_id, "bucket_code": "demographics",
            "status": r.choice(["in_progress", "completed"])})),
    ("GET /profile/getSelfModel", 2, lambda c, u, r: c.get(
        "/profile/getSelfModel", headers=u.headers, params={"user_id": u.user_id})),
    ("POST /profile/upsertBelief", 1, lambda c, u, r: c.post(
        "/profile/upsertBelief", headers=u.headers, json={
            "id": u.belief_id, "statement": f"Sleep matters ({r.randint(0, 9999)})",
            "confidence": round(r.random(), 2)})),
    ("GET /profile/dd-data/checklist-item-data", 3, lambda c, u, r: c.get(
        "/profile/dd-data/checklist-item-data", headers=u.headers,
        params={"user_id": u.user_id, "bucket_code": r.choice(["dd_score", "measurements", "protocols"])})),
    ("GET /profile/dd-data/status", 1, lambda c, u, r: c.get(
        f"/profile/dd-data/status/{u.user_id}", headers=u.headers)),
    ("POST /profile/startConversation", 1, _start_conversation),
    ("POST /profile/appendTurn", 3, lambda c, u, r: c.post(
        "/profile/appendTurn", headers=u.headers, json={
            "conversation_id": u.conversation_id, "role": r.choice(["user", "assistant"]),
            "content": f"turn {r.randint(0, 10**6)}"})),
    ("GET /profile/getConversation", 1, lambda c, u, r: c.get(
        "/profile/getConversation", headers=u.headers, params={"conversation_id": u.conversation_id})),
    ("GET /profile/listConversations", 1, lambda c, u, r: c.get(
        "/profile/listConversations", headers=u.headers, params={"user_id": u.user_id, "limit": 20})),
    ("GET /dontdie/getAccount", 1, lambda c, u, r: c.get(
        "/dontdie/getAccount", headers=u.headers, params={"user_id": u.user_id})),
    ("GET /dontdie/getDdScore", 1, lambda c, u, r: c.get(
        "/dontdie/getDdScore", headers=u.headers,
        params={"user_id": u.user_id, "date": _today(), "days": 7})),
    ("GET /dontdie/getMeasurements", 1, lambda c, u, r: c.get(
        "/dontdie/getMeasurements", headers=u.headers, params={"user_id": u.user_id})),
    ("GET /dontdie/getUserProtocols", 1, lambda c, u, r: c.get(
        "/dontdie/getUserProtocols", headers=u.headers, params={"user_id": u.user_id})),
    ("GET /epistemic/getSelfModel", 1, lambda c, u, r: c.get(
        "/epistemic/getSelfModel", headers=u.headers, params={"user_id": u.user_id})),
    ("GET /epistemic/listBeliefs", 1, lambda c, u, r: c.get(
        "/epistemic/listBeliefs", headers=u.headers, params={"user_id": u.user_id, "limit": 20})),
    ("POST /epistemic/updateBelief", 1, lambda c, u, r: c.post(
        "/epistemic/updateBelief", headers=u.headers, json={
            "user_id": u.user_id, "statement": f"Walking helps ({r.randint(0, 9999)})",
            "confidence": 0.6})),
]
ROUTES = [name for name, _, _ in MIX]


# --- measurement -------------------------------------------------------------------------

@dataclass
class RouteStats:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)  # HTTP status, or the exception's name

    @property
    def count(self) -> int:
        return len(self.latencies_ms)

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if isinstance(s, int) and 200 <= s < 300)

    @property
    def five_xx(self) -> int:
        return sum(n for s, n in self.statuses.items() if isinstance(s, int) and s >= 500)

    @property
    def non_2xx(self) -> int:
        return self.count - self.ok

    def pct(self, q: float) -> float:
        data = sorted(self.latencies_ms)
        return data[min(len(data) - 1, int(q * len(data)))] if data else float("nan")

    def summary(self) -> dict:
        return {"count": self.count, "ok": self.ok, "5xx": self.five_xx, "non_2xx": self.non_2xx,
                "p50_ms": round(self.pct(0.50), 1), "p99_ms": round(self.pct(0.99), 1),
                "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=str)}}


async def run_mix(base_url: str, users: list[SoakUser], *, seconds: float, concurrency: int,
                  seed: int = 0) -> dict[str, RouteStats]:
    """`concurrency` closed-loop clients, each picking a weighted route and a user per request."""
    stats = {name: RouteStats() for name in ROUTES}
    names, weights, calls = zip(*MIX)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    stop_at = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:

        async def worker(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.monotonic() < stop_at:
                i = rng.choices(range(len(MIX)), weights)[0]
                user = rng.choice(users)
                t0 = time.perf_counter()
                try:
                    outcome = (await calls[i](client, user, rng)).status_code
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                stats[names[i]].latencies_ms.append((time.perf_counter() - t0) * 1000)
                stats[names[i]].statuses[outcome] += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return stats


# --- Ray processes -----------------------------------------------------------------------

def session_dir() -> str:
    import ray
    return ray._private.worker.global_worker.node.get_session_dir_path()


def _label(proc: psutil.Process) -> str:
    cmdline = proc.cmdline()
    first = cmdline[0] if cmdline else proc.name()
    if first.startswith("ray::"):  # a worker: its title is the actor class (and running method)
        return first.removeprefix("ray::").split()[0].split(".")[0]
    scripts = [Path(a).stem for a in cmdline[1:3] if a.endswith(".py")]
    return scripts[0] if scripts else Path(first).name


def ray_processes(session: str) -> dict[int, psutil.Process]:
    """The processes started for the Ray session (gcs_server, raylet, dashboard, monitors: their
    command lines name the session directory) and all their descendants (core workers: the
    Serve controller, proxies, HAProxy, replicas, actors)."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(session in arg for arg in proc.info["cmdline"] or ()):
            roots.append(proc)
    found: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            for proc in [root, *root.children(recursive=True)]:
                found[proc.pid] = proc
        except psutil.NoSuchProcess:
            pass
    return found


def rss_snapshot(session: str) -> dict[int, dict]:
    """pid → {name, rss_mb}. Idle pooled workers are Ray's to start and stop, not ours."""
    snapshot = {}
    for pid, proc in ray_processes(session).items():
        try:
            name = _label(proc)
            if name != "IDLE":
                snapshot[pid] = {"name": name, "rss_mb": round(proc.memory_info().rss / MB, 1)}
        except psutil.Error:
            pass
    return snapshot


def rss_table(start: dict[int, dict], mid: dict[int, dict], end: dict[int, dict]) -> list[dict]:
    rows = []
    for pid in sorted(set(start) | set(end), key=lambda p: ((start.get(p) or end[p])["name"], p)):
        rows.append({"name": (start.get(pid) or end[pid])["name"], "pid": pid,
                     **{f"{when}_mb": snap.get(pid, {}).get("rss_mb")
                        for when, snap in (("start", start), ("mid", mid), ("end", end))}})
    return rows


# --- the whole run -----------------------------------------------------------------------

async def soak(base_url: str, users: list[SoakUser], *, seconds: float, concurrency: int = 8,
               warmup: float = 10.0, seed: int = 0) -> dict:
    """Warm up (connections, caches, first calls), then run the mix for `seconds`, taking the
    RSS of the Ray processes at the start, halfway (growth that keeps going in the second half
    is a leak, not warm-up) and at the end. Returns the JSON-able report."""
    session = session_dir()
    load_before = psutil.getloadavg()
    await run_mix(base_url, users, seconds=warmup, concurrency=concurrency, seed=seed + 1)
    start = rss_snapshot(session)
    began = time.monotonic()

    async def halfway() -> dict[int, dict]:
        await asyncio.sleep(seconds / 2)
        return await asyncio.to_thread(rss_snapshot, session)

    stats, mid = await asyncio.gather(
        run_mix(base_url, users, seconds=seconds, concurrency=concurrency, seed=seed), halfway())
    elapsed = time.monotonic() - began
    end = rss_snapshot(session)
    routes = {name: s.summary() for name, s in stats.items()}
    total = sum(s.count for s in stats.values())
    return {"seconds": round(elapsed, 1), "concurrency": concurrency, "users": len(users),
            "requests": total, "rps": round(total / elapsed, 1),
            "5xx": sum(s.five_xx for s in stats.values()),
            "non_2xx": sum(s.non_2xx for s in stats.values()),
            "routes": routes, "rss": rss_table(start, mid, end),
            "load_average": {"start": [round(x, 2) for x in load_before],
                             "end": [round(x, 2) for x in psutil.getloadavg()]}}


def markdown(report: dict) -> str:
    lines = [f"{report['seconds']:.0f} s, {report['concurrency']} clients, {report['users']} users: "
             f"{report['requests']:,} requests ({report['rps']:.1f} req/s), "
             f"5xx = {report['5xx']}, other non-2xx = {report['non_2xx'] - report['5xx']}", "",
             "| route | requests | non-2xx | 5xx | p50 ms | p99 ms |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in report["routes"].items():
        lines.append(f"| `{name}` | {r['count']:,} | {r['non_2xx']} | {r['5xx']} | "
                     f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    lines += ["", "| Ray process | pid | RSS start MB | halfway MB | end MB | change | 2nd half |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["rss"]:
        start, mid, end = row["start_mb"], row["mid_mb"], row["end_mb"]
        lines.append(f"| {row['name']} | {row['pid']} | {_mb(start)} | {_mb(mid)} | {_mb(end)} | "
                     f"{_change(start, end)} | {_change(mid, end)} |")
    return "\n".join(lines)


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "new" if after is not None else "gone"
    return f"{after - before:+.1f}"
