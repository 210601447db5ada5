"""The dontdie app's routes: a proxy to the Don't Die API (SPEC §5).

Each call uses the caller's linked Don't Die account (a user token: their own; a service or
admin token: the `user_id` it names) or explicit `X-DD-Token` + `X-DD-Client-Id` headers.
Upstream 4xx keep their status, 5xx → 502, timeouts → 504.
"""
from __future__ import annotations

import uuid
from datetime import date
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, status
from pydantic import Field

from api.dd_context import DDRuntimeDep
from api.deps import CurrentPrincipal
from api.envelope import Envelope
from api.schemas_common import Name, Request, Statement
from services import dd_proxy
from services.dd_proxy import DDCaller

router = APIRouter(tags=["dontdie"])

ProtocolStatus = Literal["Draft", "Active", "Paused", "Completed"]


async def _dd_caller(
    principal: CurrentPrincipal, runtime: DDRuntimeDep,
    user_id: Annotated[uuid.UUID | None, Query(
        description="Use this user's linked Don't Die account (user tokens default to their own)")] = None,
    x_dd_token: Annotated[str | None, Header(
        alias="X-DD-Token", max_length=4096,
        description="Explicit Don't Die token (with X-DD-Client-Id) instead of a linked account")] = None,
    x_dd_client_id: Annotated[str | None, Header(alias="X-DD-Client-Id", max_length=200)] = None,
) -> DDCaller:
    return await dd_proxy.resolve_caller(runtime, principal, user_id=user_id, dd_token=x_dd_token,
                                         dd_client_id=x_dd_client_id)


Caller = Annotated[DDCaller, Depends(_dd_caller)]


class ProtocolIn(Request):
    name: Name
    description: Statement | None = None
    goal: Statement | None = None
    category: Name | None = None
    type: Name | None = None
    status: ProtocolStatus = "Draft"


class SectionIn(Request):
    title: Name
    content: Statement | None = None
    order: int | None = Field(None, ge=0, le=10_000)
    status: ProtocolStatus = "Draft"


@router.get("/getAccount", operation_id="getAccount", response_model=Envelope[dict[str, Any]],
            summary="The Don't Die account (its `id` is the Don't Die user id)")
async def get_account(caller: Caller):
    return Envelope(data=await caller.client.get_account())


@router.get("/getDdScore", operation_id="getDdScore", response_model=Envelope[dict[str, Any]],
            summary="Don't Die scores by day: ?date, ?start_date&end_date, or ?date&days "
                    "(the days ending on date); at most 366 days")
async def get_dd_score(caller: Caller,
                       day: Annotated[date | None, Query(alias="date")] = None,
                       start_date: date | None = None, end_date: date | None = None,
                       days: int | None = None):
    dates = dd_proxy.score_dates(day=day, start_date=start_date, end_date=end_date, days=days)
    return Envelope(data=await dd_proxy.get_scores(caller, dates))


@router.get("/getMeasurements", operation_id="getMeasurements",
            response_model=Envelope[list[dict[str, Any]]],
            summary="Readings of the Measurements biomarker category")
async def get_measurements(caller: Caller):
    return Envelope(data=dd_proxy.expect_records(
        await caller.client.get_category_readings("Measurements")))


@router.get("/getCapabilities", operation_id="getCapabilities",
            response_model=Envelope[list[dict[str, Any]]],
            summary="Readings of the Capabilities biomarker category")
async def get_capabilities(caller: Caller):
    return Envelope(data=dd_proxy.expect_records(
        await caller.client.get_category_readings("Capabilities")))


@router.get("/getBiomarkers", operation_id="getBiomarkers",
            response_model=Envelope[list[dict[str, Any]]],
            summary="Readings of the Biomarkers category (lab results)")
async def get_biomarkers(caller: Caller):
    return Envelope(data=dd_proxy.expect_records(
        await caller.client.get_category_readings("Biomarkers")))


@router.get("/getAllBiomarkers", operation_id="getAllBiomarkers",
            response_model=Envelope[dict[str, Any]],
            summary="Every category's readings by name; a failed category is {error, status_code}")
async def get_all_biomarkers(caller: Caller):
    return Envelope(data=await caller.client.get_all_biomarkers())


@router.get("/getUserProtocols", operation_id="getUserProtocols",
            response_model=Envelope[list[dict[str, Any]]],
            summary="The account's protocols, optionally with their sections")
async def get_user_protocols(caller: Caller, include_sections: bool = False):
    uid = await caller.uid()
    return Envelope(data=dd_proxy.expect_records(
        await caller.client.list_protocols(uid, include_sections=include_sections)))


@router.post("/createUserProtocol", operation_id="createUserProtocol",
             status_code=status.HTTP_201_CREATED, response_model=Envelope[dict[str, Any]],
             summary="Create a protocol in Don't Die (status defaults to Draft)")
async def create_user_protocol(body: ProtocolIn, caller: Caller):
    uid = await caller.uid()
    return Envelope(data=dd_proxy.expect_object(
        await caller.client.create_protocol(uid, body.model_dump(exclude_none=True))))


@router.post("/createUserProtocolSection", operation_id="createUserProtocolSection",
             status_code=status.HTTP_201_CREATED, response_model=Envelope[dict[str, Any]],
             summary="Add a section to one of the account's protocols")
async def create_user_protocol_section(
        body: SectionIn, caller: Caller,
        protocol_id: Annotated[str, Query(pattern=r"^[A-Za-z0-9_-]{1,200}$")]):
    uid = await caller.uid()
    return Envelope(data=dd_proxy.expect_object(await caller.client.create_protocol_section(
        uid, protocol_id, body.model_dump(exclude_none=True))))
