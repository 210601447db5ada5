"""The authentication/authorization matrix over every route of all three apps (SPEC §3).

Generated from the apps themselves (route table + OpenAPI), so routes added later are covered
without touching this file. Per app:

- every route except health/ready/docs/openapi × {no token, malformed headers, unknown,
  overlong, revoked, expired} → 401 with `WWW-Authenticate: Bearer` and the error envelope;
- health/ready/docs/openapi answer without a token;
- token kinds: user (naming their own user), service and admin tokens get what the rule table
  says (default: all three allowed; the exceptions are listed in KIND_RULES / PREFIX_RULES);
- every route taking a `user_id` (path, query or body): a user token naming another user's
  id never gets a 2xx (403, or 404), on a request the service token shows to be valid.

All requests are syntactically valid (path params are uuids, required query params and JSON
bodies are filled from the schema, uploads are multipart), so the auth decision is what is
being tested, not request validation.
"""
from __future__ import annotations

import uuid

import pytest

from tests.security.conftest import APP_NAMES, SUMMARY, new_user_with_token
from tests.security.support import (PUBLIC_PATHS, RouteInfo, SchemaWalker, assert_error_envelope,
                                    build_request, iter_routes, route_user_params)
from tests.support.actors import asgi_client, make_user

ALL_KINDS = frozenset({"user", "service", "admin"})
# Routes whose rule is by token kind (SPEC §3, §4.2). Anything not listed is open to all
# three kinds (a user token limited to its own user). A route that refuses service or user
# tokens but is not listed here fails `test_token_kinds_get_what_the_rules_say`: add it.
KIND_RULES: dict[tuple[str, str], frozenset[str]] = {
    ("profile", "listUsers"): frozenset({"service", "admin"}),
    ("profile", "createUser"): frozenset({"service", "admin"}),
    ("profile", "deleteUser"): frozenset({"user", "admin"}),
    ("profile", "createProtocolTemplate"): frozenset({"admin"}),
    ("profile", "listDeadSimulationJobs"): frozenset({"admin"}),
    ("profile", "retrySimulationJob"): frozenset({"admin"}),
}
PREFIX_RULES: dict[tuple[str, str], frozenset[str]] = {
    ("profile", "/admin/"): frozenset({"admin"}),
}

MALFORMED_HEADERS = {
    "malformed:basic": "Basic c2VjdXJpdHk6c3VpdGU=",
    "malformed:scheme-only": "Bearer",
    "malformed:empty-bearer": "Bearer    ",
    "malformed:no-scheme": "sma_" + "A" * 43,
    "malformed:token-scheme": "Token abc",
}


def allowed_kinds(route: RouteInfo) -> frozenset[str]:
    if route.operation_id and (route.app, route.operation_id) in KIND_RULES:
        return KIND_RULES[(route.app, route.operation_id)]
    for (app, prefix), kinds in PREFIX_RULES.items():
        if app == route.app and route.path.startswith(prefix):
            return kinds
    return ALL_KINDS


def protected_routes(app_name: str, app) -> list[RouteInfo]:
    return [r for r in iter_routes(app_name, app) if not r.public]


def schema_routes(app_name: str, app) -> list[RouteInfo]:
    return [r for r in protected_routes(app_name, app) if r.operation is not None]


async def send(client, req, token: str | None = None, authorization: str | None = None):
    kw = req.send_kwargs()
    if authorization is not None:
        kw["headers"]["Authorization"] = authorization
    elif token is not None:
        kw["headers"]["Authorization"] = f"Bearer {token}"
    return await client.request(req.method, req.url, **kw)


@pytest.mark.parametrize("app_name", APP_NAMES)
async def test_every_route_demands_a_valid_token(app_name, apps, tokens, test_database):
    app = apps[app_name]
    walker = SchemaWalker(app.openapi())
    credentials: dict[str, str | None] = {"no token": None, **MALFORMED_HEADERS,
                                          "unknown": "Bearer sma_" + "x" * 43,
                                          "overlong": "Bearer " + "y" * 600,
                                          "revoked": f"Bearer {tokens.revoked}",
                                          "expired": f"Bearer {tokens.expired}"}
    routes = protected_routes(app_name, app)
    assert routes, f"{app_name} has no protected routes?"
    failures, checked = [], 0
    async with asgi_client(app) as client:
        for route in routes:
            req = build_request(route, walker, uuid.uuid4())
            for case, header in credentials.items():
                response = await send(client, req, authorization=header)
                checked += 1
                where = f"{route.label} [{case}]"
                try:
                    error = assert_error_envelope(response, 401, where=where)
                    assert error["code"] == "unauthorized", f"{where}: {error}"
                    assert response.headers.get("www-authenticate") == "Bearer", \
                        f"{where}: WWW-Authenticate={response.headers.get('www-authenticate')!r}"
                except AssertionError as exc:
                    failures.append(str(exc).split("\nassert ")[0])
    SUMMARY[f"auth matrix [{test_database.backend}] routes needing a token"] += len(routes)
    SUMMARY[f"auth matrix [{test_database.backend}] unauthenticated cases"] += checked
    assert not failures, f"{len(failures)} of {checked} cases failed:\n" + "\n".join(failures)


@pytest.mark.parametrize("app_name", APP_NAMES)
async def test_only_health_ready_and_docs_are_public(app_name, apps, test_database):
    app = apps[app_name]
    public = [r for r in iter_routes(app_name, app) if r.public]
    assert {r.path for r in public} == set(PUBLIC_PATHS), "public routes changed"
    async with asgi_client(app) as client:
        for route in public:
            response = await client.request(route.method, route.path)
            assert response.status_code == 200, f"{route.label}: {response.status_code} {response.text[:300]}"
    SUMMARY[f"auth matrix [{test_database.backend}] public route checks"] += len(public)


async def _kind_callers(profile_ctx, tokens):
    """(kind, token, user id the request names). Fresh users per route: a route may delete its
    target (deleteUser), and the user token names its own user."""
    own_id, own_token = await new_user_with_token(profile_ctx.db)
    target = await make_user(profile_ctx.db)
    return [("user", own_token, own_id), ("service", tokens.service, target),
            ("admin", tokens.admin, await make_user(profile_ctx.db))]


@pytest.mark.parametrize("app_name", APP_NAMES)
async def test_token_kinds_get_what_the_rules_say(app_name, apps, tokens, profile_ctx,
                                                  test_database):
    app = apps[app_name]
    walker = SchemaWalker(app.openapi())
    failures, checked, statuses = [], 0, {}
    async with asgi_client(app) as client:
        for route in schema_routes(app_name, app):
            allowed = allowed_kinds(route)
            for kind, token, user_id in await _kind_callers(profile_ctx, tokens):
                response = await send(client, build_request(route, walker, user_id), token)
                checked += 1
                statuses.setdefault(route.label, {})[kind] = response.status_code
                where = f"{route.label} [{kind} token]"
                try:
                    assert response.status_code != 401, f"{where}: 401 {response.text[:300]}"
                    assert response.status_code != 500, f"{where}: 500 {response.text[:300]}"
                    if kind in allowed:
                        assert response.status_code != 403, (
                            f"{where}: 403 {response.text[:300]} — if this route is meant to be "
                            f"limited by token kind, add it to KIND_RULES")
                    else:
                        error = assert_error_envelope(response, 403, where=where)
                        assert error["code"] == "forbidden", f"{where}: {error}"
                except AssertionError as exc:
                    failures.append(str(exc).split("\nassert ")[0])
    SUMMARY[f"auth matrix [{test_database.backend}] token-kind cases"] += checked
    assert not failures, f"{len(failures)} of {checked} cases failed:\n" + "\n".join(failures)


@pytest.mark.parametrize("app_name", APP_NAMES)
async def test_user_tokens_cannot_name_another_user(app_name, apps, tokens, profile_ctx,
                                                    test_database):
    app = apps[app_name]
    walker = SchemaWalker(app.openapi())
    routes = [r for r in schema_routes(app_name, app) if route_user_params(r, walker)]
    failures, checked = [], 0
    async with asgi_client(app) as client:
        for route in routes:
            _, intruder = await new_user_with_token(profile_ctx.db)
            victim = await make_user(profile_ctx.db)
            # The same request, first from a privileged token: it must pass validation, or the
            # 403 below could be a 422 in disguise. Try a fuller body if the minimal one isn't.
            referee = tokens.service if "service" in allowed_kinds(route) else tokens.admin
            for full in (False, True):
                req = build_request(route, walker, victim, full=full)
                probe = await send(client, req, referee)
                if probe.status_code != 422:
                    break
            where = f"{route.label} [user token naming another user]"
            if probe.status_code == 422:
                failures.append(f"{where}: could not build a request that passes validation "
                                f"({probe.text[:300]}); teach tests/security/support.py")
                continue
            response = await send(client, req, intruder)
            checked += 1
            SUMMARY[f"auth matrix [{test_database.backend}] foreign user_id -> {response.status_code}"] += 1
            try:
                assert not 200 <= response.status_code < 300, \
                    f"{where}: {response.status_code} {response.text[:300]}"
                error = assert_error_envelope(response, where=where)
                assert response.status_code in (403, 404), \
                    f"{where}: {response.status_code} {error}"
            except AssertionError as exc:
                failures.append(str(exc).split("\nassert ")[0])
    SUMMARY[f"auth matrix [{test_database.backend}] routes taking user_id"] += len(routes)
    SUMMARY[f"auth matrix [{test_database.backend}] foreign user_id cases"] += checked
    assert not failures, f"{len(failures)} of {checked} cases failed:\n" + "\n".join(failures)
