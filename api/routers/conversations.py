"""Conversations and turns (SPEC §4.6)."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, status
from pydantic import AfterValidator

from api.deps import CurrentPrincipal, Session
from api.envelope import Envelope, Page
from api.schemas_common import Limit, Model, Offset, Request, TurnContent
from services import conversations

router = APIRouter(tags=["conversations"])


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("content must not be blank")
    return value


Content = Annotated[TurnContent, AfterValidator(_not_blank)]
JSONObject = dict[str, Any]


class StartConversationIn(Request):
    user_id: uuid.UUID
    meta: JSONObject | None = None


class AppendTurnIn(Request):
    conversation_id: uuid.UUID
    role: Literal["user", "assistant", "system"]
    content: Content
    extra_json: JSONObject | None = None
    close_conversation: bool = False


class ConversationRef(Request):
    conversation_id: uuid.UUID


class ConversationOut(Model):
    conversation_id: uuid.UUID
    user_id: uuid.UUID
    started_at: datetime
    closed: bool
    meta: JSONObject | None


class ConversationSummaryOut(ConversationOut):
    turn_count: int


class TurnOut(Model):
    id: uuid.UUID
    conversation_id: uuid.UUID
    seq: int
    role: str
    content: str
    extra_json: JSONObject | None
    created_at: datetime


class AppendedTurnOut(TurnOut):
    conversation_closed: bool


class ConversationDetailOut(ConversationOut):
    turns: list[TurnOut]


def _conversation(c) -> dict[str, Any]:
    return dict(conversation_id=c.id, user_id=c.user_id, started_at=c.started_at, closed=c.closed,
                meta=c.meta)


@router.post("/startConversation", operation_id="startConversation", status_code=status.HTTP_201_CREATED,
             response_model=Envelope[ConversationOut], summary="Start a conversation for a user")
async def start_conversation(body: StartConversationIn, session: Session, principal: CurrentPrincipal):
    principal.ensure_user(body.user_id)
    conversation = await conversations.start_conversation(session, body.user_id, body.meta)
    return Envelope(data=ConversationOut(**_conversation(conversation)))


@router.post("/appendTurn", operation_id="appendTurn", status_code=status.HTTP_201_CREATED,
             response_model=Envelope[AppendedTurnOut],
             summary="Append a turn (409 once the conversation is closed)")
async def append_turn(body: AppendTurnIn, session: Session, principal: CurrentPrincipal):
    conversation = await conversations.owned_conversation(session, principal, body.conversation_id)
    turn = await conversations.append_turn(session, conversation, body.role, body.content,
                                           body.extra_json, close_conversation=body.close_conversation)
    return Envelope(data=AppendedTurnOut(**TurnOut.model_validate(turn).model_dump(),
                                         conversation_closed=conversation.closed))


@router.post("/closeConversation", operation_id="closeConversation",
             response_model=Envelope[ConversationOut], summary="Close a conversation (idempotent)")
async def close_conversation(body: ConversationRef, session: Session, principal: CurrentPrincipal):
    conversation = await conversations.owned_conversation(session, principal, body.conversation_id)
    await conversations.close_conversation(session, conversation)
    return Envelope(data=ConversationOut(**_conversation(conversation)))


@router.get("/listConversations", operation_id="listConversations",
            response_model=Envelope[Page[ConversationSummaryOut]],
            summary="Conversations, newest first (service/admin may omit user_id to list all)")
async def list_conversations(session: Session, principal: CurrentPrincipal,
                             user_id: uuid.UUID | None = None, closed: bool | None = None,
                             limit: Limit = 50, offset: Offset = 0):
    owner = None if (user_id is None and principal.is_privileged) else principal.default_user(user_id)
    rows, total = await conversations.list_conversations(session, user_id=owner, closed=closed,
                                                         limit=limit, offset=offset)
    counts = await conversations.turn_counts(session, [c.id for c in rows])
    items = [ConversationSummaryOut(**_conversation(c), turn_count=counts.get(c.id, 0)) for c in rows]
    return Envelope(data=Page(items=items, total=total, limit=limit, offset=offset))


@router.get("/getConversation", operation_id="getConversation",
            response_model=Envelope[ConversationDetailOut],
            summary="A conversation with its turns, oldest first")
async def get_conversation(conversation_id: uuid.UUID, session: Session, principal: CurrentPrincipal):
    conversation = await conversations.owned_conversation(session, principal, conversation_id)
    turns = await conversations.list_turns(session, conversation.id)
    return Envelope(data=ConversationDetailOut(**_conversation(conversation),
                                               turns=[TurnOut.model_validate(t) for t in turns]))
