# ruff: noqa: F401, F811
# (pytest fixtures are imported from test_pay_support and named as parameters)
"""Paying a checkout group over HTTP, on SQLite and PostgreSQL: the buyer starts a
payment, the provider's webhook arrives, the job confirms it with the provider and the
orders are paid, with the capture in a balanced ledger."""

from __future__ import annotations

import uuid

import httpx2
from sqlalchemy import select

from soko.payments.events import PAYMENT_SUCCEEDED
from soko.payments.payment_models import Payment
from soko.payments.providers.base import ProviderStatus
from soko.platform.runtime import Runtime
from tests.orders.conftest import events, refused
from tests.payments.test_pay_support import (
    FAKE,
    FakeProvider,
    PlaceOrder,
    balance,
    deliver,
    fake,
    ledger_check,
    make_buyer,
    make_user,
    market,
    ok,
    order_status,
    pay_and_confirm,
    pay_path,
    payment_row,
    place_order,
    run_jobs,
    start_payment,
)


async def test_a_buyer_pays_a_checkout_and_sees_the_order_paid(
    client: httpx2.AsyncClient, runtime: Runtime, fake: FakeProvider, place_order: PlaceOrder
) -> None:
    placed = await place_order(quantity=2)
    started = await start_payment(client, placed)
    assert started["status"] == "pending"
    assert started["amount_minor"] == 3000 and started["currency"] == "KES"
    assert started["next_action"] == {
        "type": "redirect",
        "url": f"https://fake.example/pay/{started['id']}",
        "client_secret": None,
    }
    [start] = fake.starts
    assert start.reference == started["id"] and start.amount_minor == 3000
    assert start.customer_email == placed.buyer.user.email

    payment_id = uuid.UUID(started["id"])
    fake.settle(payment_id, ProviderStatus.succeeded)
    answer = ok(await deliver(client, fake, payment_id, ProviderStatus.succeeded))
    assert answer == {"received": True, "duplicate": False}
    assert await order_status(client, placed) == "pending_payment"  # processed by the job

    await run_jobs(runtime)
    assert await order_status(client, placed) == "paid"
    mine = ok(await client.get(f"/api/v1/payments/{payment_id}", headers=placed.buyer.headers))
    assert mine["status"] == "succeeded" and mine["next_action"] is None
    listed = ok(await client.get(pay_path(placed.group_id), headers=placed.buyer.headers))
    assert [item["id"] for item in listed["items"]] == [str(payment_id)]

    [event] = await events(runtime, PAYMENT_SUCCEEDED)
    assert event["payment_id"] == str(payment_id) and event["outcome"] == "paid"
    assert event["seller_ids"] == [str(placed.shop.seller_id)]
    check = await ledger_check(runtime)
    assert check.balanced
    # 10% commission by default: the seller is owed the rest.
    assert await balance(runtime, placed.shop.seller_id) == {"KES": 2700}


async def test_the_idempotency_key_replays_the_start(
    client: httpx2.AsyncClient, runtime: Runtime, fake: FakeProvider, place_order: PlaceOrder
) -> None:
    placed = await place_order()
    first = await start_payment(client, placed, key="pay-once")
    again = await client.post(
        pay_path(placed.group_id),
        json={"provider": FAKE},
        headers={**placed.buyer.headers, "Idempotency-Key": "pay-once"},
    )
    assert again.status_code == 201 and again.headers["Idempotency-Replayed"] == "true"
    assert again.json()["id"] == first["id"]
    assert len(fake.starts) == 1


async def test_only_the_buyer_may_pay_or_see_the_payment(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    fake: FakeProvider,
    place_order: PlaceOrder,
    make_buyer: object,
) -> None:
    placed = await place_order()
    other = await place_order()
    started = await start_payment(client, placed)
    headers = {**other.buyer.headers, "Idempotency-Key": uuid.uuid4().hex}
    refused(
        await client.post(pay_path(placed.group_id), json={"provider": FAKE}, headers=headers),
        404,
        "not-found",
    )
    refused(
        await client.get(f"/api/v1/payments/{started['id']}", headers=other.buyer.headers),
        404,
        "not-found",
    )
    refused(
        await client.get(pay_path(placed.group_id), headers=other.buyer.headers), 404, "not-found"
    )
    assert (await client.get(pay_path(placed.group_id))).status_code == 401


async def test_an_unknown_provider_is_refused(
    client: httpx2.AsyncClient, fake: FakeProvider, place_order: PlaceOrder
) -> None:
    placed = await place_order()
    headers = {**placed.buyer.headers, "Idempotency-Key": uuid.uuid4().hex}
    refused(
        await client.post(pay_path(placed.group_id), json={"provider": "nope"}, headers=headers),
        422,
        "validation-error",
    )
    assert fake.starts == []


async def test_a_provider_outage_answers_503_with_retry_after_and_keeps_the_failed_attempt(
    client: httpx2.AsyncClient, runtime: Runtime, fake: FakeProvider, place_order: PlaceOrder
) -> None:
    placed = await place_order()
    fake.down = True
    headers = {**placed.buyer.headers, "Idempotency-Key": "outage"}
    answer = await client.post(pay_path(placed.group_id), json={"provider": FAKE}, headers=headers)
    refused(answer, 503, "payment-provider-unavailable")
    assert answer.headers["Retry-After"] == "13"
    listed = ok(await client.get(pay_path(placed.group_id), headers=placed.buyer.headers))
    assert [item["status"] for item in listed["items"]] == ["failed"]

    fake.down = False  # the same key may be retried: a 5xx gave it up
    retried = await client.post(pay_path(placed.group_id), json={"provider": FAKE}, headers=headers)
    assert retried.status_code == 201, retried.text
    assert retried.json()["status"] == "pending"


async def test_a_paid_group_cannot_be_paid_again_but_a_failed_attempt_may_be_retried(
    client: httpx2.AsyncClient, runtime: Runtime, fake: FakeProvider, place_order: PlaceOrder
) -> None:
    placed = await place_order()
    first = uuid.UUID((await start_payment(client, placed))["id"])
    fake.settle(first, ProviderStatus.failed)
    ok(await deliver(client, fake, first, ProviderStatus.failed))
    await run_jobs(runtime)
    assert (await payment_row(runtime, first)).status == "failed"
    assert await order_status(client, placed) == "pending_payment"

    await pay_and_confirm(client, runtime, fake, placed)
    assert await order_status(client, placed) == "paid"
    headers = {**placed.buyer.headers, "Idempotency-Key": uuid.uuid4().hex}
    refused(
        await client.post(pay_path(placed.group_id), json={"provider": FAKE}, headers=headers),
        409,
        "group-already-paid",
    )
    async with runtime.db.transaction(read_only=True) as session:
        mine = select(Payment.status).where(Payment.group_id == placed.group_id)
        statuses = sorted((await session.scalars(mine)).all())
    assert statuses == ["failed", "succeeded"]


async def test_other_domains_read_how_a_group_stands_with_its_payments(
    client: httpx2.AsyncClient, runtime: Runtime, fake: FakeProvider, place_order: PlaceOrder
) -> None:
    from soko.payments.public import payment_status_of_group

    placed = await place_order()

    async def status() -> tuple[str, int]:
        async with runtime.db.transaction(read_only=True) as session:
            found = await payment_status_of_group(session, placed.group_id)
        return found.status, found.attempts

    assert await status() == ("none", 0)
    failed = uuid.UUID((await start_payment(client, placed))["id"])
    assert await status() == ("pending", 1)
    fake.settle(failed, ProviderStatus.failed)
    ok(await deliver(client, fake, failed, ProviderStatus.failed))
    await run_jobs(runtime)
    assert await status() == ("failed", 1)
    await pay_and_confirm(client, runtime, fake, placed)
    assert await status() == ("paid", 2)
