"""Route discovery and request building for the security suite.

Everything here is generic over whatever routes the apps have: routes come from the app's
route table (so hidden routes such as `/mcp` are covered too), parameters and bodies from the
app's OpenAPI document (which FastAPI derives from the pydantic request models).
"""
from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import Any

from fastapi import FastAPI

# Routes that answer without a token (SPEC §3); everything else must demand one.
PUBLIC_PATHS = frozenset({"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc",
                          "/openapi.json"})
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
USER_ID_NAMES = frozenset({"user_id"})
# Valid values for plain-string fields whose allowed values the schema does not state (the
# server checks them itself). Only consulted when the schema gives no enum/const/example.
FIELD_HINTS = {
    "bucket_code": lambda: "dd_score",  # a checklist bucket that also has Don't Die data
    "dd_token": lambda: f"sandbox-security-{uuid.uuid4().hex}",  # the Don't Die sandbox accepts these
}


@dataclass
class RouteInfo:
    app: str
    method: str
    path: str
    operation_id: str | None
    operation: dict[str, Any] | None  # the OpenAPI operation, None for hidden routes

    @property
    def label(self) -> str:
        return f"{self.app} {self.method} {self.path} ({self.operation_id or '-'})"

    @property
    def public(self) -> bool:
        return self.path in PUBLIC_PATHS


def iter_routes(name: str, app: FastAPI) -> list[RouteInfo]:
    """Every (method, path) the app serves, with its OpenAPI operation when it has one."""
    spec = app.openapi()
    try:  # FastAPI ≥ 0.13x resolves included routers lazily
        from fastapi.routing import iter_route_contexts
        contexts = list(iter_route_contexts(app.routes))
    except ImportError:  # pragma: no cover - older FastAPI keeps a flat route list
        contexts = list(app.routes)
    seen: set[tuple[str, str]] = set()
    found: list[RouteInfo] = []
    for ctx in contexts:
        path = getattr(ctx, "path", None)
        methods = getattr(ctx, "methods", None) or set()
        if not path:
            continue
        for method in sorted(m for m in methods if m in HTTP_METHODS):
            if (method, path) in seen:
                continue
            seen.add((method, path))
            op = spec.get("paths", {}).get(path, {}).get(method.lower())
            found.append(RouteInfo(name, method, path, getattr(ctx, "operation_id", None)
                                   or (op or {}).get("operationId"), op))
    # Anything documented but not found in the route table would be a discovery bug.
    for path, ops in spec.get("paths", {}).items():
        for method in ops:
            assert (method.upper(), path) in seen, f"{name}: {method.upper()} {path} not discovered"
    return found


def assert_error_envelope(response, status: int | None = None, *, where: str = "") -> dict:
    """The SPEC §2 error envelope; returns `error`."""
    prefix = f"{where}: " if where else ""
    if status is not None:
        assert response.status_code == status, f"{prefix}{response.status_code} {response.text[:300]}"
    ctype = response.headers.get("content-type", "")
    assert ctype.startswith("application/json"), f"{prefix}not JSON ({ctype!r}): {response.text[:300]}"
    body = response.json()
    assert isinstance(body, dict) and body.get("status") == "error", f"{prefix}{body!r:.300}"
    error = body.get("error")
    assert isinstance(error, dict) and isinstance(error.get("code"), str) and error["code"], \
        f"{prefix}{body!r:.300}"
    assert isinstance(error.get("message"), str), f"{prefix}{body!r:.300}"
    assert isinstance(body.get("request_id"), str) and body["request_id"], f"{prefix}{body!r:.300}"
    assert response.headers.get("x-request-id") == body["request_id"], \
        f"{prefix}X-Request-ID {response.headers.get('x-request-id')!r} != {body['request_id']!r}"
    return error


# --- building valid requests from the OpenAPI operation ------------------------------------

class SchemaWalker:
    """Fills JSON schemas with plausible valid values: uuids, short strings, numbers in range,
    the first enum member, `now` for datetimes. Fields named `user_id` get the target user."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec

    def resolve(self, schema: dict[str, Any] | None) -> dict[str, Any]:
        schema = schema or {}
        seen = 0
        while "$ref" in schema and seen < 32:
            ref = schema["$ref"]
            assert ref.startswith("#/"), ref
            node: Any = self.spec
            for part in ref[2:].split("/"):
                node = node[part]
            schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
            seen += 1
        return schema

    def mentions_user_id(self, schema: dict[str, Any] | None, depth: int = 0) -> bool:
        schema = self.resolve(schema)
        if depth > 8:
            return False
        if any(name in USER_ID_NAMES for name in schema.get("properties", {})):
            return True
        children = list(schema.get("properties", {}).values())
        children += schema.get("anyOf", []) + schema.get("oneOf", []) + schema.get("allOf", [])
        if isinstance(schema.get("items"), dict):
            children.append(schema["items"])
        return any(self.mentions_user_id(child, depth + 1) for child in children)

    def value(self, schema: dict[str, Any] | None, name: str, user_id: uuid.UUID, *,
              full: bool = False, depth: int = 0) -> Any:
        schema = self.resolve(schema)
        if name in USER_ID_NAMES:
            return str(user_id)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return schema["enum"][0]
        for key in ("example",):
            if key in schema:
                return copy.deepcopy(schema[key])
        if schema.get("examples") and isinstance(schema["examples"], list):
            return copy.deepcopy(schema["examples"][0])
        if "allOf" in schema:
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                merged.update(self.resolve(part))
            return self.value(merged, name, user_id, full=full, depth=depth)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = [self.resolve(o) for o in schema[key]]
                non_null = [o for o in options if o.get("type") != "null"] or options
                return self.value(non_null[0], name, user_id, full=full, depth=depth)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "string")
        if kind is None:
            kind = "object" if "properties" in schema else "string"
        if kind == "string":
            if name in FIELD_HINTS:
                return FIELD_HINTS[name]()
            return self._string(schema, name)
        if kind == "integer":
            return int(self._number(schema, 1))
        if kind == "number":
            return float(self._number(schema, 0.5))
        if kind == "boolean":
            return False
        if kind == "array":
            count = max(int(schema.get("minItems", 0)), 1 if full else 0)
            return [self.value(schema.get("items"), name, user_id, full=full, depth=depth + 1)
                    for _ in range(count)]
        if kind == "object":
            return self.object(schema, user_id, full=full, depth=depth + 1)
        return None

    def object(self, schema: dict[str, Any] | None, user_id: uuid.UUID, *, full: bool = False,
               depth: int = 0) -> dict[str, Any]:
        schema = self.resolve(schema)
        required = set(schema.get("required", []))
        out: dict[str, Any] = {}
        for prop, sub in schema.get("properties", {}).items():
            if prop in required or prop in USER_ID_NAMES or (full and depth < 4):
                out[prop] = self.value(sub, prop, user_id, full=full, depth=depth)
        return out

    @staticmethod
    def _string(schema: dict[str, Any], name: str) -> str:
        fmt = schema.get("format")
        if fmt == "uuid":
            return str(uuid.uuid4())
        if fmt == "date-time":
            return datetime.now(timezone.utc).isoformat()
        if fmt == "date":
            return date.today().isoformat()
        if fmt == "email":
            return "security@example.com"
        if fmt in ("uri", "url"):
            return "https://example.com/"
        lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
        if schema.get("pattern"):
            return _from_pattern(schema["pattern"], lo, hi)
        text = "sec-" + name.replace("_", "-")
        if len(text) < lo:
            text = text + "x" * (lo - len(text))
        if hi is not None:
            text = text[: int(hi)]
        return text

    @staticmethod
    def _number(schema: dict[str, Any], default: float) -> float:
        lo = schema.get("minimum", schema.get("exclusiveMinimum"))
        hi = schema.get("maximum", schema.get("exclusiveMaximum"))
        value = default
        if lo is not None:
            value = max(value, lo + (1 if "exclusiveMinimum" in schema else 0))
        if hi is not None:
            value = min(value, hi - (1 if "exclusiveMaximum" in schema else 0))
        return value


def _from_pattern(pattern: str, lo: int, hi: int | None) -> str:
    """A string matching `pattern` (and the length limits), found with Hypothesis."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    found: list[str] = []
    strategy = st.from_regex(pattern, fullmatch=True).filter(
        lambda s: len(s) >= lo and (hi is None or len(s) <= int(hi)))

    @settings(max_examples=20, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def _collect(value: str) -> None:
        found.append(value)

    _collect()
    return min(found, key=len)


@dataclass
class BuiltRequest:
    method: str
    url: str
    params: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    json: Any = None
    files: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    has_json_body: bool = False

    def send_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"params": self.params, "headers": dict(self.headers)}
        if self.files is not None:
            kw["files"] = self.files
            if self.data:
                kw["data"] = self.data
        elif self.data is not None:
            kw["data"] = self.data
        elif self.has_json_body:
            kw["json"] = self.json
        return kw


def route_user_params(route: RouteInfo, walker: SchemaWalker) -> bool:
    """Does the route take a `user_id` (path, query or anywhere in its JSON/form body)?"""
    op = route.operation or {}
    if any(p.get("name") in USER_ID_NAMES for p in op.get("parameters", [])):
        return True
    for content in op.get("requestBody", {}).get("content", {}).values():
        if walker.mentions_user_id(content.get("schema")):
            return True
    return False


def build_request(route: RouteInfo, walker: SchemaWalker, user_id: uuid.UUID, *,
                  full: bool = False) -> BuiltRequest:
    """A syntactically (and, as far as the schema says, semantically) valid request."""
    op = route.operation
    path = route.path
    req = BuiltRequest(route.method, path)
    if op is None:  # hidden route (e.g. /mcp): no schema to go by
        for segment in [s for s in path.split("/") if s.startswith("{")]:
            path = path.replace(segment, str(uuid.uuid4()))
        req.url = path
        if route.method in ("POST", "PUT", "PATCH"):
            req.json, req.has_json_body = {}, True
        return req
    body_schemas = [c.get("schema") for c in op.get("requestBody", {}).get("content", {}).values()]
    body_names_user = any(walker.mentions_user_id(s) for s in body_schemas)
    for param in op.get("parameters", []):
        where, name = param.get("in"), param["name"]
        # Optional query parameters stay out when there is a body (some routes take the same
        # fields either way, not both); a user id goes where the route takes it.
        wanted = param.get("required", False) or (
            not body_schemas and (name in USER_ID_NAMES or (full and where == "query"))) or (
            name in USER_ID_NAMES and not body_names_user)
        if where == "path":
            path = path.replace("{" + name + "}", str(walker.value(param.get("schema"), name, user_id)))
        elif where == "query" and wanted:
            value = walker.value(param.get("schema"), name, user_id, full=full)
            req.params[name] = str(value).lower() if isinstance(value, bool) else value
        elif where == "header" and param.get("required", False):
            req.headers[name] = str(walker.value(param.get("schema"), name, user_id))
    req.url = path
    body = op.get("requestBody")
    if body:
        content = body.get("content", {})
        if "application/json" in content:
            req.json = walker.value(content["application/json"].get("schema"), "body", user_id,
                                    full=full)
            req.has_json_body = True
        elif "multipart/form-data" in content:
            schema = walker.resolve(content["multipart/form-data"].get("schema"))
            files, data = {}, {}
            for prop, sub in schema.get("properties", {}).items():
                sub = walker.resolve(sub)
                if sub.get("format") == "binary" or sub.get("contentMediaType"):
                    files[prop] = ("security.txt", b"security suite upload\n", "text/plain")
                elif prop in schema.get("required", []) or prop in USER_ID_NAMES:
                    data[prop] = str(walker.value(sub, prop, user_id))
            req.files, req.data = files, data
        elif "application/x-www-form-urlencoded" in content:
            req.data = walker.object(content["application/x-www-form-urlencoded"].get("schema"),
                                     user_id, full=full)
        else:  # some other media type: send the route something it can parse as JSON
            req.json, req.has_json_body = {}, True
    return req
