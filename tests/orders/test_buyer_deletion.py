"""A buyer deleting their account: refused while their orders are under way, then their
orders stay (the law keeps them) without the address and the words that identify
them."""

from __future__ import annotations

import uuid
from typing import Any

import httpx2
from sqlalchemy import select

from soko.identity.models import Role
from soko.orders.models import CheckoutGroup, Dispute, Order, OrderLine
from soko.platform.runtime import Runtime
from tests.cart.catalog_support import Market
from tests.identity.conftest import MakeUser
from tests.orders.conftest import ORDERS, MakeBuyer, PlaceOrder, ok, pay, refused
from tests.orders.test_disputes import COMPLAINT, open_dispute, resolve

ME = "/api/v1/me"
ADDRESS = {
    "name": "Zawadi Kamau",
    "line1": "Kenyatta Avenue 55",
    "city": "Nairobi",
    "phone": "+254711000222",
    "country": "KE",
}


async def _delete(client: httpx2.AsyncClient, headers: dict[str, str]) -> httpx2.Response:
    return await client.delete(ME, headers=headers)


async def _stored(runtime: Runtime, model: Any, row_id: uuid.UUID) -> Any:
    async with runtime.db.transaction(read_only=True) as session:
        return await session.get(model, row_id, populate_existing=True)


async def test_orders_under_way_hold_the_deletion_until_they_end(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    market: Market,
    make_buyer: MakeBuyer,
) -> None:
    shop = await market.open_shop()
    variant_id = (await shop.list_product(1500, stock=10)).variant_id
    buyer = await make_buyer((variant_id, 2))
    group = await buyer.checkout(shipping_address=ADDRESS)
    group_id, order_id = uuid.UUID(group["id"]), uuid.UUID(group["orders"][0]["id"])

    # Unpaid, it does not hold the account: it would expire.
    assert await pay(runtime, group_id)
    blocked = await _delete(client, buyer.headers)
    refused(blocked, 409, "account-deletion-blocked")
    assert blocked.json()["reasons"] == [
        "1 of your orders is still under way: they must be completed, cancelled or refunded first."
    ]
    assert (await client.get(ME, headers=buyer.headers)).status_code == 200

    ok(await client.post(f"{ORDERS}/{order_id}/cancel", headers=buyer.headers))
    assert (await _delete(client, buyer.headers)).status_code == 204
    await runtime.dispatcher.run_until_idle()

    kept = await _stored(runtime, CheckoutGroup, group_id)
    assert kept.shipping_address == {"erased": True, "country": "KE"}
    order = await _stored(runtime, Order, order_id)
    assert order.status == "cancelled"
    async with runtime.db.transaction(read_only=True) as session:
        lines = (
            await session.scalars(select(OrderLine).where(OrderLine.order_id == order_id))
        ).all()
    assert [line.quantity for line in lines] == [2]


async def test_a_dispute_holds_the_deletion_and_its_words_go_with_the_account(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    place_order: PlaceOrder,
    make_user: MakeUser,
) -> None:
    placed = await place_order("delivered")
    dispute = ok(await open_dispute(client, placed), 201)
    refused(await _delete(client, placed.buyer.headers), 409, "account-deletion-blocked")

    admin = await make_user(Role.admin)
    ok(await resolve(client, dispute["id"], admin.headers, outcome="reject"))
    assert (await _delete(client, placed.buyer.headers)).status_code == 204
    await runtime.dispatcher.run_until_idle()

    stored = await _stored(runtime, Dispute, uuid.UUID(dispute["id"]))
    assert (stored.details, stored.evidence_urls) == ("", [])
    assert stored.reason == COMPLAINT["reason"]
    assert stored.status == "resolved_rejected"
    assert (await _stored(runtime, Order, placed.order_id)).status == "completed"


async def test_the_erasure_runs_once_whatever_the_event_delivery(
    client: httpx2.AsyncClient, runtime: Runtime, place_order: PlaceOrder
) -> None:
    from soko.orders.service import forget_buyer

    placed = await place_order("delivered")
    async with runtime.db.transaction() as session:
        group = await session.get(CheckoutGroup, placed.group_id)
        assert group is not None
        group.shipping_address = dict(ADDRESS)
    async with runtime.db.transaction() as session:
        assert await forget_buyer(session, placed.buyer.user.user_id) == 1
    async with runtime.db.transaction() as session:
        assert await forget_buyer(session, placed.buyer.user.user_id) == 0
    kept = await _stored(runtime, CheckoutGroup, placed.group_id)
    assert kept.shipping_address == {"erased": True, "country": "KE"}
