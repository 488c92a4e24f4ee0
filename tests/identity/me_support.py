"""Accounts and signed-in sessions for the account (``/api/v1/me``) tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx2
from sqlalchemy import select

from soko.identity.accounts import create_user
from soko.identity.models import AuditEvent, Role
from soko.identity.passwords import password_hasher
from soko.identity.sessions import DeviceFacts, TokenPair, start_session
from soko.platform.runtime import Runtime

ANDROID_CHROME = (
    "Mozilla/5.0 (Linux; Android 13; TECNO KI5k) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.0.0 Mobile Safari/537.36"
)
IPHONE_SAFARI = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)
PASSWORD = "mango-season-in-kisumu"


@dataclass(frozen=True)
class Account:
    user_id: uuid.UUID
    email: str | None
    phone: str | None
    password: str | None
    pair: TokenPair

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.pair)


def bearer(pair: TokenPair) -> dict[str, str]:
    return {"Authorization": f"Bearer {pair.access_token}"}


async def make_account(
    runtime: Runtime,
    *,
    email: str | None = None,
    phone: str | None = None,
    password: str | None = PASSWORD,
    display_name: str = "Amina Njeri",
    roles: Iterable[Role] = (Role.customer,),
    user_agent: str = ANDROID_CHROME,
    ip: str = "197.248.10.20",
    method: str = "password",
) -> Account:
    """A user (email ``<random>@example.com`` unless given) signed in on one device."""
    if email is None and phone is None:
        email = f"amina.{uuid.uuid4().hex[:8]}@example.com"
    password_hash = await password_hasher(runtime).hash(password) if password else None
    async with runtime.db.transaction() as session:
        user = await create_user(
            session,
            runtime.data_keys,
            now=runtime.clock.now(),
            email=email,
            phone=phone,
            display_name=display_name,
            password_hash=password_hash,
            roles=roles,
            email_verified=email is not None,
            phone_verified=phone is not None,
        )
        pair = await start_session(
            session, runtime, user, method=method, device=DeviceFacts(user_agent, ip)
        )
    return Account(user.id, email, phone, password, pair)


async def sign_in_again(
    runtime: Runtime,
    user_id: uuid.UUID,
    *,
    user_agent: str = IPHONE_SAFARI,
    ip: str = "41.90.64.7",
    method: str = "password",
) -> TokenPair:
    """Another session (another device) for an existing user."""
    from soko.identity.models import User

    async with runtime.db.transaction() as session:
        user = await session.get(User, user_id)
        assert user is not None
        return await start_session(
            session, runtime, user, method=method, device=DeviceFacts(user_agent, ip)
        )


async def refresh_refused(client: httpx2.AsyncClient, refresh_token: str) -> bool:
    """Whether ``POST /api/v1/auth/refresh`` refuses ``refresh_token`` (401); a token it
    accepts is rotated, so do not present it again."""
    response = await client.post("/api/v1/auth/refresh", json={"refresh_token": refresh_token})
    assert response.status_code in (200, 401), response.text
    return response.status_code == 401


async def audit_events(runtime: Runtime, action: str) -> list[dict[str, Any]]:
    async with runtime.db.transaction(read_only=True) as session:
        rows = (
            await session.scalars(
                select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)
            )
        ).all()
        return [
            {
                "actor_id": row.actor_id,
                "target_type": row.target_type,
                "target_id": row.target_id,
                "ip": row.ip,
                "request_id": row.request_id,
                "data": row.data,
            }
            for row in rows
        ]
