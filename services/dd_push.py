"""Creating a generated protocol in the user's own Don't Die account (SPEC §4.5, push_to_dontdie).

    from api.dd_context import dd_runtime
    pushed = await dd_push.push_protocol(session, dd_runtime(ctx), user_id, protocol["dd_protocol"])
    pushed["protocol_id"]  # the upstream id

No linked account → 409; upstream failures keep their mapping (4xx pass through, 5xx → 502,
timeout → 504).
"""
from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from core.errors import AppError, UpstreamError, ValidationFailed
from services import dd_link
from services.dd_runtime import DDRuntime

PROTOCOL_FIELDS = ("name", "description", "goal", "category", "type", "status")
SECTION_FIELDS = ("title", "content", "order", "status")


def _pick(source: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {k: source[k] for k in fields if source.get(k) not in (None, "")}


async def push_protocol(session: AsyncSession, runtime: DDRuntime, user_id: uuid.UUID,
                        dd_protocol: dict[str, Any]) -> dict[str, Any]:
    """Create `dd_protocol` ({name, description?, goal?, category?, type?, status?, sections?})
    upstream as a Draft unless a status is given; returns `{protocol_id, protocol, sections,
    section_errors}`. A section that fails does not undo the protocol: it is reported."""
    body = _pick(dd_protocol, PROTOCOL_FIELDS)
    if not isinstance(body.get("name"), str) or not body["name"].strip():
        raise ValidationFailed("A Don't Die protocol needs a name",
                               details=[{"loc": ["dd_protocol", "name"], "msg": "field required"}])
    account = await dd_link.load_linked_account(session, runtime.settings, user_id)
    client = runtime.client(account.token, account.client_id)
    created = await client.create_protocol(account.dontdie_uid, body)
    protocol_id = created.get("id") if isinstance(created, dict) else None
    if not protocol_id:
        raise UpstreamError("Don't Die created the protocol but returned no id")
    sections, section_errors = [], []
    for index, section in enumerate(dd_protocol.get("sections") or []):
        if not isinstance(section, dict):
            continue
        try:
            sections.append(await client.create_protocol_section(
                account.dontdie_uid, str(protocol_id), {"order": index, **_pick(section, SECTION_FIELDS)}))
        except AppError as exc:
            section_errors.append({"index": index, "error": exc.message,
                                   "status_code": exc.status_code})
    return {"protocol_id": str(protocol_id), "dontdie_uid": account.dontdie_uid,
            "protocol": created, "sections": sections, "section_errors": section_errors}
