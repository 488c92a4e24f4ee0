"""Identity routes: the audit log, read by administrators (mounted under /api/v1/admin)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import AwareDatetime, BaseModel, ConfigDict
from sqlalchemy import select
from starlette.responses import JSONResponse

from soko.identity.models import AuditEvent
from soko.identity.permissions import AUDIT_READ
from soko.platform.auth import Principal, require
from soko.platform.pagination import (
    FieldSelection,
    Keyset,
    Page,
    PageRequestDep,
    field_selection,
    page_response,
)
from soko.platform.runtime import SessionDep

router = APIRouter()


class AuditEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int
    id: uuid.UUID
    occurred_at: dt.datetime
    action: str
    actor_id: uuid.UUID | None
    target_type: str | None
    target_id: str | None
    ip: str | None
    request_id: str | None
    data: dict[str, Any]


# Newest first, which is the chain's order reversed; seq is unique, so it alone orders.
AUDIT_LISTING = Keyset("identity.audit_events", id_column=AuditEvent.seq, id_descending=True)
AuditEventFields = field_selection(AuditEventOut, always=("seq", "id"))


@router.get(
    "/audit-events",
    response_model=Page[AuditEventOut],
    summary="List audit events, newest first",
)
async def list_audit_events(
    session: SessionDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(AuditEventFields)],
    _principal: Annotated[Principal, require(AUDIT_READ)],
    action: Annotated[
        str | None, Query(max_length=64, description="Only events with this action.")
    ] = None,
    actor_id: Annotated[uuid.UUID | None, Query(description="Only events by this actor.")] = None,
    target_type: Annotated[
        str | None, Query(max_length=32, description="Only events on this kind of target.")
    ] = None,
    target_id: Annotated[
        str | None, Query(max_length=64, description="Only events on this target.")
    ] = None,
    since: Annotated[
        AwareDatetime | None,
        Query(description="Only events at or after this time (with a time zone)."),
    ] = None,
    until: Annotated[
        AwareDatetime | None,
        Query(description="Only events before this time (with a time zone)."),
    ] = None,
) -> JSONResponse:
    statement = select(AuditEvent)
    if action is not None:
        statement = statement.where(AuditEvent.action == action)
    if actor_id is not None:
        statement = statement.where(AuditEvent.actor_id == actor_id)
    if target_type is not None:
        statement = statement.where(AuditEvent.target_type == target_type)
    if target_id is not None:
        statement = statement.where(AuditEvent.target_id == target_id)
    if since is not None:
        statement = statement.where(AuditEvent.occurred_at >= since)
    if until is not None:
        statement = statement.where(AuditEvent.occurred_at < until)
    rows, next_cursor = await AUDIT_LISTING.fetch(session, statement, page)
    return page_response([AuditEventOut.model_validate(row) for row in rows], next_cursor, fields)
