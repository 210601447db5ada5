"""Upstreams that refuse, error or hang (issue 8, faults): the dontdie and epistemic apps answer
503 (unreachable), 502 (upstream 5xx) and 504 (no answer within the configured timeout), each
within a bounded time, and stay healthy: /health is 200 and a normal call succeeds once the
fault is cleared."""
from __future__ import annotations

import httpx
import pytest

from api.context import AppContext
from sandbox.server import free_port
from tests.faults.conftest import DD_RETRIES, UPSTREAM_TIMEOUT_S, err, timed

# Worst case for a hanging Don't Die GET: (1 + retries) attempts of the timeout plus backoff.
BOUND_S = 10.0
assert (1 + DD_RETRIES) * UPSTREAM_TIMEOUT_S + 2 < BOUND_S

DD_HEADERS = {"X-DD-Token": "sandbox-upstream-faults-0001", "X-DD-Client-Id": "sma-faults"}


@pytest.fixture
async def app_with(settings, profile_ctx):
    """app_with("dontdie"|"epistemic", **setting_overrides) -> a freshly built app."""
    from api.dontdie_app import build_dontdie_app
    from api.epistemic_app import build_epistemic_app
    builders = {"dontdie": build_dontdie_app, "epistemic": build_epistemic_app}
    contexts: list[AppContext] = []

    def build(name: str, **overrides):
        s = settings.model_copy(update=overrides)
        ctx = AppContext.from_settings(name, s)
        contexts.append(ctx)
        return builders[name](s, ctx=ctx)

    yield build
    for ctx in contexts:
        await ctx.aclose()


def set_fault(server, **config) -> None:
    httpx.post(f"{server.url}/_sandbox/faults", json=config, timeout=10).raise_for_status()


def clear_faults(server) -> None:
    httpx.delete(f"{server.url}/_sandbox/faults", timeout=10).raise_for_status()


async def assert_healthy(client: httpx.AsyncClient, normal_call) -> None:
    assert (await client.get("/health")).status_code == 200
    response = await normal_call()
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ok"


# --- Don't Die -------------------------------------------------------------------------------

async def test_dontdie_refusing_upstream_is_503(app_with, client_for, alice):
    client = client_for(app_with("dontdie", dontdie_base_url=f"http://127.0.0.1:{free_port()}"), alice)
    response, elapsed = await timed(client.get("/getAccount", headers=DD_HEADERS))
    err(response, 503)
    assert elapsed < BOUND_S, elapsed
    assert (await client.get("/health")).status_code == 200


async def test_dontdie_erroring_upstream_is_502_then_recovers(dontdie_app, client_for, alice, dd_sandbox):
    client = client_for(dontdie_app, alice)
    normal = lambda: client.get("/getAccount", headers=DD_HEADERS)  # noqa: E731
    await assert_healthy(client, normal)
    set_fault(dd_sandbox, path_prefix="/", fail_status=500)
    response, elapsed = await timed(normal())
    err(response, 502)
    assert elapsed < BOUND_S, elapsed
    clear_faults(dd_sandbox)
    await assert_healthy(client, normal)


async def test_dontdie_hanging_upstream_is_504_within_timeout_then_recovers(
        dontdie_app, client_for, alice, dd_sandbox):
    client = client_for(dontdie_app, alice)
    normal = lambda: client.get("/getAccount", headers=DD_HEADERS)  # noqa: E731
    set_fault(dd_sandbox, path_prefix="/", hang=True)
    for request in (normal, lambda: client.post("/createUserProtocol", headers=DD_HEADERS,
                                                json={"name": "hangs"})):
        response, elapsed = await timed(request())
        err(response, 504)
        assert UPSTREAM_TIMEOUT_S * 0.9 <= elapsed < BOUND_S, elapsed
    clear_faults(dd_sandbox)
    await assert_healthy(client, normal)


# --- Epistemic Me ----------------------------------------------------------------------------

def _em_get(client, caller):
    return lambda: client.get("/getSelfModel", params={"user_id": str(caller.user_id)})


async def test_epistemic_refusing_upstream_is_503(app_with, client_for, alice):
    client = client_for(app_with("epistemic", epistemic_base_url=f"http://127.0.0.1:{free_port()}"),
                        alice)
    response, elapsed = await timed(_em_get(client, alice)())
    err(response, 503)
    assert elapsed < BOUND_S, elapsed
    assert (await client.get("/health")).status_code == 200


async def test_epistemic_erroring_upstream_is_502_then_recovers(epistemic_app, client_for, alice, em_sandbox):
    client = client_for(epistemic_app, alice)
    created = await client.post("/createSelfModel", json={"user_id": str(alice.user_id)})
    assert created.status_code in (200, 201), created.text
    await assert_healthy(client, _em_get(client, alice))
    set_fault(em_sandbox, path_prefix="/EpistemicMeService/", fail_status=500)
    response, elapsed = await timed(_em_get(client, alice)())
    err(response, 502, "upstream_error")
    assert elapsed < BOUND_S, elapsed
    clear_faults(em_sandbox)
    await assert_healthy(client, _em_get(client, alice))


async def test_epistemic_hanging_upstream_is_504_within_timeout_then_recovers(
        epistemic_app, client_for, alice, em_sandbox):
    client = client_for(epistemic_app, alice)
    created = await client.post("/createSelfModel", json={"user_id": str(alice.user_id)})
    assert created.status_code in (200, 201), created.text
    set_fault(em_sandbox, path_prefix="/EpistemicMeService/", hang=True)
    response, elapsed = await timed(_em_get(client, alice)())
    err(response, 504, "upstream_timeout")
    assert UPSTREAM_TIMEOUT_S * 0.9 <= elapsed < BOUND_S, elapsed
    clear_faults(em_sandbox)
    await assert_healthy(client, _em_get(client, alice))
