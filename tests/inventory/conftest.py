"""Fixtures for the inventory route tests: stores with members of each role."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import httpx2
import pytest

from soko.identity.models import Role
from soko.inventory import public
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime
from tests.identity.conftest import MakeUser, SignedInUser, make_user  # noqa: F401
from tests.sellers.conftest import Stores, as_store, join_store, stores  # noqa: F401


@dataclass(frozen=True)
class Team:
    """A store, its members by role, and a variant the catalog registered for it."""

    seller_id: uuid.UUID
    owner: SignedInUser
    manager: SignedInUser
    staff: SignedInUser
    variant_id: uuid.UUID

    def headers(self, member: SignedInUser) -> dict[str, str]:
        return as_store(member, self.seller_id)


async def make_team(
    client: httpx2.AsyncClient,
    stores: Stores,  # noqa: F811
    make_user: MakeUser,  # noqa: F811
    runtime: Runtime,
) -> Team:
    owner = await make_user(Role.customer)
    store = await stores.active(owner)
    seller_id = uuid.UUID(store["id"])
    members = {}
    for role in ("manager", "staff"):
        member = await make_user(Role.customer)
        await join_store(client, as_store(owner, seller_id), member, role)
        members[role] = member
    variant_id = uuid7()
    async with runtime.db.transaction() as session:
        await public.register_item(session, variant_id=variant_id, seller_id=seller_id, sku="TEE-M")
    return Team(seller_id, owner, members["manager"], members["staff"], variant_id)


@pytest.fixture
async def team(
    client: httpx2.AsyncClient,
    stores: Stores,  # noqa: F811
    make_user: MakeUser,  # noqa: F811
    runtime: Runtime,
) -> Team:
    return await make_team(client, stores, make_user, runtime)
