"""``orders.public.pay_group``: what confirmed money does to a checkout group, on time, a
second time, too late with the stock still there or sold, for a cancelled group, and
while the expiry job or another delivery of the payment runs at the same moment."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import httpx2
from sqlalchemy import select

from soko.orders import service
from soko.orders.models import CheckoutGroup, Order, OrderTransition
from soko.orders.public import (
    PAID_LATE,
    GroupOrder,
    PayOutcome,
    group_for_payment,
    pay_group,
)
from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from tests.cart.catalog_support import Market
from tests.conftest import sql_statements
from tests.orders.conftest import (
    CHECKOUT,
    ORDERS,
    SELLER_ORDERS,
    MakeBuyer,
    Placed,
    PlaceOrder,
    available,
    events,
    ok,
    refused,
    sign_in_again,
    stock,
)


def new_day(market: Market) -> None:
    """A new administrator opens the next stores: the clock moved past the last one's
    access token."""
    market._admin = None


async def pay(runtime: Runtime, group_id: uuid.UUID) -> PayOutcome:
    async with runtime.db.transaction() as session:
        return await pay_group(session, runtime, group_id)


async def expire(runtime: Runtime) -> int:
    async with runtime.db.transaction() as session:
        return await service.expire_unpaid(session, runtime)


async def statuses(runtime: Runtime, group_id: uuid.UUID) -> tuple[str, list[str]]:
    """The group's status and its orders' (by order id)."""
    async with runtime.db.transaction(read_only=True) as session:
        group = await session.scalar(
            select(CheckoutGroup.status).where(CheckoutGroup.id == group_id)
        )
        orders = await session.scalars(
            select(Order.status).where(Order.group_id == group_id).order_by(Order.id)
        )
        return str(group), list(orders.all())


async def moves(runtime: Runtime, order_id: uuid.UUID) -> list[tuple[str, str, str, str]]:
    async with runtime.db.transaction(read_only=True) as session:
        rows = await session.execute(
            select(
                OrderTransition.from_status,
                OrderTransition.to_status,
                OrderTransition.actor_kind,
                OrderTransition.reason,
            )
            .where(OrderTransition.order_id == order_id)
            .order_by(OrderTransition.at, OrderTransition.id)
        )
        return [tuple(row) for row in rows.all()]  # type: ignore[misc]


def hold(runtime: Runtime) -> dt.timedelta:
    return dt.timedelta(seconds=runtime.settings.reservation_hold_seconds)


async def paid_events(runtime: Runtime, group_id: uuid.UUID) -> list[dict[str, Any]]:
    return [e for e in await events(runtime, "order.paid") if e["group_id"] == str(group_id)]


async def test_group_for_payment_lists_every_order_in_one_query(
    client: httpx2.AsyncClient, runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    first, second = await market.open_shop(), await market.open_shop()
    one = (await first.list_product(1000)).variant_id
    two = (await second.list_product(500)).variant_id
    buyer = await make_buyer((one, 2), (two, 1))
    group = await buyer.checkout()
    group_id = uuid.UUID(group["id"])
    by_seller = {o["seller_id"]: o["id"] for o in group["orders"]}
    ok(
        await client.post(
            f"{SELLER_ORDERS}/{by_seller[str(second.seller_id)]}/cancel", headers=second.headers
        )
    )

    async with runtime.db.transaction(read_only=True) as session:
        with sql_statements(runtime) as sent:
            found = await group_for_payment(session, group_id)
    assert len([s for s in sent if s.lstrip().upper().startswith("SELECT")]) == 1
    assert found is not None
    assert (found.status, found.total_minor) == ("pending_payment", 2000)
    assert (found.buyer_id, found.currency) == (buyer.user_id, group["total"]["currency"])
    expected = sorted(
        [
            GroupOrder(
                uuid.UUID(by_seller[str(first.seller_id)]), first.seller_id, "pending_payment", 2000
            ),
            GroupOrder(
                uuid.UUID(by_seller[str(second.seller_id)]), second.seller_id, "cancelled", 500
            ),
        ],
        key=lambda o: o.order_id,
    )
    assert list(found.orders) == expected
    assert found.order_ids == tuple(o.order_id for o in expected)
    async with runtime.db.transaction(read_only=True) as session:
        assert await group_for_payment(session, uuid.uuid4()) is None


async def test_paid_on_time_then_already_paid(
    client: httpx2.AsyncClient, runtime: Runtime, place_order: PlaceOrder
) -> None:
    placed = await place_order("pending_payment", quantity=2, stock=5)

    assert await pay(runtime, placed.group_id) is PayOutcome.paid

    assert await statuses(runtime, placed.group_id) == ("paid", ["paid"])
    assert await stock(client, placed.shop, placed.variant_id) == {
        "on_hand": 5,
        "reserved": 0,
        "allocated": 2,
        "available": 3,
    }
    assert (await moves(runtime, placed.order_id))[-1] == (
        "pending_payment",
        "paid",
        "system",
        "",
    )
    [paid] = await paid_events(runtime, placed.group_id)
    assert (paid["from_status"], paid["actor_kind"]) == ("pending_payment", "system")

    # A second delivery of the payment, or a second payment: nothing more happens.
    assert await pay(runtime, placed.group_id) is PayOutcome.already_paid
    assert len(await paid_events(runtime, placed.group_id)) == 1
    assert (await stock(client, placed.shop, placed.variant_id))["allocated"] == 2


async def test_a_cancelled_group_is_not_payable(
    client: httpx2.AsyncClient, runtime: Runtime, place_order: PlaceOrder
) -> None:
    placed = await place_order("pending_payment", quantity=2, stock=5)
    ok(
        await client.post(
            f"{ORDERS}/{placed.order_id}/cancel",
            json={"reason": "changed my mind"},
            headers=placed.buyer.headers,
        )
    )

    assert await pay(runtime, placed.group_id) is PayOutcome.not_payable
    assert await pay(runtime, uuid.uuid4()) is PayOutcome.not_payable

    assert await statuses(runtime, placed.group_id) == ("cancelled", ["cancelled"])
    assert await paid_events(runtime, placed.group_id) == []
    assert await stock(client, placed.shop, placed.variant_id) == {
        "on_hand": 5,
        "reserved": 0,
        "allocated": 0,
        "available": 5,
    }


async def test_paid_after_the_hold_ran_out_before_the_expiry_job(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    place_order: PlaceOrder,
) -> None:
    placed = await place_order("pending_payment", quantity=2, stock=5)
    clock.advance(hold(runtime) + dt.timedelta(seconds=1))
    await placed.sign_in_again(runtime)

    assert await pay(runtime, placed.group_id) is PayOutcome.paid

    assert await statuses(runtime, placed.group_id) == ("paid", ["paid"])
    assert (await moves(runtime, placed.order_id))[-1] == (
        "pending_payment",
        "paid",
        "system",
        PAID_LATE,
    )
    assert await stock(client, placed.shop, placed.variant_id) == {
        "on_hand": 5,
        "reserved": 0,
        "allocated": 2,
        "available": 3,
    }
    # The expiry job has nothing left to do.
    assert await expire(runtime) == 0
    assert await statuses(runtime, placed.group_id) == ("paid", ["paid"])


async def test_paid_after_the_expiry_job_holds_the_stock_again_without_overselling(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    market: Market,
    make_buyer: MakeBuyer,
) -> None:
    first, second = await market.open_shop(), await market.open_shop()
    one = (await first.list_product(1000, stock=3)).variant_id
    two = (await second.list_product(500, stock=4)).variant_id
    buyer = await make_buyer((one, 2), (two, 1))
    group = await buyer.checkout()
    group_id = uuid.UUID(group["id"])
    by_seller = {o["seller_id"]: uuid.UUID(o["id"]) for o in group["orders"]}
    kept, dropped = by_seller[str(first.seller_id)], by_seller[str(second.seller_id)]
    # One order is cancelled before payment: its stock goes back and must stay on sale.
    ok(await client.post(f"{SELLER_ORDERS}/{dropped}/cancel", headers=second.headers))

    clock.advance(hold(runtime) + dt.timedelta(seconds=1))
    assert await expire(runtime) == 1
    assert await available(runtime, one, two) == {one: 3, two: 4}
    # Another buyer takes one unit meanwhile: two are left, exactly what the group needs.
    other = await make_buyer((one, 1))
    await other.checkout()
    assert await available(runtime, one) == {one: 2}

    assert await pay(runtime, group_id) is PayOutcome.paid

    group_status, order_statuses = await statuses(runtime, group_id)
    assert group_status == "paid"
    assert sorted(order_statuses) == ["cancelled", "paid"]
    assert (await moves(runtime, kept))[-2:] == [
        ("pending_payment", "expired", "system", "not paid in time"),
        ("expired", "paid", "system", PAID_LATE),
    ]
    [paid] = await paid_events(runtime, group_id)
    assert (paid["order_id"], paid["from_status"], paid["reason"]) == (
        str(kept),
        "expired",
        PAID_LATE,
    )
    first.owner = await sign_in_again(runtime, first.owner)
    second.owner = await sign_in_again(runtime, second.owner)
    # The group's two units are allocated, the other buyer's one still held: sold out.
    assert await stock(client, first, one) == {
        "on_hand": 3,
        "reserved": 1,
        "allocated": 2,
        "available": 0,
    }
    # The cancelled order's stock was not taken again.
    assert await stock(client, second, two) == {
        "on_hand": 4,
        "reserved": 0,
        "allocated": 0,
        "available": 4,
    }
    late = await make_buyer((one, 1))
    refused(await late.post_checkout(), 409, "out-of-stock")

    # Paid once: a second delivery changes nothing.
    assert await pay(runtime, group_id) is PayOutcome.already_paid
    assert (await stock(client, first, one))["allocated"] == 2


async def _stock_gone(
    client: httpx2.AsyncClient, runtime: Runtime, placed: Placed, state: str
) -> None:
    moved_before = await moves(runtime, placed.order_id)

    assert await pay(runtime, placed.group_id) is PayOutcome.stock_gone

    assert await statuses(runtime, placed.group_id) == (state, [state])
    assert await moves(runtime, placed.order_id) == moved_before
    assert await paid_events(runtime, placed.group_id) == []
    # The other buyer's two units are held; the group holds nothing.
    assert await stock(client, placed.shop, placed.variant_id) == {
        "on_hand": 3,
        "reserved": 2,
        "allocated": 0,
        "available": 1,
    }
    group = ok(await client.get(f"{CHECKOUT}/{placed.group_id}", headers=placed.buyer.headers))
    assert (group["status"], group["paid_at"]) == (state, None)


async def test_stock_sold_before_the_expiry_job_is_stock_gone_and_changes_nothing(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    place_order: PlaceOrder,
    make_buyer: MakeBuyer,
) -> None:
    placed = await place_order("pending_payment", quantity=2, stock=3)
    clock.advance(hold(runtime) + dt.timedelta(seconds=1))
    await placed.sign_in_again(runtime)
    # Another buyer's checkout releases the lapsed hold on its way and takes the stock.
    other = await make_buyer((placed.variant_id, 2))
    await other.checkout()

    await _stock_gone(client, runtime, placed, "pending_payment")

    # The unpaid group still expires as usual afterwards.
    assert await expire(runtime) == 1
    assert await statuses(runtime, placed.group_id) == ("expired", ["expired"])


async def test_stock_sold_after_the_expiry_job_is_stock_gone_and_changes_nothing(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    place_order: PlaceOrder,
    make_buyer: MakeBuyer,
) -> None:
    placed = await place_order("pending_payment", quantity=2, stock=3)
    clock.advance(hold(runtime) + dt.timedelta(seconds=1))
    await placed.sign_in_again(runtime)
    assert await expire(runtime) == 1
    other = await make_buyer((placed.variant_id, 2))
    await other.checkout()

    await _stock_gone(client, runtime, placed, "expired")


async def test_a_payment_racing_the_expiry_job_applies_once(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    place_order: PlaceOrder,
    market: Market,
) -> None:
    """Whichever runs first, the payment pays the group exactly once and the stock ends
    allocated once. Several rounds, so both orders of arrival occur."""
    for _ in range(4):
        new_day(market)
        placed = await place_order("pending_payment", quantity=2, stock=5)
        clock.advance(hold(runtime) + dt.timedelta(seconds=1))
        await placed.sign_in_again(runtime)

        outcome, expired = await asyncio.gather(pay(runtime, placed.group_id), expire(runtime))

        assert outcome is PayOutcome.paid
        assert expired in (0, 1)
        assert await statuses(runtime, placed.group_id) == ("paid", ["paid"])
        path = [(m[0], m[1]) for m in await moves(runtime, placed.order_id)]
        assert path == (
            [("pending_payment", "expired"), ("expired", "paid")]
            if expired
            else [("pending_payment", "paid")]
        )
        assert len(await paid_events(runtime, placed.group_id)) == 1
        assert await stock(client, placed.shop, placed.variant_id) == {
            "on_hand": 5,
            "reserved": 0,
            "allocated": 2,
            "available": 3,
        }


async def test_two_deliveries_racing_pay_once(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    place_order: PlaceOrder,
    market: Market,
) -> None:
    """On time and after the expiry job: two payments of one group at the same moment
    pay it once, and the stock is allocated once."""
    for late in (False, True):
        new_day(market)
        placed = await place_order("pending_payment", quantity=2, stock=5)
        if late:
            clock.advance(hold(runtime) + dt.timedelta(seconds=1))
            await placed.sign_in_again(runtime)
            assert await expire(runtime) == 1

        outcomes = await asyncio.gather(
            pay(runtime, placed.group_id), pay(runtime, placed.group_id)
        )

        assert sorted(outcomes) == [PayOutcome.already_paid, PayOutcome.paid]
        assert await statuses(runtime, placed.group_id) == ("paid", ["paid"])
        assert len(await paid_events(runtime, placed.group_id)) == 1
        assert [m[1] for m in await moves(runtime, placed.order_id)].count("paid") == 1
        assert await stock(client, placed.shop, placed.variant_id) == {
            "on_hand": 5,
            "reserved": 0,
            "allocated": 2,
            "available": 3,
        }


async def test_a_late_payment_racing_a_checkout_for_the_last_units_never_oversells(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    place_order: PlaceOrder,
    make_buyer: MakeBuyer,
    market: Market,
) -> None:
    for _ in range(3):
        new_day(market)
        placed = await place_order("pending_payment", quantity=2, stock=2)
        clock.advance(hold(runtime) + dt.timedelta(seconds=1))
        await placed.sign_in_again(runtime)
        await expire(runtime)  # (an earlier round's buyer may expire too)
        assert await statuses(runtime, placed.group_id) == ("expired", ["expired"])
        other = await make_buyer((placed.variant_id, 2))

        outcome, answer = await asyncio.gather(pay(runtime, placed.group_id), other.post_checkout())

        if outcome is PayOutcome.paid:
            refused(answer, 409, "out-of-stock")
            expected = {"on_hand": 2, "reserved": 0, "allocated": 2, "available": 0}
        else:
            assert outcome is PayOutcome.stock_gone
            assert answer.status_code == 201, answer.text
            assert await statuses(runtime, placed.group_id) == ("expired", ["expired"])
            expected = {"on_hand": 2, "reserved": 2, "allocated": 0, "available": 0}
        assert await stock(client, placed.shop, placed.variant_id) == expected
