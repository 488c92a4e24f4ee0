"""A store member deleting their account: refused while they alone own an active store,
then their memberships end, and a store left with nobody loses the contact and payout
details that were theirs."""

from __future__ import annotations

import uuid

import httpx2
from sqlalchemy import select

from soko.platform.runtime import Runtime
from soko.sellers.models import Seller, SellerMember
from tests.identity.conftest import MakeUser
from tests.sellers.conftest import MEMBERS, Stores, join_store, problem_type

ME = "/api/v1/me"


async def _members(runtime: Runtime, seller_id: str) -> dict[uuid.UUID, str]:
    async with runtime.db.transaction(read_only=True) as session:
        rows = await session.execute(
            select(SellerMember.user_id, SellerMember.role).where(
                SellerMember.seller_id == uuid.UUID(seller_id)
            )
        )
        return {user_id: role for user_id, role in rows.all()}


async def test_the_only_owner_of_an_active_store_must_hand_it_over_first(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser, stores: Stores
) -> None:
    owner, manager = await make_user(), await make_user()
    store = await stores.active(owner, store_name="Mama Mboga")
    await join_store(client, owner.headers, manager, "manager")

    blocked = await client.delete(ME, headers=owner.headers)
    assert (blocked.status_code, problem_type(blocked)) == (409, "account-deletion-blocked")
    assert blocked.json()["reasons"] == [
        "You are the only owner of the active store 'Mama Mboga': make another member an "
        "owner first, or ask the marketplace to suspend it."
    ]

    promoted = await client.patch(
        f"{MEMBERS}/{manager.user_id}", json={"role": "owner"}, headers=owner.headers
    )
    assert promoted.status_code == 200
    assert (await client.delete(ME, headers=owner.headers)).status_code == 204
    await runtime.dispatcher.run_until_idle()
    assert await _members(runtime, store["id"]) == {manager.user_id: "owner"}
    async with runtime.db.transaction(read_only=True) as session:
        seller = await session.get(Seller, uuid.UUID(store["id"]))
        assert seller is not None and seller.contact_email == store["contact_email"]


async def test_a_store_left_with_nobody_keeps_no_contact_or_payout_details(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser, stores: Stores
) -> None:
    owner = await make_user()
    pending = await stores.apply(
        owner,
        contact_email="orders@mamamboga.co.ke",
        contact_phone="+254712345678",
        payout_details={"method": "mpesa", "till": "123456"},
    )
    assert (await client.delete(ME, headers=owner.headers)).status_code == 204
    await runtime.dispatcher.run_until_idle()

    assert await _members(runtime, pending["id"]) == {}
    async with runtime.db.transaction(read_only=True) as session:
        seller = await session.get(Seller, uuid.UUID(pending["id"]))
    assert seller is not None
    assert (seller.contact_email, seller.contact_phone, seller.payout_details_ciphertext) == (
        None,
        None,
        None,
    )
    assert seller.store_name == pending["store_name"]
    assert seller.version == pending["version"] + 1
