"""Disputes over HTTP: opened by the buyer within the window after delivery, answered
by the seller, resolved by the marketplace with a refund or for the seller; each step
an event."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import httpx2
import pytest
from sqlalchemy import select

from soko.identity.models import Role
from soko.orders.models import OrderTransition
from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from tests.identity.conftest import MakeUser
from tests.orders.conftest import (
    ADMIN,
    ORDERS,
    SELLER_ORDERS,
    Placed,
    PlaceOrder,
    events,
    ok,
    refused,
)
from tests.sellers.conftest import join_store

COMPLAINT = {
    "reason": "not_as_described",
    "details": "The basket is half the size shown.",
    "evidence_urls": ["https://photos.example.com/basket.jpg"],
}


async def open_dispute(client: httpx2.AsyncClient, placed: Placed, **body: Any) -> httpx2.Response:
    return await client.post(
        f"{ORDERS}/{placed.order_id}/dispute",
        json={**COMPLAINT, **body},
        headers=placed.buyer.headers,
    )


async def answer(
    client: httpx2.AsyncClient, placed: Placed, text: str = "Sizes are in the listing."
) -> httpx2.Response:
    return await client.post(
        f"{SELLER_ORDERS}/{placed.order_id}/dispute/response",
        json={"response": text},
        headers=placed.shop.headers,
    )


async def resolve(
    client: httpx2.AsyncClient, dispute_id: str, headers: dict[str, str], **body: Any
) -> httpx2.Response:
    return await client.post(
        f"{ADMIN}/disputes/{dispute_id}/resolve",
        json={"note": "Checked the photos", **body},
        headers=headers,
    )


async def test_a_dispute_from_opening_to_a_partial_refund(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    place_order: PlaceOrder,
    make_user: MakeUser,
) -> None:
    placed = await place_order("delivered", quantity=2)  # 2 x 1,500
    clock.advance(dt.timedelta(days=3))
    await placed.sign_in_again(runtime)

    dispute = ok(await open_dispute(client, placed), 201)

    assert dispute["status"] == "open"
    assert dispute["reason"] == "not_as_described"
    assert dispute["evidence_urls"] == COMPLAINT["evidence_urls"]
    order = ok(await client.get(f"{ORDERS}/{placed.order_id}", headers=placed.buyer.headers))
    assert order["status"] == "disputed"
    assert order["dispute"]["id"] == dispute["id"]
    assert order["transitions"][-1]["actor_kind"] == "buyer"
    [opened] = await events(runtime, "dispute.opened")
    assert (opened["dispute_id"], opened["actor_id"]) == (dispute["id"], str(placed.buyer.user_id))
    assert len(await events(runtime, "order.disputed")) == 1
    # One dispute per order.
    refused(await open_dispute(client, placed), 409, "order-state-conflict")

    answered = ok(await answer(client, placed))
    assert (answered["status"], answered["seller_response"]) == (
        "answered",
        "Sizes are in the listing.",
    )
    refused(await answer(client, placed, "Again"), 409, "dispute-state-conflict")
    [event] = await events(runtime, "dispute.answered")
    assert event["actor_id"] == str(placed.shop.owner.user_id)
    # The seller sees it on their order too.
    seen = ok(await client.get(f"{SELLER_ORDERS}/{placed.order_id}", headers=placed.shop.headers))
    assert seen["dispute"]["seller_response"] == "Sizes are in the listing."

    support = await make_user(Role.support)
    queue = ok(
        await client.get(
            f"{ADMIN}/disputes", params={"status": "answered"}, headers=support.headers
        )
    )
    assert [item["id"] for item in queue["items"]] == [dispute["id"]]
    assert queue["items"][0]["order_subtotal"] == {"amount": 3000, "currency": "KES"}
    refused(
        await resolve(client, dispute["id"], support.headers, outcome="refund", refund_minor=3001),
        422,
        "validation-error",
    )

    resolved = ok(
        await resolve(client, dispute["id"], support.headers, outcome="refund", refund_minor=1200)
    )

    assert resolved["status"] == "resolved_refund"
    assert resolved["refund"] == {"amount": 1200, "currency": "KES"}
    order = ok(await client.get(f"{ORDERS}/{placed.order_id}", headers=placed.buyer.headers))
    assert order["status"] == "refunded"
    assert order["transitions"][-1]["actor_kind"] == "admin"
    assert order["transitions"][-1]["actor_id"] == str(support.user_id)
    [settled] = await events(runtime, "dispute.resolved")
    assert (settled["outcome"], settled["refund_minor"], settled["currency"]) == (
        "refund",
        1200,
        "KES",
    )
    [refunded] = await events(runtime, "order.refunded")
    assert refunded["refund_due_minor"] == 1200
    refused(
        await resolve(client, dispute["id"], support.headers, outcome="reject"),
        409,
        "dispute-state-conflict",
    )


async def test_a_rejected_dispute_completes_the_order(
    client: httpx2.AsyncClient, runtime: Runtime, place_order: PlaceOrder, make_user: MakeUser
) -> None:
    placed = await place_order("delivered")
    dispute = ok(await open_dispute(client, placed, reason="not_received"), 201)
    admin = await make_user(Role.admin)
    # A rejection carries no refund.
    refused(
        await resolve(client, dispute["id"], admin.headers, outcome="reject", refund_minor=5),
        422,
        "validation-error",
    )

    resolved = ok(await resolve(client, dispute["id"], admin.headers, outcome="reject"))

    assert (resolved["status"], resolved["refund"]) == ("resolved_rejected", None)
    order = ok(await client.get(f"{ORDERS}/{placed.order_id}", headers=placed.buyer.headers))
    assert order["status"] == "completed"
    [settled] = await events(runtime, "dispute.resolved")
    assert (settled["outcome"], settled["refund_minor"]) == ("reject", None)
    # A full refund is the default amount of a refund.
    other = await place_order("delivered", quantity=1)
    second = ok(await open_dispute(client, other), 201)
    full = ok(await resolve(client, second["id"], admin.headers, outcome="refund"))
    assert full["refund"] == {"amount": 1500, "currency": "KES"}


async def test_a_long_resolution_note_is_kept_whole_and_shortened_in_the_history(
    client: httpx2.AsyncClient, runtime: Runtime, place_order: PlaceOrder, make_user: MakeUser
) -> None:
    # The note may be 4000 characters; the order's history keeps 500 of them. A note
    # over 500 was a 500 on PostgreSQL (the history's column is that long).
    placed = await place_order("delivered")
    dispute = ok(await open_dispute(client, placed), 201)
    admin = await make_user(Role.admin)
    note = ("Looked at every photo. " * 170).strip()  # 3909 characters
    resolved = ok(await resolve(client, dispute["id"], admin.headers, outcome="reject", note=note))
    assert resolved["resolution_note"] == note
    order = ok(await client.get(f"{ORDERS}/{placed.order_id}", headers=placed.buyer.headers))
    assert order["status"] == "completed"
    async with runtime.db.transaction(read_only=True) as session:
        reasons = (
            await session.scalars(
                select(OrderTransition.reason).where(
                    OrderTransition.order_id == uuid.UUID(str(placed.order_id)),
                    OrderTransition.from_status == "disputed",
                )
            )
        ).all()
    assert [len(reason) for reason in reasons] == [500]
    assert reasons[0] == note[:499] + "…"


async def test_resolutions_sent_at_once_settle_the_dispute_once(
    client: httpx2.AsyncClient, runtime: Runtime, place_order: PlaceOrder, make_user: MakeUser
) -> None:
    placed = await place_order("delivered")
    dispute = ok(await open_dispute(client, placed), 201)
    admin = await make_user(Role.admin)
    outcomes = ["refund", "reject"] * 3
    answers = await asyncio.gather(
        *(resolve(client, dispute["id"], admin.headers, outcome=outcome) for outcome in outcomes)
    )
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200] + [409] * 5, [answer.text for answer in answers]
    # The losers are told about the dispute they tried to settle, as documented.
    for loser in (answer for answer in answers if answer.status_code == 409):
        assert loser.json()["type"] == "/problems/dispute-state-conflict", loser.text
        assert loser.json()["current_status"] in ("resolved_refund", "resolved_rejected")
    assert len(await events(runtime, "dispute.resolved")) == 1


async def test_a_dispute_is_opened_within_the_window_after_delivery(
    client: httpx2.AsyncClient, runtime: Runtime, clock: ManualClock, place_order: PlaceOrder
) -> None:
    timely, late = await place_order("delivered"), await place_order("delivered")
    window = runtime.settings.dispute_window_days
    order = ok(await client.get(f"{ORDERS}/{late.order_id}", headers=late.buyer.headers))
    assert order["dispute_window_closes_at"] == f"2030-01-{1 + window:02d}T00:00:00Z"

    # On the last moment of the window it still opens...
    clock.advance(dt.timedelta(days=window))
    await timely.sign_in_again(runtime)
    ok(await open_dispute(client, timely), 201)

    # ...and a second later it no longer does.
    clock.advance(dt.timedelta(seconds=1))
    await late.sign_in_again(runtime)
    problem = refused(await open_dispute(client, late), 409, "dispute-window-closed")
    assert problem["window_days"] == window
    assert problem["closed_at"] == f"2030-01-{1 + window:02d}T00:00:00Z"


async def test_a_shipped_order_that_never_arrives_is_disputed_as_not_received_once_late(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    place_order: PlaceOrder,
    make_user: MakeUser,
) -> None:
    # The seller shipped and never marked it delivered: the buyer is not stuck.
    placed = await place_order("shipped")
    after = runtime.settings.dispute_not_received_after_days
    early = refused(
        await open_dispute(client, placed, reason="not_received"), 409, "dispute-too-early"
    )
    assert early["not_received_after_days"] == after
    assert early["opens_at"] == f"2030-01-{1 + after:02d}T00:00:00Z"

    clock.advance(dt.timedelta(days=after))
    await placed.sign_in_again(runtime)
    # Only as not received: anything else needs the parcel in hand.
    wrong = refused(await open_dispute(client, placed), 422, "validation-error")
    assert wrong["errors"][0]["field"] == "reason"
    dispute = ok(await open_dispute(client, placed, reason="not_received"), 201)
    assert dispute["reason"] == "not_received"
    order = ok(await client.get(f"{ORDERS}/{placed.order_id}", headers=placed.buyer.headers))
    assert order["status"] == "disputed"
    [moved] = await events(runtime, "order.disputed")
    assert (moved["from_status"], moved["to_status"]) == ("shipped", "disputed")
    # Settled like any dispute: a refund of the whole order by default.
    admin = await make_user(Role.admin)
    settled = ok(await resolve(client, dispute["id"], admin.headers, outcome="refund"))
    assert settled["status"] == "resolved_refund"
    order = ok(await client.get(f"{ORDERS}/{placed.order_id}", headers=placed.buyer.headers))
    assert order["status"] == "refunded"


@pytest.mark.parametrize("start", ["pending_payment", "paid"])
async def test_only_a_delivered_order_can_be_disputed(
    client: httpx2.AsyncClient, place_order: PlaceOrder, start: str
) -> None:
    placed = await place_order(start)
    problem = refused(await open_dispute(client, placed), 409, "order-state-conflict")
    assert problem["current_status"] == start
    refused(await answer(client, placed), 404, "not-found")


async def test_only_the_stores_manager_or_owner_answers(
    client: httpx2.AsyncClient, place_order: PlaceOrder, make_user: MakeUser
) -> None:
    placed = await place_order("delivered")
    ok(await open_dispute(client, placed), 201)
    staff = await make_user()
    await join_store(client, placed.shop.headers, staff)
    as_staff = {**staff.headers, "X-Seller-Id": str(placed.shop.seller_id)}
    response = await client.post(
        f"{SELLER_ORDERS}/{placed.order_id}/dispute/response",
        json={"response": "No"},
        headers=as_staff,
    )
    refused(response, 403, "seller-role-required")
