"""Helpers for the API key, administration and login-method tests."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx2
from sqlalchemy import select

from soko.identity.accounts import create_user
from soko.identity.models import AuditEvent, Role
from soko.platform.runtime import Runtime

API_KEYS = "/api/v1/me/api-keys"
ADMIN = "/api/v1/admin"
LOGIN_METHODS = f"{ADMIN}/login-methods"
HOUR_SECONDS = 3600.0


def problem_type(response: httpx2.Response) -> str:
    """The problem's slug (``/problems/<slug>``), or "" for an answer that is not one."""
    if response.headers.get("content-type", "").startswith("application/problem+json"):
        return str(response.json().get("type", "")).removeprefix("/problems/")
    return ""


def key_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def audit_events(
    runtime: Runtime, action: str | None = None, target_id: Any = None
) -> list[AuditEvent]:
    async with runtime.db.transaction(read_only=True) as session:
        statement = select(AuditEvent).order_by(AuditEvent.seq)
        if action is not None:
            statement = statement.where(AuditEvent.action == action)
        if target_id is not None:
            statement = statement.where(AuditEvent.target_id == str(target_id))
        return list((await session.scalars(statement)).all())


async def add_user(
    runtime: Runtime,
    *,
    email: str | None = None,
    phone: str | None = None,
    roles: tuple[Role, ...] = (Role.customer,),
    display_name: str = "Baraka Otieno",
) -> uuid.UUID:
    """A user with no session (someone an admin looks up)."""
    async with runtime.db.transaction() as session:
        user = await create_user(
            session,
            runtime.data_keys,
            now=runtime.clock.now(),
            email=email,
            phone=phone,
            display_name=display_name,
            roles=roles,
            email_verified=email is not None,
        )
        return user.id


async def create_key(
    client: httpx2.AsyncClient,
    headers: dict[str, str],
    permissions: list[str],
    *,
    name: str = "inventory sync",
    **extra: Any,
) -> dict[str, Any]:
    response = await client.post(
        API_KEYS, headers=headers, json={"name": name, "permissions": permissions, **extra}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def answered_soon(
    process: httpx2.AsyncClient, path: str, headers: dict[str, str], expected: int
) -> int:
    """The status ``process`` answers ``path`` with, asked again until it is
    ``expected`` or ten seconds have passed. Another process hears an invalidation when
    Redis delivers it on the cache's channel and its listener reads it (ADR 0013):
    within milliseconds, but not before its event loop next looks at that socket, which
    in a test sharing one loop with both processes can come after the next request, and
    on a loaded machine after a good many. A process asked this way must keep its near
    copies for longer than the wait (``near_seconds``), or one expiring on its own would
    hide an invalidation never heard."""
    deadline = asyncio.get_running_loop().time() + 10.0
    while True:
        status = (await process.get(path, headers=headers)).status_code
        if status == expected or asyncio.get_running_loop().time() > deadline:
            return status
        await asyncio.sleep(0.005)
