"""Every move of an order over HTTP: allowed and refused exactly as the state machine's
table says, each recorded with who and when, published through the outbox, and
followed by the stock."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx2
import pytest

from soko.orders.states import Action, Actor, OrderStatus, allowed_actions, can
from soko.platform.runtime import Runtime
from tests.cart.catalog_support import Market
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
    pay,
    refused,
    stock,
)
from tests.sellers.conftest import join_store

# The order routes that move an order, and the move each makes as whom.
ROUTE_MOVES: dict[str, tuple[Action, Actor]] = {
    "buyer-cancel": (Action.cancel, Actor.buyer),
    "confirm-delivery": (Action.deliver, Actor.buyer),
    "accept": (Action.accept, Actor.seller),
    "ship": (Action.ship, Actor.seller),
    "mark-delivered": (Action.deliver, Actor.seller),
    "seller-cancel": (Action.cancel, Actor.seller),
}
STARTS = ["pending_payment", "paid", "processing", "shipped", "delivered"]


async def attempt(client: httpx2.AsyncClient, placed: Placed, move: str) -> httpx2.Response:
    buyer_url = f"{ORDERS}/{placed.order_id}"
    seller_url = f"{SELLER_ORDERS}/{placed.order_id}"
    seller = placed.shop.headers
    if move == "buyer-cancel":
        return await client.post(
            f"{buyer_url}/cancel", json={"reason": "changed my mind"}, headers=placed.buyer.headers
        )
    if move == "confirm-delivery":
        return await client.post(f"{buyer_url}/confirm-delivery", headers=placed.buyer.headers)
    if move == "ship":
        return await client.post(
            f"{seller_url}/ship",
            json={"carrier": "Sendy", "tracking_number": "SN-42"},
            headers=seller,
        )
    if move == "seller-cancel":
        return await client.post(
            f"{seller_url}/cancel", json={"reason": "cannot source it"}, headers=seller
        )
    return await client.post(f"{seller_url}/{move}", headers=seller)


async def read(client: httpx2.AsyncClient, placed: Placed) -> dict[str, Any]:
    return ok(await client.get(f"{ORDERS}/{placed.order_id}", headers=placed.buyer.headers))


@pytest.mark.parametrize("start", [*STARTS, "cancelled"])
async def test_moves_the_table_does_not_allow_are_refused(
    client: httpx2.AsyncClient, runtime: Runtime, place_order: PlaceOrder, start: str
) -> None:
    placed = await place_order("pending_payment" if start == "cancelled" else start)
    if start == "cancelled":
        ok(await attempt(client, placed, "buyer-cancel"))
    before = await read(client, placed)
    state = OrderStatus(start)
    refused_moves = [name for name, (a, who) in ROUTE_MOVES.items() if not can(a, state, who)]
    assert refused_moves

    for name in refused_moves:
        problem = refused(await attempt(client, placed, name), 409, "order-state-conflict")
        who = ROUTE_MOVES[name][1]
        assert problem["current_status"] == start, name
        assert problem["allowed_actions"] == [a.value for a in allowed_actions(state, who)]

    # Nothing moved: same state, same version, no new record.
    assert await read(client, placed) == before


ALLOWED = [
    (start, name)
    for start in STARTS
    for name, (action, who) in ROUTE_MOVES.items()
    if can(action, OrderStatus(start), who)
]


@pytest.mark.parametrize(("start", "move"), ALLOWED)
async def test_each_allowed_move_is_recorded_published_and_followed_by_stock(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    place_order: PlaceOrder,
    start: str,
    move: str,
) -> None:
    placed = await place_order(start, quantity=2, stock=10)
    action, who = ROUTE_MOVES[move]
    actor_id = placed.buyer.user_id if who is Actor.buyer else placed.shop.owner.user_id
    before = await read(client, placed)
    runtime.clock.advance(60)  # type: ignore[attr-defined]

    order = ok(await attempt(client, placed, move))

    target = {
        Action.cancel: "cancelled",
        Action.deliver: "delivered",
        Action.accept: "processing",
        Action.ship: "shipped",
    }[action]
    assert order["status"] == target
    assert order["version"] == before["version"] + 1
    last = order["transitions"][-1]
    assert last == {
        "from_status": start,
        "to_status": target,
        "actor_kind": who.value,
        "actor_id": str(actor_id),
        "reason": {"buyer-cancel": "changed my mind", "seller-cancel": "cannot source it"}.get(
            move, ""
        ),
        "at": "2030-01-01T00:01:00Z",
    }
    assert len(order["transitions"]) == len(before["transitions"]) + 1
    [event] = await events(runtime, f"order.{target}")
    assert event["order_id"] == str(placed.order_id)
    assert (event["from_status"], event["to_status"]) == (start, target)
    assert (event["actor_kind"], event["actor_id"]) == (who.value, str(actor_id))
    paid_before = start in ("paid", "processing")
    if action is Action.cancel:
        assert order["cancelled_at"] == "2030-01-01T00:01:00Z"
        assert event["refund_due_minor"] == (3000 if paid_before else None)
    if action is Action.ship:
        assert (order["carrier"], order["tracking_number"]) == ("Sendy", "SN-42")
        assert (event["carrier"], event["tracking_number"]) == ("Sendy", "SN-42")

    level = await stock(client, placed.shop, placed.variant_id)
    if action is Action.cancel:  # the two units go back on sale
        assert level == {"on_hand": 10, "reserved": 0, "allocated": 0, "available": 10}
    elif action is Action.ship or start == "shipped":  # they leave the shelf
        assert level == {"on_hand": 8, "reserved": 0, "allocated": 0, "available": 8}
    else:  # accepted: still allocated to the order
        assert level == {"on_hand": 10, "reserved": 0, "allocated": 2, "available": 8}
    assert (await available(runtime, placed.variant_id))[placed.variant_id] == level["available"]


async def test_payment_moves_the_group_and_commits_its_stock(
    client: httpx2.AsyncClient, runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    first, second = await market.open_shop(), await market.open_shop()
    one = (await first.list_product(1000, stock=5)).variant_id
    two = (await second.list_product(500, stock=5)).variant_id
    buyer = await make_buyer((one, 2), (two, 1))
    group = await buyer.checkout()
    group_id = uuid.UUID(group["id"])
    assert await stock(client, first, one) == {
        "on_hand": 5,
        "reserved": 2,
        "allocated": 0,
        "available": 3,
    }
    runtime.clock.advance(120)  # type: ignore[attr-defined]

    assert await pay(runtime, group_id) is True

    paid = ok(await client.get(f"{CHECKOUT}/{group_id}", headers=buyer.headers))
    assert (paid["status"], paid["paid_at"]) == ("paid", "2030-01-01T00:02:00Z")
    assert {order["status"] for order in paid["orders"]} == {"paid"}
    assert await stock(client, first, one) == {
        "on_hand": 5,
        "reserved": 0,
        "allocated": 2,
        "available": 3,
    }
    assert (await stock(client, second, two))["allocated"] == 1
    paid_events = await events(runtime, "order.paid")
    assert {e["order_id"] for e in paid_events} == {o["id"] for o in group["orders"]}
    assert {(e["actor_kind"], e["actor_id"]) for e in paid_events} == {("system", None)}
    order = ok(await client.get(f"{ORDERS}/{group['orders'][0]['id']}", headers=buyer.headers))
    assert order["transitions"][-1]["from_status"] == "pending_payment"
    assert order["transitions"][-1]["actor_kind"] == "system"

    # A second delivery of the payment changes nothing.
    assert await pay(runtime, group_id) is False
    assert len(await events(runtime, "order.paid")) == 2


async def test_cancelling_every_order_of_an_unpaid_group_calls_the_group_off(
    client: httpx2.AsyncClient, runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    first, second = await market.open_shop(), await market.open_shop()
    one = (await first.list_product(1000)).variant_id
    two = (await second.list_product(500)).variant_id
    buyer = await make_buyer(one, two)
    group = await buyer.checkout()
    by_seller = {o["seller_id"]: o["id"] for o in group["orders"]}
    url = f"{CHECKOUT}/{group['id']}"

    ok(
        await client.post(
            f"{SELLER_ORDERS}/{by_seller[str(first.seller_id)]}/cancel", headers=first.headers
        )
    )
    # The group costs what is left, and is still to be paid.
    left = ok(await client.get(url, headers=buyer.headers))
    assert (left["status"], left["total"]["amount"]) == ("pending_payment", 500)
    assert await available(runtime, one, two) == {one: 10, two: 9}

    ok(
        await client.post(
            f"{ORDERS}/{by_seller[str(second.seller_id)]}/cancel", headers=buyer.headers
        )
    )
    gone = ok(await client.get(url, headers=buyer.headers))
    assert (gone["status"], gone["total"]["amount"]) == ("cancelled", 0)
    assert await available(runtime, one, two) == {one: 10, two: 10}
    # Nothing left to pay.
    assert await pay(runtime, uuid.UUID(group["id"])) is False


async def test_a_cancel_racing_a_shipment_has_one_winner(
    client: httpx2.AsyncClient, runtime: Runtime, place_order: PlaceOrder
) -> None:
    """The buyer cancels while the seller ships: the database lets exactly one through,
    and the stock follows the winner. Several rounds, so both orders of arrival occur."""
    outcomes = []
    for _ in range(4):
        placed = await place_order("processing", quantity=2, stock=10)
        cancel, ship = await asyncio.gather(
            attempt(client, placed, "buyer-cancel"), attempt(client, placed, "ship")
        )
        assert sorted([cancel.status_code, ship.status_code]) == [200, 409], (
            cancel.text,
            ship.text,
        )
        loser = cancel if cancel.status_code == 409 else ship
        refused(loser, 409, "order-state-conflict")
        won = "cancelled" if cancel.status_code == 200 else "shipped"
        outcomes.append(won)
        order = await read(client, placed)
        assert order["status"] == won
        assert [t["from_status"] for t in order["transitions"]].count("processing") == 1
        level = await stock(client, placed.shop, placed.variant_id)
        assert level == (
            {"on_hand": 10, "reserved": 0, "allocated": 0, "available": 10}
            if won == "cancelled"
            else {"on_hand": 8, "reserved": 0, "allocated": 0, "available": 8}
        )
    assert outcomes  # which side wins each round is the database's business


async def test_a_store_staff_member_fulfils_but_cannot_cancel(
    client: httpx2.AsyncClient, runtime: Runtime, place_order: PlaceOrder, make_user: Any
) -> None:
    placed = await place_order("paid")
    staff = await make_user()
    await join_store(client, placed.shop.headers, staff)
    as_staff = {**staff.headers, "X-Seller-Id": str(placed.shop.seller_id)}
    url = f"{SELLER_ORDERS}/{placed.order_id}"

    refused(await client.post(f"{url}/cancel", headers=as_staff), 403, "seller-role-required")
    assert ok(await client.post(f"{url}/accept", headers=as_staff))["status"] == "processing"
