# ruff: noqa: F401, F811
# (pytest fixtures are imported from test_pay_support and named as parameters)
"""Inbound payment webhooks on SQLite and PostgreSQL: verified first, stored once,
processed once, confirmed with the provider, and never moving a payment backwards."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import httpx2
import pytest
from sqlalchemy import func, select

from soko.identity.models import Role
from soko.payments.events import PAYMENT_FLAGGED, PAYMENT_SUCCEEDED
from soko.payments.payment_models import WebhookEvent
from soko.payments.providers.base import ProviderStatus
from soko.platform.clock import ManualClock
from soko.platform.outbox import OutboxMessage
from soko.platform.runtime import Runtime
from tests.identity.conftest import MakeUser
from tests.orders.conftest import available, events, refused, sign_in_again
from tests.payments.test_pay_support import (
    WEBHOOK,
    FakeProvider,
    MakeBuyerFn,
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
    refunds_of,
    run_jobs,
    start_payment,
    stored_events,
)


async def process_jobs(runtime: Runtime) -> int:
    async with runtime.db.transaction(read_only=True) as session:
        return int(
            await session.scalar(
                select(func.count())
                .select_from(OutboxMessage)
                .where(OutboxMessage.name == "payments.process_event")
            )
            or 0
        )


async def test_a_duplicate_webhook_is_stored_once_and_has_no_second_effect(
    client: httpx2.AsyncClient, runtime: Runtime, fake: FakeProvider, place_order: PlaceOrder
) -> None:
    placed = await place_order()
    payment_id = uuid.UUID((await start_payment(client, placed))["id"])
    fake.settle(payment_id, ProviderStatus.succeeded)
    body, headers = fake.webhook(payment_id, ProviderStatus.succeeded, event_id="evt_1")
    first = ok(await client.post(WEBHOOK, content=body, headers=headers))
    second = ok(await client.post(WEBHOOK, content=body, headers=headers))
    assert (first["duplicate"], second["duplicate"]) == (False, True)
    assert await stored_events(runtime) == 1 and await process_jobs(runtime) == 1
    await run_jobs(runtime)
    # Replayed after processing, and the same news under another event id.
    assert ok(await client.post(WEBHOOK, content=body, headers=headers))["duplicate"] is True
    ok(await deliver(client, fake, payment_id, ProviderStatus.succeeded, event_id="evt_2"))
    await run_jobs(runtime)

    assert await order_status(client, placed) == "paid"
    assert len(await events(runtime, PAYMENT_SUCCEEDED)) == 1
    assert len(await events(runtime, "order.paid")) == 1
    assert await balance(runtime, placed.shop.seller_id) == {"KES": 2700}
    assert (await ledger_check(runtime)).balanced
    assert await stored_events(runtime) == 2


@pytest.mark.parametrize(
    "forgery", ["wrong_secret", "tampered_body", "no_signature", "garbage", "huge_amount"]
)
async def test_a_forged_webhook_is_refused_and_changes_nothing(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    fake: FakeProvider,
    place_order: PlaceOrder,
    forgery: str,
) -> None:
    placed = await place_order()
    payment_id = uuid.UUID((await start_payment(client, placed))["id"])
    body, headers = fake.webhook(payment_id, ProviderStatus.succeeded)
    if forgery == "wrong_secret":
        body, headers = fake.webhook(payment_id, ProviderStatus.succeeded, secret=b"guess")
    elif forgery == "tampered_body":
        body = body.replace(b'"succeeded"', b'"succeeded" ')
    elif forgery == "no_signature":
        headers = {"content-type": "application/json"}
    elif forgery == "huge_amount":
        # Signed with the right secret, but no payment has such an amount: refused as
        # unreadable, not a 500 while storing it.
        body, headers = fake.webhook(payment_id, ProviderStatus.succeeded, amount_minor=10**30)
    else:
        body = b"\xff\x00 not json"
    # Even if the provider really shows it paid, a forged message is not the way in.
    fake.settle(payment_id, ProviderStatus.succeeded)
    answer = await client.post(WEBHOOK, content=body, headers=headers)
    refused(answer, 400, "payment-webhook-rejected")
    await run_jobs(runtime)
    assert await stored_events(runtime) == 0 and await process_jobs(runtime) == 0
    assert (await payment_row(runtime, payment_id)).status == "pending"
    assert await order_status(client, placed) == "pending_payment"


async def test_a_webhook_for_an_unknown_provider_is_not_found(client: httpx2.AsyncClient) -> None:
    refused(await client.post("/api/v1/payments/webhooks/nobody", content=b"{}"), 404, "not-found")


async def test_an_oversized_webhook_is_refused_unread(
    client: httpx2.AsyncClient, fake: FakeProvider
) -> None:
    refused(await client.post(WEBHOOK, content=b"x" * (256 * 1024 + 1)), 413, "payload-too-large")


@pytest.mark.parametrize("late", [ProviderStatus.pending, ProviderStatus.failed])
async def test_a_late_event_never_overwrites_succeeded(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    fake: FakeProvider,
    place_order: PlaceOrder,
    late: ProviderStatus,
) -> None:
    placed = await place_order()
    payment_id = await pay_and_confirm(client, runtime, fake, placed)
    # The late event, and a provider API still lagging behind with the same stale answer.
    fake.settle(payment_id, late)
    ok(await deliver(client, fake, payment_id, late))
    await run_jobs(runtime)
    payment = await payment_row(runtime, payment_id)
    assert payment.status == "succeeded" and payment.succeeded_at is not None
    assert await order_status(client, placed) == "paid"
    assert len(await events(runtime, PAYMENT_SUCCEEDED)) == 1
    assert await events(runtime, "payment.failed") == []


async def test_a_failure_may_still_succeed_later(
    client: httpx2.AsyncClient, runtime: Runtime, fake: FakeProvider, place_order: PlaceOrder
) -> None:
    placed = await place_order()
    payment_id = uuid.UUID((await start_payment(client, placed))["id"])
    fake.settle(payment_id, ProviderStatus.failed)
    ok(await deliver(client, fake, payment_id, ProviderStatus.failed))
    await run_jobs(runtime)
    assert (await payment_row(runtime, payment_id)).status == "failed"
    fake.settle(payment_id, ProviderStatus.succeeded)
    ok(await deliver(client, fake, payment_id, ProviderStatus.succeeded))
    await run_jobs(runtime)
    assert (await payment_row(runtime, payment_id)).status == "succeeded"
    assert await order_status(client, placed) == "paid"


async def test_a_webhook_is_confirmed_with_the_provider_before_anything_moves(
    client: httpx2.AsyncClient, runtime: Runtime, fake: FakeProvider, place_order: PlaceOrder
) -> None:
    placed = await place_order()
    payment_id = uuid.UUID((await start_payment(client, placed))["id"])
    # A validly signed "succeeded" the provider's API does not back (still pending).
    ok(await deliver(client, fake, payment_id, ProviderStatus.succeeded))
    await run_jobs(runtime)
    assert fake.fetches == 1
    assert (await payment_row(runtime, payment_id)).status == "pending"
    assert await order_status(client, placed) == "pending_payment"


@pytest.mark.parametrize("what", ["amount", "currency"])
async def test_an_amount_or_currency_mismatch_is_flagged_not_paid(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    fake: FakeProvider,
    place_order: PlaceOrder,
    what: str,
) -> None:
    placed = await place_order(quantity=2)
    payment_id = uuid.UUID((await start_payment(client, placed))["id"])
    if what == "amount":
        fake.settle(payment_id, ProviderStatus.succeeded, amount_minor=30)
    else:
        fake.settle(payment_id, ProviderStatus.succeeded, currency="NGN")
    ok(await deliver(client, fake, payment_id, ProviderStatus.succeeded))
    await run_jobs(runtime)
    payment = await payment_row(runtime, payment_id)
    assert (payment.status, payment.flag) == ("pending", "amount_mismatch")
    assert await order_status(client, placed) == "pending_payment"
    [flagged] = await events(runtime, PAYMENT_FLAGGED)
    assert (flagged["payment_id"], flagged["flag"]) == (str(payment_id), "amount_mismatch")
    assert (await ledger_check(runtime)).entries == 0


async def test_a_webhook_for_no_known_payment_is_kept_as_unmatched(
    client: httpx2.AsyncClient, runtime: Runtime, fake: FakeProvider, make_user: MakeUser
) -> None:
    ok(await deliver(client, fake, uuid.uuid4(), ProviderStatus.succeeded))
    ok(await deliver(client, fake, "not-a-uuid", ProviderStatus.succeeded))
    await run_jobs(runtime)
    async with runtime.db.transaction(read_only=True) as session:
        statuses = (await session.scalars(select(WebhookEvent.status))).all()
    assert statuses == ["unmatched", "unmatched"]
    admin = await make_user(Role.admin)
    listed = ok(
        await client.get(
            "/api/v1/admin/payments/webhook-events",
            params={"status": "unmatched"},
            headers=admin.headers,
        )
    )
    assert [item["status"] for item in listed["items"]] == ["unmatched", "unmatched"]
    # Only the headers worth keeping are stored (this provider's signature header is not
    # one of them).
    assert listed["items"][0]["headers"]["content-type"] == "application/json"
    assert "x-fake-signature" not in listed["items"][0]["headers"]


async def test_a_payment_after_its_reservation_expired_is_re_reserved_when_stock_allows(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    fake: FakeProvider,
    place_order: PlaceOrder,
) -> None:
    placed = await place_order(quantity=2, stock=5)
    payment_id = uuid.UUID((await start_payment(client, placed))["id"])
    clock.advance(dt.timedelta(seconds=runtime.settings.reservation_hold_seconds + 120))
    await run_jobs(runtime)  # the expiry job: the group expires, the stock goes back
    await placed.sign_in_again(runtime)
    assert await order_status(client, placed) == "expired"
    assert (await available(runtime, placed.variant_id))[placed.variant_id] == 5

    fake.settle(payment_id, ProviderStatus.succeeded)
    ok(await deliver(client, fake, payment_id, ProviderStatus.succeeded))
    await run_jobs(runtime)
    assert await order_status(client, placed) == "paid"
    assert (await available(runtime, placed.variant_id))[placed.variant_id] == 3
    assert await refunds_of(runtime, payment_id) == []
    assert await balance(runtime, placed.shop.seller_id) == {"KES": 2700}


async def test_a_payment_after_its_stock_was_sold_is_refunded_automatically(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    fake: FakeProvider,
    place_order: PlaceOrder,
    make_buyer: MakeBuyerFn,
) -> None:
    placed = await place_order(quantity=2, stock=2)
    payment_id = uuid.UUID((await start_payment(client, placed))["id"])
    clock.advance(dt.timedelta(seconds=runtime.settings.reservation_hold_seconds + 120))
    await run_jobs(runtime)
    await placed.sign_in_again(runtime)
    rival = await make_buyer((placed.variant_id, 2))
    await rival.checkout()  # takes the two units the first buyer's hold gave back

    fake.settle(payment_id, ProviderStatus.succeeded)
    ok(await deliver(client, fake, payment_id, ProviderStatus.succeeded))
    await run_jobs(runtime)
    assert await order_status(client, placed) == "expired"
    payment = await payment_row(runtime, payment_id)
    assert (payment.status, payment.refunded_minor) == ("succeeded", 3000)
    [refund] = await refunds_of(runtime, payment_id)
    assert (refund.status, refund.source, refund.reason, refund.amount_minor) == (
        "succeeded",
        "automatic",
        "stock_gone",
        3000,
    )
    assert [r.amount_minor for r in fake.refunds] == [3000]
    [succeeded] = await events(runtime, PAYMENT_SUCCEEDED)
    assert succeeded["outcome"] == "stock_gone"
    [told] = await events(runtime, "refund.succeeded")
    assert told["buyer_id"] == str(placed.buyer.user_id) and told["reason"] == "stock_gone"
    assert await balance(runtime, placed.shop.seller_id) == {}
    assert (await ledger_check(runtime)).balanced
    # Paying it again is refused as what it is: expired, not "already paid".
    again = await client.post(
        pay_path(placed.group_id),
        json={"provider": "fake"},
        headers={**placed.buyer.headers, "Idempotency-Key": uuid.uuid4().hex},
    )
    assert again.status_code == 409, again.text
    assert again.json()["type"] == "/problems/group-not-payable"
    assert again.json()["group_status"] == "expired"


async def test_two_payments_of_one_group_both_succeeding_one_wins_the_other_is_refunded(
    client: httpx2.AsyncClient, runtime: Runtime, fake: FakeProvider, place_order: PlaceOrder
) -> None:
    placed = await place_order(quantity=2)
    first = uuid.UUID((await start_payment(client, placed))["id"])
    second = uuid.UUID((await start_payment(client, placed))["id"])
    for payment_id in (first, second):
        fake.settle(payment_id, ProviderStatus.succeeded)
        ok(await deliver(client, fake, payment_id, ProviderStatus.succeeded))
    await run_jobs(runtime)
    rows = [await payment_row(runtime, p) for p in (first, second)]
    assert sorted(row.status for row in rows) == ["duplicate", "succeeded"]
    loser = next(row for row in rows if row.status == "duplicate")
    [refund] = await refunds_of(runtime, loser.id)
    assert (refund.status, refund.reason, refund.amount_minor) == (
        "succeeded",
        "duplicate_payment",
        3000,
    )
    assert await order_status(client, placed) == "paid"
    assert await balance(runtime, placed.shop.seller_id) == {"KES": 2700}
    assert (await ledger_check(runtime)).balanced


async def test_an_order_cancelled_before_the_capture_has_its_difference_refunded(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    fake: FakeProvider,
    market: object,
    make_buyer: MakeBuyerFn,
) -> None:
    shops = [await market.open_shop() for _ in range(2)]  # type: ignore[attr-defined]
    variants = [(await shop.list_product(1000, stock=5)).variant_id for shop in shops]
    buyer = await make_buyer(*variants)
    group = await buyer.checkout()
    group_id = uuid.UUID(group["id"])
    started = ok(
        await client.post(
            f"/api/v1/checkout/{group_id}/payments",
            json={"provider": "fake"},
            headers={**buyer.headers, "Idempotency-Key": "two-shops"},
        ),
        201,
    )
    assert started["amount_minor"] == 2000
    kept, dropped = group["orders"]
    ok(await client.post(f"/api/v1/orders/{dropped['id']}/cancel", headers=buyer.headers))
    payment_id = uuid.UUID(started["id"])
    fake.settle(payment_id, ProviderStatus.succeeded)
    ok(await deliver(client, fake, payment_id, ProviderStatus.succeeded))
    await run_jobs(runtime)
    order = ok(await client.get(f"/api/v1/orders/{kept['id']}", headers=buyer.headers))
    assert order["status"] == "paid"
    [refund] = await refunds_of(runtime, payment_id)
    assert (refund.amount_minor, refund.reason, refund.status, refund.order_id) == (
        1000,
        "orders_cancelled_before_payment",
        "succeeded",
        None,
    )
    assert (await ledger_check(runtime)).balanced


@pytest.mark.postgresql
async def test_the_same_event_delivered_concurrently_is_processed_once(
    backend: str,
    client: httpx2.AsyncClient,
    runtime: Runtime,
    fake: FakeProvider,
    place_order: PlaceOrder,
) -> None:
    if backend != "postgresql":
        pytest.skip("concurrency is PostgreSQL's to show")
    placed = await place_order()
    payment_id = uuid.UUID((await start_payment(client, placed))["id"])
    fake.settle(payment_id, ProviderStatus.succeeded)
    body, headers = fake.webhook(payment_id, ProviderStatus.succeeded, event_id="evt_same")
    others = [
        fake.webhook(payment_id, ProviderStatus.succeeded, event_id=f"evt_{n}") for n in range(4)
    ]
    answers = await asyncio.gather(
        *(client.post(WEBHOOK, content=body, headers=headers) for _ in range(8)),
        *(client.post(WEBHOOK, content=b, headers=h) for b, h in others),
    )
    same = [ok(answer)["duplicate"] for answer in answers[:8]]
    assert sorted(same) == [False] + [True] * 7
    assert await stored_events(runtime) == 5
    # Five events for one payment, processed by concurrent handlers.
    await asyncio.gather(runtime.dispatcher.run_until_idle(), runtime.dispatcher.run_until_idle())
    await run_jobs(runtime)
    assert (await payment_row(runtime, payment_id)).status == "succeeded"
    assert len(await events(runtime, PAYMENT_SUCCEEDED)) == 1
    assert len(await events(runtime, "order.paid")) == 1
    assert await balance(runtime, placed.shop.seller_id) == {"KES": 2700}
    assert (await ledger_check(runtime)).balanced
    placed.buyer.user = await sign_in_again(runtime, placed.buyer.user)


@pytest.mark.postgresql
async def test_two_successes_settled_at_the_same_moment_leave_one_winner(
    backend: str,
    client: httpx2.AsyncClient,
    runtime: Runtime,
    fake: FakeProvider,
    place_order: PlaceOrder,
) -> None:
    """Two payments of one group settled in two concurrent transactions: the partial
    unique index lets one commit as ``succeeded``; the other, refused by it, becomes
    ``duplicate`` and is refunded."""
    if backend != "postgresql":
        pytest.skip("concurrency is PostgreSQL's to show")
    from soko.payments.intake import confirm_and_settle
    from soko.payments.payment_models import Payment

    placed = await place_order(quantity=2)
    ids = [uuid.UUID((await start_payment(client, placed))["id"]) for _ in range(2)]
    for payment_id in ids:
        fake.settle(payment_id, ProviderStatus.succeeded)
    await run_jobs(runtime)

    async def settle_one(payment_id: uuid.UUID) -> str:
        async with runtime.db.transaction() as session:
            payment = await session.get(Payment, payment_id)
            assert payment is not None
            return (await confirm_and_settle(session, runtime, fake, payment)).value

    outcomes = await asyncio.gather(*(settle_one(payment_id) for payment_id in ids))
    assert sorted(outcomes) == ["paid", "refunded"]
    await run_jobs(runtime)
    rows = [await payment_row(runtime, payment_id) for payment_id in ids]
    assert sorted(row.status for row in rows) == ["duplicate", "succeeded"]
    loser = next(row for row in rows if row.status == "duplicate")
    assert [r.status for r in await refunds_of(runtime, loser.id)] == ["succeeded"]
    assert await balance(runtime, placed.shop.seller_id) == {"KES": 2700}
    assert (await ledger_check(runtime)).balanced
