"""The database unavailable (issue 8, faults).

PostgreSQL is reached through a loopback TCP proxy (tests/support/tcp_proxy.py) that can be cut
like a network partition: requests then answer 503 `database_unavailable` in the envelope within
the pool/connect timeouts, a transaction cut half-way leaves no rows behind, and the app recovers
by itself once the proxy is restored. SQLite has no network: its "outage" is a database file
that cannot be opened."""
from __future__ import annotations

import os

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from api.context import AppContext
from api.profile_app import build_profile_app
from core.principal import TokenKind
from core.settings import Settings
from services import beliefs
from storage.models import BeliefSystem, SelfModel, User
from tests.faults.conftest import err, timed, wait_for_status
from tests.support.actors import asgi_client, make_caller, make_user
from tests.support import databases
from tests.support.tcp_proxy import TcpProxy

# storage/db.py: connect timeout 5 s, pool timeout 10 s; generous on a loaded machine.
OUTAGE_BOUND_S = 20.0

needs_postgres = pytest.mark.skipif(
    not os.environ.get("SMA_TEST_POSTGRES_URL"),
    reason="only PostgreSQL has a network outage to simulate (set SMA_TEST_POSTGRES_URL)")


@pytest.fixture
async def pg_behind_proxy(tmp_path):
    database = databases.TestDatabase("postgres", tmp_path)
    await database.create()
    url = make_url(database.url)
    proxy = await TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    yield database, proxy, proxied
    await proxy.stop()
    await database.drop()


@pytest.fixture
async def proxied_app(pg_behind_proxy, redis_url, redis, tmp_path):
    database, proxy, proxied_url = pg_behind_proxy
    settings = Settings(database_url=proxied_url, redis_url=redis_url, data_dir=tmp_path / "data",
                        rate_limit_per_minute=10_000, credential_key="", llm_base_url="")
    ctx = AppContext.from_settings("profile", settings)
    app = build_profile_app(settings, ctx=ctx)
    yield ctx, app, proxy
    await proxy.restore()
    await ctx.aclose()


async def _count(ctx, model, *where) -> int:
    async with ctx.db.transaction() as session:
        return await session.scalar(select(func.count()).select_from(model).where(*where))


@needs_postgres
async def test_postgres_outage_is_503_bounded_and_recovers(proxied_app):
    ctx, app, proxy = proxied_app
    alice = await make_caller(ctx.db, app, TokenKind.user)
    anonymous = asgi_client(app)
    unknown = asgi_client(app, "sma_" + "u" * 43)  # not cached: its lookup needs the database
    try:
        uid = str(alice.user_id)
        assert (await alice.client.post("/upsertSelfModel", json={"user_id": uid})).status_code == 200

        await proxy.cut()

        for call in (lambda: alice.client.get("/getSelfModel", params={"user_id": uid}),   # read
                     lambda: alice.client.post("/upsertBeliefSystem",                      # write
                                               json={"user_id": uid, "name": "outage"}),
                     lambda: unknown.get("/listUsers")):                                   # auth
            response, elapsed = await timed(call())
            err(response, 503, "database_unavailable")
            assert elapsed < OUTAGE_BOUND_S, elapsed
        ready, elapsed = await timed(anonymous.get("/ready"))
        assert ready.status_code == 503 and elapsed < OUTAGE_BOUND_S, ready.text
        assert "database" in ready.text

        await proxy.restore()
        got = await wait_for_status(
            lambda: alice.client.get("/getSelfModel", params={"user_id": uid}), 200, deadline_s=30)
        names = {s["name"] for s in got.json()["data"]["belief_systems"]}
        assert "outage" not in names, names  # the write that answered 503 did not happen
        await wait_for_status(lambda: anonymous.get("/ready"), 200, deadline_s=30)
        ok = await alice.client.post("/upsertBeliefSystem", json={"user_id": uid, "name": "after"})
        assert ok.status_code == 200, ok.text
    finally:
        for client in (alice.client, anonymous, unknown):
            await client.aclose()


@needs_postgres
async def test_connection_cut_mid_transaction_leaves_no_half_written_rows(proxied_app, monkeypatch):
    """upsertSelfModel writes a self_model row and then its `default` belief system. The proxy is
    cut between the two statements: after restore, neither row exists (all or nothing), and
    the retried request writes both."""
    ctx, app, proxy = proxied_app
    alice = await make_caller(ctx.db, app, TokenKind.user)
    user_id = alice.user_id
    real_ensure = beliefs.ensure_belief_system
    cut_once = {"done": False}

    async def cut_then_continue(session, self_model_id, name):
        if not cut_once["done"]:
            cut_once["done"] = True
            await session.flush()
            await proxy.cut()
        return await real_ensure(session, self_model_id, name)

    monkeypatch.setattr(beliefs, "ensure_belief_system", cut_then_continue)
    try:
        response, elapsed = await timed(
            alice.client.post("/upsertSelfModel", json={"user_id": str(user_id)}))
        err(response, 503, "database_unavailable")
        assert elapsed < OUTAGE_BOUND_S, elapsed
        assert cut_once["done"]

        await proxy.restore()
        await wait_for_status(lambda: alice.client.get("/getSelfModel", params={"user_id": str(user_id)}),
                              404, deadline_s=30)  # no self-model: the first insert was rolled back
        assert await _count(ctx, SelfModel, SelfModel.user_id == user_id) == 0

        ok = await alice.client.post("/upsertSelfModel", json={"user_id": str(user_id)})
        assert ok.status_code == 200, ok.text
        assert await _count(ctx, SelfModel, SelfModel.user_id == user_id) == 1
        assert [s["name"] for s in ok.json()["data"]["belief_systems"]] == ["default"]
    finally:
        await alice.client.aclose()


@needs_postgres
async def test_delete_user_during_outage_deletes_nothing(proxied_app):
    """deleteUser removes many rows in one transaction: during an outage it answers 503 and,
    after restore, the user and all their rows are still there; then it deletes everything."""
    ctx, app, proxy = proxied_app
    admin = await make_caller(ctx.db, app, TokenKind.admin)
    user_id = await make_user(ctx.db)
    try:
        assert (await admin.client.post("/upsertSelfModel",
                                        json={"user_id": str(user_id)})).status_code == 200
        await proxy.cut()
        response, elapsed = await timed(admin.client.delete("/deleteUser",
                                                            params={"user_id": str(user_id)}))
        err(response, 503, "database_unavailable")
        assert elapsed < OUTAGE_BOUND_S, elapsed
        await proxy.restore()
        await wait_for_status(lambda: admin.client.get("/getSelfModel",
                                                       params={"user_id": str(user_id)}), 200)
        assert await _count(ctx, User, User.id == user_id) == 1
        assert await _count(ctx, SelfModel, SelfModel.user_id == user_id) == 1

        gone = await admin.client.delete("/deleteUser", params={"user_id": str(user_id)})
        assert gone.status_code == 204, gone.text
        assert await _count(ctx, User, User.id == user_id) == 0
        assert await _count(ctx, SelfModel, SelfModel.user_id == user_id) == 0
        assert await _count(ctx, BeliefSystem) == 0
    finally:
        await admin.client.aclose()


async def test_sqlite_file_that_cannot_be_opened_is_503(redis_url, redis, tmp_path):
    """SQLite has no network to cut: a database path in a missing directory stands in."""
    missing = tmp_path / "no-such-dir" / "sma.db"
    settings = Settings(database_url=f"sqlite+aiosqlite:///{missing}", redis_url=redis_url,
                        data_dir=tmp_path / "data", rate_limit_per_minute=10_000, credential_key="")
    ctx = AppContext.from_settings("profile", settings)
    app = build_profile_app(settings, ctx=ctx)
    client = asgi_client(app, "sma_" + "s" * 43)
    anonymous = asgi_client(app)
    try:
        response, elapsed = await timed(client.get("/listUsers"))
        err(response, 503, "database_unavailable")
        assert elapsed < OUTAGE_BOUND_S
        ready = await anonymous.get("/ready")
        assert ready.status_code == 503 and "database" in ready.text, ready.text
        assert (await anonymous.get("/health")).status_code == 200
    finally:
        await client.aclose()
        await anonymous.aclose()
        await ctx.aclose()
