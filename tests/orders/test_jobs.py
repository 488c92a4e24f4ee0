"""The scheduled jobs of orders, run by the dispatcher with a manual clock: unpaid
checkouts expire when their stock holds run out; delivered orders complete once the
dispute window has passed."""

from __future__ import annotations

import asyncio
import datetime as dt

import httpx2
from sqlalchemy import select

from soko.orders import service
from soko.orders.models import CheckoutGroup
from soko.platform.clock import ManualClock
from soko.platform.jobs import registry
from soko.platform.outbox import MessageStatus, OutboxMessage
from soko.platform.runtime import Runtime
from tests.conftest import sql_statements
from tests.orders.conftest import (
    CHECKOUT,
    ORDERS,
    PlaceOrder,
    available,
    events,
    ok,
    pay,
    stock,
)


async def run_jobs(runtime: Runtime) -> None:
    await runtime.dispatcher.run_until_idle()
    async with runtime.db.transaction(read_only=True) as session:
        failed = (
            await session.scalars(
                select(OutboxMessage.name).where(
                    OutboxMessage.name.like("orders.%"),
                    OutboxMessage.status != MessageStatus.done.value,
                )
            )
        ).all()
    assert failed == []


def test_the_jobs_are_scheduled() -> None:
    assert registry.schedules["orders.expire_unpaid"].cron == "* * * * *"
    assert registry.schedules["orders.complete_delivered"].cron == "17 * * * *"


async def test_unpaid_checkouts_expire_with_their_holds(
    client: httpx2.AsyncClient, runtime: Runtime, clock: ManualClock, place_order: PlaceOrder
) -> None:
    unpaid = await place_order("pending_payment", quantity=3, stock=10)
    paid = await place_order("paid", quantity=2, stock=10)
    hold = dt.timedelta(seconds=runtime.settings.reservation_hold_seconds)

    clock.advance(hold - dt.timedelta(seconds=30))
    await run_jobs(runtime)
    assert (
        ok(await client.get(f"{ORDERS}/{unpaid.order_id}", headers=unpaid.buyer.headers))["status"]
        == "pending_payment"
    )
    assert (await available(runtime, unpaid.variant_id))[unpaid.variant_id] == 7

    clock.advance(dt.timedelta(seconds=60))
    await run_jobs(runtime)
    await unpaid.sign_in_again(runtime)
    await paid.sign_in_again(runtime)

    group = ok(await client.get(f"{CHECKOUT}/{unpaid.group_id}", headers=unpaid.buyer.headers))
    assert group["status"] == "expired"
    order = ok(await client.get(f"{ORDERS}/{unpaid.order_id}", headers=unpaid.buyer.headers))
    assert order["status"] == "expired"
    assert order["transitions"][-1] == {
        "from_status": "pending_payment",
        "to_status": "expired",
        "actor_kind": "system",
        "actor_id": None,
        "reason": "not paid in time",
        "at": "2030-01-01T00:15:30Z",
    }
    [expired] = await events(runtime, "order.expired")
    assert expired["order_id"] == str(unpaid.order_id)
    assert await stock(client, unpaid.shop, unpaid.variant_id) == {
        "on_hand": 10,
        "reserved": 0,
        "allocated": 0,
        "available": 10,
    }
    # A paid checkout never expires.
    assert (
        ok(await client.get(f"{CHECKOUT}/{paid.group_id}", headers=paid.buyer.headers))["status"]
        == "paid"
    )
    assert (await stock(client, paid.shop, paid.variant_id))["allocated"] == 2
    # A payment arriving now is too late.
    assert await pay(runtime, unpaid.group_id) is False


async def test_many_checkouts_expire_with_their_stock_given_back_in_one_pass(
    client: httpx2.AsyncClient, runtime: Runtime, clock: ManualClock, place_order: PlaceOrder
) -> None:
    # Given back one checkout at a time, the stock rows of several items would be
    # locked in the checkouts' order, not the key order every other writer keeps.
    placed = [await place_order("pending_payment", quantity=1, stock=5) for _ in range(4)]
    clock.advance(dt.timedelta(seconds=runtime.settings.reservation_hold_seconds + 1))
    with sql_statements(runtime) as sent:
        async with runtime.transaction() as session:
            assert await service.expire_unpaid(session, runtime) == 4
    stock_updates = [s for s in sent if s.lstrip().upper().startswith("UPDATE INVENTORY_STOCK")]
    assert len(stock_updates) == 1, stock_updates
    for one in placed:
        assert (await available(runtime, one.variant_id))[one.variant_id] == 5


async def test_a_payment_racing_the_expiry_has_one_winner(
    client: httpx2.AsyncClient, runtime: Runtime, clock: ManualClock, place_order: PlaceOrder
) -> None:
    placed = await place_order("pending_payment", quantity=2, stock=5)
    clock.advance(dt.timedelta(seconds=runtime.settings.reservation_hold_seconds + 1))
    await placed.sign_in_again(runtime)

    async def expire() -> int:
        async with runtime.db.transaction() as session:
            return await service.expire_unpaid(session, runtime)

    paid, expired = await asyncio.gather(pay(runtime, placed.group_id), expire())

    assert (paid, expired) in {(True, 0), (False, 1)}
    async with runtime.db.transaction(read_only=True) as session:
        status = await session.scalar(
            select(CheckoutGroup.status).where(CheckoutGroup.id == placed.group_id)
        )
    assert status == ("paid" if paid else "expired")
    level = await stock(client, placed.shop, placed.variant_id)
    if paid:
        assert level == {"on_hand": 5, "reserved": 0, "allocated": 2, "available": 3}
    else:
        assert level == {"on_hand": 5, "reserved": 0, "allocated": 0, "available": 5}


async def test_delivered_orders_complete_after_the_dispute_window(
    client: httpx2.AsyncClient, runtime: Runtime, clock: ManualClock, place_order: PlaceOrder
) -> None:
    quiet = await place_order("delivered")
    disputed = await place_order("delivered")
    ok(
        await client.post(
            f"{ORDERS}/{disputed.order_id}/dispute",
            json={"reason": "damaged", "details": "The lid is cracked."},
            headers=disputed.buyer.headers,
        ),
        201,
    )
    window = dt.timedelta(days=runtime.settings.dispute_window_days)

    clock.advance(window - dt.timedelta(hours=2))
    await run_jobs(runtime)
    await quiet.sign_in_again(runtime)
    url = f"{ORDERS}/{quiet.order_id}"
    assert ok(await client.get(url, headers=quiet.buyer.headers))["status"] == "delivered"

    clock.advance(dt.timedelta(hours=3))
    await run_jobs(runtime)
    await quiet.sign_in_again(runtime)
    await disputed.sign_in_again(runtime)

    order = ok(await client.get(url, headers=quiet.buyer.headers))
    assert order["status"] == "completed"
    assert order["completed_at"] is not None
    assert order["transitions"][-1]["actor_kind"] == "system"
    assert [e["order_id"] for e in await events(runtime, "order.completed")] == [
        str(quiet.order_id)
    ]
    # A disputed order waits for the marketplace's decision instead.
    still = ok(await client.get(f"{ORDERS}/{disputed.order_id}", headers=disputed.buyer.headers))
    assert still["status"] == "disputed"


async def test_the_jobs_do_nothing_when_nothing_is_due(runtime: Runtime) -> None:
    async with runtime.db.transaction() as session:
        assert await service.expire_unpaid(session, runtime) == 0
        assert await service.complete_delivered(session, runtime) == 0
