"""Fixtures for identity tests: users of any role and their signed-in credentials."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from soko.identity.accounts import create_user
from soko.identity.models import Role
from soko.identity.sessions import DeviceFacts, TokenPair, start_session
from soko.platform.runtime import Runtime

TEST_DEVICE = DeviceFacts(
    user_agent="Mozilla/5.0 (Linux; Android 14) Chrome/130.0", ip="203.0.113.7"
)


@dataclass(frozen=True)
class SignedInUser:
    user_id: uuid.UUID
    email: str
    tokens: TokenPair

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens.access_token}"}


MakeUser = Callable[..., Awaitable[SignedInUser]]


@pytest.fixture
def make_user(runtime: Runtime) -> MakeUser:
    """Create a user with the given roles and a live session (no password)."""

    async def factory(
        *roles: Role | str,
        email: str | None = None,
        password_hash: str | None = None,
        phone: str | None = None,
        email_verified: bool = True,
        phone_verified: bool = True,
    ) -> SignedInUser:
        address = email or f"user-{uuid.uuid4().hex[:10]}@example.com"
        async with runtime.db.transaction() as session:
            user = await create_user(
                session,
                runtime.data_keys,
                now=runtime.clock.now(),
                email=address,
                phone=phone,
                display_name="Test user",
                password_hash=password_hash,
                roles=roles or (Role.customer,),
                email_verified=email_verified,
                phone_verified=phone is not None and phone_verified,
            )
            tokens = await start_session(session, runtime, user, method="test", device=TEST_DEVICE)
        return SignedInUser(user_id=user.id, email=address, tokens=tokens)

    return factory
