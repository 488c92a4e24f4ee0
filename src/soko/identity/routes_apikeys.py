"""The signed-in user's API keys (under ``/api/v1/me/api-keys``): create (the key is
shown once), list, revoke."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import select

from soko.identity.api_keys import create_api_key, revoke_api_key
from soko.identity.audit import record_audit_event
from soko.identity.models import ApiKey
from soko.identity.permissions import ACCOUNT_SELF
from soko.identity.signin import RequestFacts
from soko.platform.auth import Principal, require
from soko.platform.pagination import (
    FieldSelection,
    Keyset,
    Page,
    PageRequestDep,
    SortKey,
    field_selection,
    page_response,
)
from soko.platform.runtime import Runtime, RuntimeDep, SessionDep

router = APIRouter()

Me = Annotated[Principal, require(ACCOUNT_SELF)]

KeyName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: KeyName = Field(description="What the key is for, to tell keys apart")
    permissions: list[str] = Field(
        min_length=1,
        max_length=50,
        description="Permissions the key grants; each must be one of yours",
    )
    expires_at: AwareDatetime | None = Field(
        default=None, description="When the key stops working; never when omitted"
    )


class ApiKeyOut(BaseModel):
    """A key as listed: its public prefix, never the key itself."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    prefix: str
    permissions: list[str]
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The API key. Shown only now: store it, it cannot be read again")


ApiKeyFields = field_selection(ApiKeyOut)


def _own_keys(principal: Principal) -> Keyset:
    # The owner is in the list's name, so a cursor cannot page through another's keys.
    return Keyset(
        f"identity.api_keys:{principal.user_id}",
        SortKey(ApiKey.created_at, descending=True),
        id_column=ApiKey.id,
    )


def _where(request: Request, runtime: Runtime) -> tuple[str, str | None]:
    facts = RequestFacts.of(request, runtime)
    return facts.ip, facts.request_id


@router.post("", status_code=201, response_model=ApiKeyCreated, summary="Create an API key")
async def create_my_api_key(
    principal: Me,
    body: ApiKeyCreate,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
) -> ApiKeyCreated:
    row, key = await create_api_key(
        session,
        principal,
        name=body.name,
        permissions=body.permissions,
        expires_at=body.expires_at,
        now=runtime.clock.now(),
    )
    ip, request_id = _where(request, runtime)
    await record_audit_event(
        session,
        action="api_key.created",
        actor_id=principal.user_id,
        target_type="api_key",
        target_id=str(row.id),
        ip=ip,
        request_id=request_id,
        data={
            "name": row.name,
            "prefix": row.prefix,
            "permissions": list(row.permissions),
            "expires_at": row.expires_at,
        },
        clock=runtime.clock,
    )
    return ApiKeyCreated(**ApiKeyOut.model_validate(row).model_dump(), key=key)


@router.get("", response_model=Page[ApiKeyOut], summary="Your API keys")
async def list_my_api_keys(
    principal: Me,
    session: SessionDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(ApiKeyFields)],
) -> Response:
    rows, next_cursor = await _own_keys(principal).fetch(
        session, select(ApiKey).where(ApiKey.user_id == principal.user_id), page
    )
    return page_response([ApiKeyOut.model_validate(row) for row in rows], next_cursor, fields)


@router.delete("/{key_id}", status_code=204, summary="Revoke an API key")
async def revoke_my_api_key(
    principal: Me,
    key_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
) -> Response:
    key, revoked = await revoke_api_key(session, principal.user_id, key_id, now=runtime.clock.now())
    # Revoking a revoked key is answered the same way, without a second audit event.
    if revoked:
        ip, request_id = _where(request, runtime)
        await record_audit_event(
            session,
            action="api_key.revoked",
            actor_id=principal.user_id,
            target_type="api_key",
            target_id=str(key.id),
            ip=ip,
            request_id=request_id,
            data={"name": key.name, "prefix": key.prefix},
            clock=runtime.clock,
        )
    return Response(status_code=204)
