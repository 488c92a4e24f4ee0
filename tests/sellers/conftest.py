"""Fixtures for the sellers tests: users of any role, and stores applied for and
reviewed over HTTP."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest
from sqlalchemy import select

from soko.identity.models import Role
from soko.platform.outbox import OutboxMessage
from soko.platform.runtime import Runtime
from tests.identity.conftest import MakeUser, SignedInUser, make_user  # noqa: F401

SELLERS = "/api/v1/sellers"
ADMIN_SELLERS = "/api/v1/admin/sellers"
PROFILE = "/api/v1/seller/profile"
MEMBERS = "/api/v1/seller/members"
INVITATIONS = "/api/v1/seller/invitations"
MY_INVITATIONS = "/api/v1/me/store-invitations"
MY_STORES = "/api/v1/me/sellers"

_numbers = itertools.count(1)


def problem_type(response: httpx2.Response) -> str:
    if response.headers.get("content-type", "").startswith("application/problem+json"):
        return str(response.json().get("type", "")).removeprefix("/problems/")
    return ""


def as_store(user: SignedInUser, seller_id: uuid.UUID | str) -> dict[str, str]:
    """``user``'s headers, acting for store ``seller_id``."""
    return {**user.headers, "X-Seller-Id": str(seller_id)}


async def join_store(
    client: httpx2.AsyncClient,
    owner_headers: dict[str, str],
    member: SignedInUser,
    role: str = "staff",
) -> dict[str, Any]:
    """The way a person joins a store: an owner (``owner_headers``, acting for the
    store) invites ``member``'s verified email address, and ``member`` accepts."""
    invited = await client.post(
        INVITATIONS, json={"address": member.email, "role": role}, headers=owner_headers
    )
    assert invited.status_code == 201, invited.text
    accepted = await client.post(
        f"{MY_INVITATIONS}/{invited.json()['id']}/accept", headers=member.headers
    )
    assert accepted.status_code == 201, accepted.text
    joined: dict[str, Any] = accepted.json()
    return joined


@dataclass
class Stores:
    """Applies for stores and reviews them through the API."""

    client: httpx2.AsyncClient
    make_user: MakeUser
    _admin: SignedInUser | None = None

    async def admin(self) -> SignedInUser:
        if self._admin is None:
            self._admin = await self.make_user(Role.admin)
        return self._admin

    async def apply(
        self, owner: SignedInUser, slug: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        number = next(_numbers)
        body = {
            "slug": slug or f"store-{number}-{uuid.uuid4().hex[:6]}",
            "store_name": f"Store {number}",
        }
        body.update(fields)
        response = await self.client.post(SELLERS, json=body, headers=owner.headers)
        assert response.status_code == 201, response.text
        data: dict[str, Any] = response.json()
        return data

    async def decide(self, seller_id: Any, action: str, reason: str = "") -> httpx2.Response:
        body = {"reason": reason or f"{action} in a test"}
        return await self.client.post(
            f"{ADMIN_SELLERS}/{seller_id}/{action}", json=body, headers=(await self.admin()).headers
        )

    async def active(self, owner: SignedInUser, **fields: Any) -> dict[str, Any]:
        """A store of ``owner``'s, applied for and approved."""
        store = await self.apply(owner, **fields)
        response = await self.decide(store["id"], "approve")
        assert response.status_code == 200, response.text
        store["status"] = "active"
        return store


@pytest.fixture
def stores(client: httpx2.AsyncClient, make_user: MakeUser) -> Stores:  # noqa: F811
    return Stores(client, make_user)


OutboxReader = Callable[[str], Awaitable[list[dict[str, Any]]]]


@pytest.fixture
def published(runtime: Runtime) -> OutboxReader:
    """The payloads of the events named ``name`` in the outbox, oldest first."""

    async def read(name: str) -> list[dict[str, Any]]:
        async with runtime.db.transaction(read_only=True) as session:
            rows = await session.scalars(
                select(OutboxMessage)
                .where(OutboxMessage.name == name, OutboxMessage.handler.is_(None))
                .order_by(OutboxMessage.created_at, OutboxMessage.id)
            )
            return [dict(row.payload) for row in rows]

    return read
