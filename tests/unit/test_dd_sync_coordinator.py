"""SyncCoordinator semantics in-process, with a fake refresh: the same object the Ray hosts run."""
from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import timedelta
from types import SimpleNamespace

import pytest

from actors.dd_sync import _error_reply, _unwrap, host_index
from core.errors import Conflict, NotFound, UpstreamTimeout
from services.dd_sync import SyncCoordinator, SyncState, parse_errors_text, errors_text
from storage.types import utcnow

THROTTLE = 300


class FakeUpstream:
    """Counts refreshes per user and the most that ever ran at once for one user."""

    def __init__(self, delay: float = 0.05, status: str = "success"):
        self.delay, self.status = delay, status
        self.calls: Counter = Counter()
        self.running: Counter = Counter()
        self.max_parallel: Counter = Counter()
        self.loads: Counter = Counter()
        self.states: dict[uuid.UUID, SyncState] = {}
        self.fail: Exception | None = None

    async def refresh(self, runtime, user_id, *, trigger):
        self.calls[user_id] += 1
        self.running[user_id] += 1
        self.max_parallel[user_id] = max(self.max_parallel[user_id], self.running[user_id])
        try:
            await asyncio.sleep(self.delay)
            if self.fail:
                raise self.fail
            return {"sync_status": self.status,
                    "last_synced": None if self.status == "error" else utcnow(),
                    "records_synced": 3, "errors": {}, "error_status": {}, "refreshed": True}
        finally:
            self.running[user_id] -= 1

    async def load(self, runtime, user_id):
        self.loads[user_id] += 1
        return self.states.get(user_id, SyncState())


def coordinator(fake: FakeUpstream, **kw) -> SyncCoordinator:
    runtime = SimpleNamespace(settings=SimpleNamespace(dd_sync_throttle_seconds=THROTTLE))
    return SyncCoordinator(runtime, refresh_fn=fake.refresh, load_fn=fake.load, **kw)


async def test_concurrent_requests_fold_into_one_refresh():
    fake = FakeUpstream()
    owner = coordinator(fake)
    user = uuid.uuid4()
    results = await asyncio.gather(*(owner.sync(user) for _ in range(50)))
    assert fake.calls[user] == 1 and fake.loads[user] == 1
    assert len({r["last_synced"] for r in results}) == 1
    assert sum(r["coalesced"] for r in results) == 49


async def test_refreshes_of_one_user_never_overlap_but_users_run_in_parallel():
    fake = FakeUpstream(delay=0.1)
    owner = coordinator(fake)
    a, b = uuid.uuid4(), uuid.uuid4()
    first = asyncio.create_task(owner.sync(a))
    await asyncio.sleep(0.01)
    joined = asyncio.create_task(owner.sync(a, force=True))  # joins, does not run beside it
    other = asyncio.create_task(owner.sync(b))
    await asyncio.gather(first, joined, other)
    assert fake.calls == Counter({a: 1, b: 1})
    assert fake.max_parallel[a] == 1
    await owner.sync(a, force=True)
    assert fake.calls[a] == 2 and fake.max_parallel[a] == 1


async def test_throttle_force_and_never_synced():
    fake = FakeUpstream(delay=0)
    owner = coordinator(fake)
    user = uuid.uuid4()
    first = await owner.sync(user)  # never synced: always fetches
    assert first["refreshed"] is True
    second = await owner.sync(user)
    assert second["refreshed"] is False and second["throttled"] is True
    assert second["last_synced"] == first["last_synced"]
    assert fake.calls[user] == 1
    assert (await owner.sync(user, force=True))["refreshed"] is True
    assert fake.calls[user] == 2


async def test_state_from_the_database_decides_the_throttle():
    fake = FakeUpstream(delay=0)
    recent, old, failed, half_done = (uuid.uuid4() for _ in range(4))
    fake.states = {
        recent: SyncState(last_synced=utcnow() - timedelta(seconds=60), sync_status="success"),
        old: SyncState(last_synced=utcnow() - timedelta(seconds=THROTTLE + 1), sync_status="success"),
        failed: SyncState(last_synced=utcnow() - timedelta(seconds=60), sync_status="error"),
        half_done: SyncState(last_synced=utcnow() - timedelta(seconds=60), sync_status="syncing"),
    }
    owner = coordinator(fake)
    assert (await owner.sync(recent))["refreshed"] is False
    for user in (old, failed, half_done):
        assert (await owner.sync(user))["refreshed"] is True, user


async def test_error_results_are_not_throttled():
    fake = FakeUpstream(delay=0, status="error")
    owner = coordinator(fake)
    user = uuid.uuid4()
    await owner.sync(user)
    await owner.sync(user)
    assert fake.calls[user] == 2


async def test_start_does_not_wait():
    fake = FakeUpstream(delay=0.1)
    owner = coordinator(fake)
    user = uuid.uuid4()
    assert await owner.start(user) == "started"
    assert await owner.start(user) == "in_progress"
    assert owner.stats()["inflight"] == 1
    await owner.drain()
    assert await owner.start(user) == "fresh"
    assert fake.calls[user] == 1


async def test_failures_reach_every_waiter_and_clear_the_flight():
    fake = FakeUpstream(delay=0.05)
    fake.fail = UpstreamTimeout("slow")
    owner = coordinator(fake)
    user = uuid.uuid4()
    results = await asyncio.gather(*(owner.sync(user) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, UpstreamTimeout) for r in results)
    assert fake.calls[user] == 1 and owner.stats()["inflight"] == 0
    fake.fail = None
    assert (await owner.sync(user))["refreshed"] is True


async def test_unknown_or_unlinked_users_are_forgotten():
    fake = FakeUpstream(delay=0)
    owner = coordinator(fake)
    user = uuid.uuid4()
    for error in (NotFound("Unknown user"), Conflict("not linked")):
        fake.fail = error
        with pytest.raises(type(error)):
            await owner.sync(user)
        assert owner.stats()["users_cached"] == 0


async def test_a_cancelled_waiter_does_not_cancel_the_refresh():
    fake = FakeUpstream(delay=0.1)
    owner = coordinator(fake)
    user = uuid.uuid4()
    waiter = asyncio.create_task(owner.sync(user))
    other = asyncio.create_task(owner.sync(user))
    await asyncio.sleep(0.02)
    waiter.cancel()
    result = await other
    assert result["refreshed"] is True and fake.calls[user] == 1


async def test_state_cache_is_lru_bounded_and_forget_reloads():
    fake = FakeUpstream(delay=0)
    owner = coordinator(fake, max_users=3)
    users = [uuid.uuid4() for _ in range(10)]
    for user in users:
        await owner.sync(user)
    assert owner.stats()["users_cached"] == 3
    await owner.sync(users[-1])
    assert fake.loads[users[-1]] == 1  # still cached
    owner.forget(users[-1])
    await owner.sync(users[-1])
    assert fake.loads[users[-1]] == 2


def test_host_index_is_stable_and_spreads_users():
    users = [uuid.UUID(int=i * 7919 + 1) for i in range(1000)]
    assert [host_index(u, 4) for u in users] == [host_index(u, 4) for u in users]
    counts = Counter(host_index(u, 4) for u in users)
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 180
    assert {host_index(u, 1) for u in users} == {0}


def test_errors_cross_the_actor_boundary_with_their_class_and_status():
    with pytest.raises(Conflict) as caught:
        _unwrap(_error_reply(Conflict("not linked", code="dontdie_not_linked")))
    assert caught.value.status_code == 409 and caught.value.code == "dontdie_not_linked"


def test_errors_text_round_trip():
    errors = {"measurements": "Don't Die API failed with HTTP 500; retried",
              "dd_scores": "2 of 7 days failed: timeout: after 0.5s"}
    assert parse_errors_text(errors_text(errors)) == errors
    assert parse_errors_text(None) == {}
