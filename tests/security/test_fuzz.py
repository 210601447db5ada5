"""Property-based fuzzing of all three apps from their own OpenAPI documents (schemathesis),
plus hand-made hostile inputs: oversized bodies, odd Unicode, huge numbers, deep nesting.

Each app runs under uvicorn on a loopback port in its own thread and event loop
(`sandbox.server.BackgroundServer`), with its upstreams replaced by the local sandboxes.
Requests carry a service token (and, for the profile app, a second run with a user token);
valid `user_id`s in generated requests are mostly pointed at a real user so the deeper code
runs, not just the 404 path.

Every response must satisfy:
- no 5xx (a 501 only where the route documents it: a platform that cannot do something);
- the status is one the operation documents (a method the path does not have → 405);
- every non-2xx/3xx response is JSON in the error envelope (`status: error`, `error.code`,
  `request_id`).

Bounded for CI: the coverage phase is deterministic; the fuzzing phase draws SMA_FUZZ_EXAMPLES
(default 25) examples per operation, positive and negative, derandomised unless SMA_FUZZ_SEED
is set. Fuzzing runs on PostgreSQL when configured, else SQLite (see conftest.py).
"""
from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from schemathesis import GenerationMode

from api.context import AppContext
from core.principal import TokenKind
from sandbox.server import BackgroundServer
from tests.security.conftest import SUMMARY
from tests.security.support import SchemaWalker, build_request
from tests.support.actors import asgi_client, make_token, make_user

MAX_EXAMPLES = int(os.environ.get("SMA_FUZZ_EXAMPLES", "25"))
SEED = os.environ.get("SMA_FUZZ_SEED")
MIB = 1024 * 1024
MAX_URL_BYTES = 8 * 1024
# Fuzzed as (app, token kind) → schemathesis phases. The profile app also with a user token
# (own data, 403s); that run skips the coverage phase, whose deterministic validation cases
# the service run already sends.
ALL_PHASES = ["examples", "coverage", "fuzzing"]
TARGETS = {"profile:service": ALL_PHASES, "profile:user": ["examples", "fuzzing"],
           "dontdie:service": ALL_PHASES, "epistemic:service": ALL_PHASES}
# With a user token these would destroy the caller's own token mid-run; their success paths
# are tested in the feature suites. They are still fuzzed, just never with the caller's id.
SELF_DESTRUCTIVE = {"deleteUser"}


def _builder(app_name: str):
    from api.dontdie_app import build_dontdie_app
    from api.epistemic_app import build_epistemic_app
    from api.profile_app import build_profile_app
    return {"profile": build_profile_app, "dontdie": build_dontdie_app,
            "epistemic": build_epistemic_app}[app_name]


@dataclass
class FuzzTarget:
    label: str
    app: str
    kind: str
    url: str
    spec: dict[str, Any]
    token: str
    subject: uuid.UUID  # the user most requests name
    backend: str
    http: requests.Session = field(default_factory=requests.Session)
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def operation(self, path: str, method: str) -> dict[str, Any] | None:
        return self.spec.get("paths", {}).get(path, {}).get(method.lower())

    def record(self, phase: str, status: int) -> None:
        self.statuses[status] += 1
        SUMMARY[f"fuzz [{self.backend}] {self.label} {phase} inputs"] += 1


@contextmanager
def serve(app_name: str, settings):
    """The app on a loopback port, with its own context: its DB and Redis connections live on
    the server's event loop only (closed by the app's lifespan on shutdown)."""
    ctx = AppContext.from_settings(app_name, settings)
    server = BackgroundServer(_builder(app_name)(settings, ctx=ctx)).start()
    try:
        yield server.url
    finally:
        server.stop()


async def _link_dontdie(apps, service_token: str, user_id: uuid.UUID) -> bool:
    """Link a sandbox Don't Die account to `user_id`, so dontdie calls reach the upstream."""
    async with asgi_client(apps["profile"], service_token) as client:
        response = await client.post("/dd-data/link", json={
            "user_id": str(user_id), "dd_token": f"sandbox-fuzz-{uuid.uuid4().hex}",
            "dd_client_id": "security-fuzz"})
    return response.status_code < 300


async def _start_target(request, label, apps, tokens, profile_ctx, security_settings,
                        test_database):
    app_name, kind = label.split(":")
    db = profile_ctx.db
    subject = await make_user(db)
    if kind == "user":
        token, _ = await make_token(db, TokenKind.user, subject, name="fuzz-user")
    else:
        token = tokens.service
    if app_name == "dontdie":
        assert await _link_dontdie(apps, tokens.service, subject), "linking a sandbox account failed"
    stack = serve(app_name, security_settings)
    url = stack.__enter__()
    request.addfinalizer(lambda: stack.__exit__(None, None, None))
    # Building the schema is CPU-bound; give a loaded CI machine room.
    spec = requests.get(url + "/openapi.json", timeout=60).json()
    return FuzzTarget(label, app_name, kind, url, spec, token, subject, test_database.backend)


@pytest.fixture(params=list(TARGETS))
async def fuzz_target(request, apps, tokens, profile_ctx, security_settings, test_database):
    target = await _start_target(request, request.param, apps, tokens, profile_ctx,
                                 security_settings, test_database)
    yield target
    SUMMARY[f"fuzz [{target.backend}] {target.label} statuses"] = \
        ", ".join(f"{k}×{v}" for k, v in sorted(target.statuses.items()))  # type: ignore[assignment]
    target.http.close()


@pytest.fixture(params=["profile", "dontdie", "epistemic"])
async def service_target(request, apps, tokens, profile_ctx, security_settings, test_database):
    target = await _start_target(request, f"{request.param}:service", apps, tokens, profile_ctx,
                                 security_settings, test_database)
    yield target
    target.http.close()


@pytest.fixture
def fuzz_schema(fuzz_target):
    schema = schemathesis.openapi.from_url(fuzz_target.url + "/openapi.json")
    schema.config.update(request_timeout=30,
                         suppress_health_check=[schemathesis.config.HealthCheck.all])
    schema.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES,
        database="none", deterministic=SEED is None)
    schema.config.phases.update(phases=TARGETS[fuzz_target.label])
    if SEED is not None:
        schema.config.seed = int(SEED)
    return schema


# --- the invariants --------------------------------------------------------------------

def check_response(target: FuzzTarget, method: str, path_template: str, status: int,
                   headers, body: bytes, where: str) -> None:
    op = target.operation(path_template, method)
    documented = set((op or {}).get("responses", {}))
    if status >= 500:
        assert status == 501 and "501" in documented, f"{where}: server error {status}: {body[:400]!r}"
    if op is None:
        assert status == 405, f"{where}: undocumented method answered {status}"
    else:
        assert str(status) in documented or "default" in documented, \
            f"{where}: status {status} is not documented (documented: {sorted(documented)}): {body[:300]!r}"
    if status >= 400:
        ctype = _header(headers, "content-type")
        assert ctype.startswith("application/json"), f"{where}: error is not JSON ({ctype!r}): {body[:300]!r}"
        data = json.loads(body)
        assert isinstance(data, dict) and data.get("status") == "error", f"{where}: {data!r:.300}"
        error = data.get("error")
        assert isinstance(error, dict) and isinstance(error.get("code"), str) and error["code"], \
            f"{where}: {data!r:.300}"
        assert isinstance(data.get("request_id"), str) and data["request_id"], f"{where}: {data!r:.300}"
        assert data["request_id"] == _header(headers, "x-request-id"), \
            f"{where}: request_id {data['request_id']!r} != X-Request-ID {_header(headers, 'x-request-id')!r}"
        if status == 401:
            assert _header(headers, "www-authenticate") == "Bearer" or error["code"] != "unauthorized", \
                f"{where}: 401 without WWW-Authenticate: Bearer"


def _header(headers, name: str) -> str:
    value = headers.get(name) or headers.get(name.title()) or ""
    if isinstance(value, list):
        value = value[0] if value else ""
    return value


def _aim(case, target: FuzzTarget) -> None:
    """Point most valid user ids at the target's subject (1 in 4 stays random → 403/404)."""
    op_id = (target.operation(case.operation.path, case.method) or {}).get("operationId")
    if target.kind == "user" and op_id in SELF_DESTRUCTIVE:
        return

    def aimed(value):
        if not isinstance(value, str):
            return value
        try:
            parsed = uuid.UUID(value)
        except ValueError:
            return value
        return str(target.subject) if parsed.int % 4 else value

    for container in (case.query, case.path_parameters):
        if isinstance(container, dict) and "user_id" in container:
            container["user_id"] = aimed(container["user_id"])
    if isinstance(case.body, dict) and "user_id" in case.body:
        case.body["user_id"] = aimed(case.body["user_id"])


lazy_schema = schemathesis.pytest.from_fixture("fuzz_schema")


@lazy_schema.parametrize()
@hypothesis.settings(deadline=None, suppress_health_check=list(hypothesis.HealthCheck),
                     database=None)
def test_fuzz_from_openapi(case, fuzz_target):
    _aim(case, fuzz_target)
    response = case.call(session=fuzz_target.http,
                         headers={"Authorization": f"Bearer {fuzz_target.token}"}, timeout=30)
    phase = getattr(getattr(case, "meta", None), "phase", None)
    fuzz_target.record(getattr(getattr(phase, "name", None), "value", None) or "schemathesis",
                       response.status_code)
    if len(response.request.url or "") > MAX_URL_BYTES and response.status_code == 400 \
            and b"Invalid HTTP request" in response.content:
        # The HTTP server (uvicorn/h11, as behind the Serve proxy) refuses a request line this
        # long before any app code runs; not the app's answer to judge.
        SUMMARY[f"fuzz [{fuzz_target.backend}] {fuzz_target.label} overlong URLs refused by uvicorn"] += 1
        return
    curl = case.as_curl_command(headers={"Authorization": "Bearer $TOKEN"})
    where = (f"{fuzz_target.label}: {case.method} {case.formatted_path[:200]} → {response.status_code}\n"
             f"  reproduce: {curl if len(curl) < 1500 else curl[:1500] + '…'}")
    check_response(fuzz_target, case.method, case.operation.path, response.status_code,
                   response.headers, response.content, where)


# --- hand-made hostile inputs ------------------------------------------------------------

def _routes(target: FuzzTarget):
    from tests.security.support import RouteInfo
    for path, ops in target.spec.get("paths", {}).items():
        for method, op in ops.items():
            yield RouteInfo(target.app, method.upper(), path, op.get("operationId"), op)


def _send(target: FuzzTarget, method: str, url: str, *, params=None, data=None, headers=None,
          json_body=None):
    all_headers = {"Authorization": f"Bearer {target.token}", **(headers or {})}
    if json_body is not None:
        data = json.dumps(json_body).encode()
        all_headers.setdefault("Content-Type", "application/json")
    return target.http.request(method, target.url + url, params=params, data=data,
                               headers=all_headers, timeout=30)


def _check(target: FuzzTarget, route, response, what: str, phase: str,
           expect: tuple[int, ...] = ()) -> None:
    """Record a failed invariant in `target.failures` (reported together at the end)."""
    target.record(phase, response.status_code)
    where = f"{target.label}: {route.method} {route.path} [{what}] → {response.status_code}"
    try:
        check_response(target, route.method, route.path, response.status_code, response.headers,
                       response.content, where)
        if expect:
            assert response.status_code in expect, f"{where}: expected one of {expect}"
    except AssertionError as exc:
        target.failures.append(str(exc).split("\nassert ")[0])


def _report(target: FuzzTarget) -> None:
    assert not target.failures, f"{len(target.failures)} failures:\n" + "\n".join(target.failures)


def _string_slots(walker: SchemaWalker, route) -> tuple[list[str], list[str], list[str]]:
    """Free-text string fields of the JSON body (top level), query and header parameters."""
    def free_text(schema) -> bool:
        schema = walker.resolve(schema)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return any(free_text(o) for o in schema[key])
        return schema.get("type") == "string" and not schema.get("enum") and not schema.get("format")

    op = route.operation or {}
    body = walker.resolve(op.get("requestBody", {}).get("content", {})
                          .get("application/json", {}).get("schema"))
    fields = [k for k, v in body.get("properties", {}).items() if free_text(v)]
    query = [p["name"] for p in op.get("parameters", []) if p["in"] == "query" and free_text(p.get("schema"))]
    headers = [p["name"] for p in op.get("parameters", []) if p["in"] == "header" and free_text(p.get("schema"))]
    return fields, query, headers


def _number_slots(walker: SchemaWalker, route) -> tuple[list[str], list[str]]:
    def numeric(schema) -> bool:
        schema = walker.resolve(schema)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return any(numeric(o) for o in schema[key])
        return schema.get("type") in ("integer", "number")

    op = route.operation or {}
    body = walker.resolve(op.get("requestBody", {}).get("content", {})
                          .get("application/json", {}).get("schema"))
    fields = [k for k, v in body.get("properties", {}).items() if numeric(v)]
    query = [p["name"] for p in op.get("parameters", []) if p["in"] == "query" and numeric(p.get("schema"))]
    return fields, query


ODD_STRINGS = {
    "nul": "nul\x00inside",
    "rtl-override": "\u202egnp.exe\u202c",
    "bidi-marks": "\u200f\u200e\u061c mixed \u05d0\u05d1",
    "zero-width": "\u200b\u200c\u200d\ufeff",
    "emoji": "👩‍👩‍👧‍👦🧬💊 family",
    "combining": "e" + "\u0301" * 200,
    "astral": "\U0001d54a\U0001f600\U000e0001",
    "control": "\x01\x07\x1b[31m\x7f",
}
LONE_SURROGATE = "@@LONE_SURROGATE@@"
# Only what is still valid HTTP (h11 refuses control characters other than tab before the
# app sees them).
HEADER_STRINGS = {"latin-1": "sandbox-é-ÿ", "tab": "sandbox\tx", "spaces": "sandbox token x"}
HUGE_NUMBERS = ["1e309", "-1e309", "1e308", str(2 ** 70), str(-(2 ** 70)), str(2 ** 63),
                "NaN", "Infinity", "-0.0", "1e-400", "123456789012345678901234567890.5"]


def test_oversized_bodies_are_413(service_target):
    target = service_target
    routes = [r for r in _routes(target) if r.method in ("POST", "PUT", "PATCH", "DELETE")]
    routes += [r for r in _routes(target) if r.method == "GET"][:2]
    big = b'{"padding": "' + b"a" * (MIB + 1) + b'"}'
    multipart_head = (b'--sec\r\nContent-Disposition: form-data; name="upload"; filename="a.txt"'
                      b'\r\nContent-Type: text/plain\r\n\r\n')

    def chunks(head: bytes = b""):
        yield head
        for _ in range(17):
            yield b"a" * (64 * 1024)

    for route in routes:
        base = build_request(route, SchemaWalker(target.spec), target.subject)
        url, params = base.url, base.params
        response = _send(target, route.method, url, params=params, data=big,
                         headers={"Content-Type": "application/json"})
        _check(target, route, response, "1 MiB + body", "oversized", expect=(413,))
        # Without Content-Length (chunked) the limit is enforced while the body is read; a
        # route that takes no body never reads it.
        content = (route.operation or {}).get("requestBody", {}).get("content", {})
        if "multipart/form-data" in content:
            response = _send(target, route.method, url, params=params, data=chunks(multipart_head),
                             headers={"Content-Type": "multipart/form-data; boundary=sec"})
        else:
            response = _send(target, route.method, url, params=params, data=chunks(),
                             headers={"Content-Type": "application/json"})
        _check(target, route, response, "chunked 1 MiB + body", "oversized",
               expect=(413,) if content else ())
    _report(target)


def test_odd_unicode_is_refused_or_stored_cleanly(service_target):
    target = service_target
    walker = SchemaWalker(target.spec)
    for route in _routes(target):
        fields, query, headers = _string_slots(walker, route)
        if not (fields or query or headers):
            continue
        base = build_request(route, walker, target.subject)
        for name in fields:
            for label, odd in [*ODD_STRINGS.items(), ("lone-surrogate", LONE_SURROGATE)]:
                body = dict(base.json or {})
                body[name] = odd
                raw = json.dumps(body).replace(LONE_SURROGATE, "\\ud800")
                response = _send(target, route.method, base.url, params=base.params,
                                 data=raw.encode(), headers={"Content-Type": "application/json"})
                _check(target, route, response, f"body.{name}={label}", "unicode")
        for name in query:
            for label, odd in ODD_STRINGS.items():
                response = _send(target, route.method, base.url, params={**base.params, name: odd},
                                 json_body=base.json if base.has_json_body else None)
                _check(target, route, response, f"query.{name}={label}", "unicode")
            # Invalid UTF-8 (an encoded lone surrogate) in the query string.
            sep = "&" if "?" in base.url else "?"
            response = _send(target, route.method, f"{base.url}{sep}{name}=%ED%A0%80%FF",
                             params=base.params, json_body=base.json if base.has_json_body else None)
            _check(target, route, response, f"query.{name}=invalid-utf8", "unicode")
        for name in headers:
            for label, odd in HEADER_STRINGS.items():
                extra = {n: "sandbox-header" for n in headers}
                extra[name] = odd
                response = target.http.request(
                    route.method, target.url + base.url, params=base.params,
                    headers={"Authorization": f"Bearer {target.token}",
                             **{k: v.encode("latin-1") for k, v in extra.items()}},
                    json=base.json if base.has_json_body else None, timeout=30)
                _check(target, route, response, f"header.{name}={label}", "unicode")
    _report(target)


def test_huge_numbers_are_refused_or_handled(service_target):
    target = service_target
    walker = SchemaWalker(target.spec)
    for route in _routes(target):
        fields, query = _number_slots(walker, route)
        if not (fields or query):
            continue
        base = build_request(route, walker, target.subject)
        for name in fields:
            for number in HUGE_NUMBERS:
                body = dict(base.json or {})
                body[name] = LONE_SURROGATE
                raw = json.dumps(body).replace(f'"{LONE_SURROGATE}"', number)
                response = _send(target, route.method, base.url, params=base.params,
                                 data=raw.encode(), headers={"Content-Type": "application/json"})
                _check(target, route, response, f"body.{name}={number}", "numbers")
        for name in query:
            for number in HUGE_NUMBERS + ["inf", "-inf", "nan", "0x10", "1_000"]:
                response = _send(target, route.method, base.url, params={**base.params, name: number},
                                 json_body=base.json if base.has_json_body else None)
                _check(target, route, response, f"query.{name}={number}", "numbers")
    _report(target)


def test_deeply_nested_json_is_refused(service_target):
    target = service_target
    walker = SchemaWalker(target.spec)
    depth = 50_000
    bodies = {
        "nested arrays": "[" * depth + "]" * depth,
        "nested objects": '{"a":' * depth + "1" + "}" * depth,
    }
    for route in _routes(target):
        base = build_request(route, walker, target.subject)
        if not base.has_json_body:
            continue
        first = next(iter(base.json), None) if isinstance(base.json, dict) and base.json else None
        cases = dict(bodies)
        if first is not None:
            body = dict(base.json)
            body[first] = LONE_SURROGATE
            cases[f"nested in {first}"] = json.dumps(body).replace(
                f'"{LONE_SURROGATE}"', "[" * depth + "]" * depth)
        for label, raw in cases.items():
            response = _send(target, route.method, base.url, params=base.params, data=raw.encode(),
                             headers={"Content-Type": "application/json"})
            _check(target, route, response, label, "nesting", expect=(400, 413, 422))
    _report(target)
