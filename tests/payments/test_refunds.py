# ruff: noqa: F401, F811
# (pytest fixtures are imported from test_pay_support and named as parameters)
"""Refunds on SQLite and PostgreSQL: from a cancelled paid order, from a dispute
resolved with a refund, and by an admin; each goes through the provider (from a job,
retried) and then the ledger, and never beyond what the payment took."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import httpx2

from soko.identity.models import Role
from soko.payments.providers.base import ProviderStatus
from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from tests.identity.conftest import MakeUser
from tests.orders.conftest import ADMIN, ORDERS, SELLER_ORDERS, Placed, events, refused
from tests.payments.test_pay_support import (
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
    pay_and_confirm,
    payment_row,
    place_order,
    refunds_of,
    run_jobs,
    start_payment,
)

PAYMENTS_DESK = f"{ADMIN}/payments"


async def admin_refund(
    client: httpx2.AsyncClient,
    payment_id: uuid.UUID,
    headers: dict[str, str],
    *,
    key: str | None = None,
    **body: Any,
) -> httpx2.Response:
    return await client.post(
        f"{PAYMENTS_DESK}/{payment_id}/refunds",
        json={"reason": "goodwill", **body},
        headers={**headers, "Idempotency-Key": key or uuid.uuid4().hex},
    )


async def test_a_cancelled_paid_order_is_refunded_and_the_refund_reaches_the_ledger(
    client: httpx2.AsyncClient, runtime: Runtime, fake: FakeProvider, place_order: PlaceOrder
) -> None:
    placed = await place_order(quantity=2)
    payment_id = await pay_and_confirm(client, runtime, fake, placed)
    assert await balance(runtime, placed.shop.seller_id) == {"KES": 2700}
    ok(
        await client.post(
            f"{SELLER_ORDERS}/{placed.order_id}/cancel",
            json={"reason": "out of stock after all"},
            headers=placed.shop.headers,
        )
    )
    await run_jobs(runtime)

    [refund] = await refunds_of(runtime, payment_id)
    assert (refund.status, refund.source, refund.amount_minor, refund.order_id) == (
        "succeeded",
        "cancellation",
        3000,
        placed.order_id,
    )
    assert refund.seller_id == placed.shop.seller_id
    assert [(r.reference, r.amount_minor) for r in fake.refunds] == [(str(refund.id), 3000)]
    assert (await payment_row(runtime, payment_id)).refunded_minor == 3000
    # The seller's share and the commission are both reversed.
    assert await balance(runtime, placed.shop.seller_id) == {"KES": 0}
    assert (await ledger_check(runtime)).balanced
    [told] = await events(runtime, "refund.succeeded")
    assert (told["refund_id"], told["order_id"], told["source"]) == (
        str(refund.id),
        str(placed.order_id),
        "cancellation",
    )


async def deliver_order(client: httpx2.AsyncClient, placed: Placed) -> None:
    seller = f"{SELLER_ORDERS}/{placed.order_id}"
    ok(await client.post(f"{seller}/accept", headers=placed.shop.headers))
    ok(
        await client.post(
            f"{seller}/ship",
            json={"carrier": "G4S", "tracking_number": "TRK-1"},
            headers=placed.shop.headers,
        )
    )
    ok(
        await client.post(
            f"{ORDERS}/{placed.order_id}/confirm-delivery", headers=placed.buyer.headers
        )
    )


async def test_a_dispute_resolved_with_a_refund_reaches_the_ledger(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    fake: FakeProvider,
    place_order: PlaceOrder,
    make_user: MakeUser,
) -> None:
    placed = await place_order(quantity=2)
    payment_id = await pay_and_confirm(client, runtime, fake, placed)
    await deliver_order(client, placed)
    dispute = ok(
        await client.post(
            f"{ORDERS}/{placed.order_id}/dispute",
            json={"reason": "not_as_described", "details": "Half the size shown."},
            headers=placed.buyer.headers,
        ),
        201,
    )
    support = await make_user(Role.support)
    ok(
        await client.post(
            f"{ADMIN}/disputes/{dispute['id']}/resolve",
            json={"outcome": "refund", "refund_minor": 1000, "note": "Photos agree"},
            headers=support.headers,
        )
    )
    await run_jobs(runtime)
    await run_jobs(runtime)  # a second pass has nothing more to do

    [refund] = await refunds_of(runtime, payment_id)
    assert (refund.status, refund.source, refund.amount_minor, refund.order_id) == (
        "succeeded",
        "dispute",
        1000,
        placed.order_id,
    )
    # 2,700 owed after commission; 1,000 refunded at the same 10%: 900 from the seller.
    assert await balance(runtime, placed.shop.seller_id) == {"KES": 1800}
    assert (await ledger_check(runtime)).balanced


async def test_an_admin_refund_is_idempotent_and_never_exceeds_the_payment(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    fake: FakeProvider,
    place_order: PlaceOrder,
    make_user: MakeUser,
) -> None:
    placed = await place_order(quantity=2)
    payment_id = await pay_and_confirm(client, runtime, fake, placed)
    admin = await make_user(Role.admin)
    support = await make_user(Role.support)
    refused(
        await admin_refund(client, payment_id, support.headers, amount_minor=1), 403, "forbidden"
    )

    first = await admin_refund(client, payment_id, admin.headers, key="r1", amount_minor=1200)
    again = await admin_refund(client, payment_id, admin.headers, key="r1", amount_minor=1200)
    assert first.status_code == 201, first.text
    assert again.headers["Idempotency-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert first.json()["order_id"] == str(placed.order_id)  # its only order

    too_much = await admin_refund(client, payment_id, admin.headers, amount_minor=1801)
    assert refused(too_much, 409, "refund-exceeds-payment")["refundable_minor"] == 1800
    other_order = await admin_refund(
        client, payment_id, admin.headers, amount_minor=1, order_id=str(uuid.uuid4())
    )
    refused(other_order, 422, "validation-error")
    ok(await admin_refund(client, payment_id, admin.headers, amount_minor=1800), 201)
    await run_jobs(runtime)

    refunds = await refunds_of(runtime, payment_id)
    assert [(r.amount_minor, r.status, r.source) for r in refunds] == [
        (1200, "succeeded", "admin"),
        (1800, "succeeded", "admin"),
    ]
    assert refunds[0].requested_by == admin.user_id
    assert (await payment_row(runtime, payment_id)).refunded_minor == 3000
    assert await balance(runtime, placed.shop.seller_id) == {"KES": 0}
    assert (await ledger_check(runtime)).balanced
    refused(
        await admin_refund(client, payment_id, admin.headers, amount_minor=1),
        409,
        "refund-exceeds-payment",
    )


async def test_a_payment_without_money_is_not_refundable(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    fake: FakeProvider,
    place_order: PlaceOrder,
    make_user: MakeUser,
) -> None:
    placed = await place_order()
    payment_id = uuid.UUID((await start_payment(client, placed))["id"])
    admin = await make_user(Role.admin)
    answer = await admin_refund(client, payment_id, admin.headers, amount_minor=100)
    assert refused(answer, 409, "payment-not-refundable")["payment_status"] == "pending"
    refused(
        await admin_refund(client, uuid.uuid4(), admin.headers, amount_minor=100),
        404,
        "not-found",
    )


async def test_a_refund_refused_for_good_is_flagged_and_the_amount_is_refundable_again(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    fake: FakeProvider,
    place_order: PlaceOrder,
    make_user: MakeUser,
) -> None:
    placed = await place_order(quantity=2)
    payment_id = await pay_and_confirm(client, runtime, fake, placed)
    admin = await make_user(Role.admin)
    fake.refund_outcome = "error"
    ok(await admin_refund(client, payment_id, admin.headers, amount_minor=500), 201)
    await run_jobs(runtime)

    [refund] = await refunds_of(runtime, payment_id)
    assert refund.status == "failed" and "charge disputed" in (refund.failure_reason or "")
    payment = await payment_row(runtime, payment_id)
    assert (payment.refunded_minor, payment.flag) == (0, "refund_failed")
    [failed] = await events(runtime, "refund.failed")
    assert failed["refund_id"] == str(refund.id)
    assert await balance(runtime, placed.shop.seller_id) == {"KES": 2700}

    flagged = ok(await client.get(PAYMENTS_DESK, params={"flagged": "true"}, headers=admin.headers))
    assert [item["id"] for item in flagged["items"]] == [str(payment_id)]
    detail = ok(await client.get(f"{PAYMENTS_DESK}/{payment_id}", headers=admin.headers))
    assert [r["status"] for r in detail["refunds"]] == ["failed"]
    assert [e["status"] for e in detail["events"]] == ["processed"]
    resolved = ok(
        await client.post(
            f"{PAYMENTS_DESK}/{payment_id}/resolve-flag",
            json={"note": "refunded by bank transfer"},
            headers=admin.headers,
        )
    )
    assert resolved["flag"] is None
    refused(
        await client.post(
            f"{PAYMENTS_DESK}/{payment_id}/resolve-flag", json={}, headers=admin.headers
        ),
        409,
        "payment-not-flagged",
    )


async def test_a_provider_outage_delays_a_refund_and_loses_none(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    fake: FakeProvider,
    place_order: PlaceOrder,
    make_user: MakeUser,
) -> None:
    placed = await place_order()
    payment_id = await pay_and_confirm(client, runtime, fake, placed)
    admin = await make_user(Role.admin)
    fake.refund_outcome = "down"
    ok(await admin_refund(client, payment_id, admin.headers, amount_minor=300), 201)
    await run_jobs(runtime)
    [refund] = await refunds_of(runtime, payment_id)
    assert refund.status == "pending"

    fake.refund_outcome = "succeeded"
    clock.advance(dt.timedelta(minutes=10))
    await run_jobs(runtime)
    [refund] = await refunds_of(runtime, payment_id)
    assert refund.status == "succeeded"
    assert len(fake.refunds) == 1
    assert (await ledger_check(runtime)).balanced


async def test_a_refund_pending_at_the_provider_is_followed_up_never_sent_twice(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    fake: FakeProvider,
    place_order: PlaceOrder,
    make_user: MakeUser,
) -> None:
    placed = await place_order()
    payment_id = await pay_and_confirm(client, runtime, fake, placed)
    admin = await make_user(Role.admin)
    fake.refund_outcome = "pending"
    ok(await admin_refund(client, payment_id, admin.headers, amount_minor=300), 201)
    await run_jobs(runtime)
    [refund] = await refunds_of(runtime, payment_id)
    assert (refund.status, refund.provider_refund_id) == ("pending", f"re_{refund.id}")

    clock.advance(dt.timedelta(seconds=61))
    await run_jobs(runtime)
    assert fake.status_reads == 1
    fake.refund_outcome = "succeeded"
    clock.advance(dt.timedelta(seconds=61))
    await run_jobs(runtime)
    [refund] = await refunds_of(runtime, payment_id)
    assert refund.status == "succeeded"
    assert (len(fake.refunds), fake.status_reads) == (1, 2)
    assert (await ledger_check(runtime)).balanced


async def test_a_refund_whose_job_died_mid_call_is_never_asked_twice(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    fake: FakeProvider,
    place_order: PlaceOrder,
    make_user: MakeUser,
) -> None:
    """At a provider whose refunds take no idempotency key, a job that dies while the
    provider is being asked leaves the refund to a person: the next run does not ask
    again (it could pay twice), it fails the refund with the reason and flags the
    payment. On SQLite the marker cannot be committed apart from the job (one write
    lock), so there the refund is asked again; production runs on PostgreSQL."""
    placed = await place_order()
    payment_id = await pay_and_confirm(client, runtime, fake, placed)
    admin = await make_user(Role.admin)
    fake.refunds_are_idempotent = False
    asked = 0
    original = fake.refund

    async def dies_after_the_provider_acted(request: Any) -> Any:
        nonlocal asked
        asked += 1
        result = await original(request)
        if asked == 1:
            raise RuntimeError("the worker died before recording the answer")
        return result

    fake.refund = dies_after_the_provider_acted  # type: ignore[method-assign]
    ok(await admin_refund(client, payment_id, admin.headers, amount_minor=300), 201)
    await run_jobs(runtime)
    clock.advance(dt.timedelta(minutes=10))
    await run_jobs(runtime)
    [refund] = await refunds_of(runtime, payment_id)
    if runtime.db.dialect == "postgresql":
        assert asked == 1
        assert refund.status == "failed"
        assert "may have reached the provider" in (refund.failure_reason or "")
        assert (await payment_row(runtime, payment_id)).flag == "refund_failed"
    else:
        assert asked == 2
        assert refund.status == "succeeded"
    assert (await ledger_check(runtime)).balanced


async def test_a_refund_the_provider_never_saw_is_asked_again(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    fake: FakeProvider,
    place_order: PlaceOrder,
    make_user: MakeUser,
) -> None:
    """A retryable failure means the provider did not act: the marker is cleared and
    the next run asks again, even at a provider without refund idempotency."""
    placed = await place_order()
    payment_id = await pay_and_confirm(client, runtime, fake, placed)
    admin = await make_user(Role.admin)
    fake.refunds_are_idempotent = False
    fake.refund_outcome = "down"
    ok(await admin_refund(client, payment_id, admin.headers, amount_minor=300), 201)
    await run_jobs(runtime)
    [refund] = await refunds_of(runtime, payment_id)
    assert (refund.status, refund.sent_at) == ("pending", None)

    fake.refund_outcome = "succeeded"
    clock.advance(dt.timedelta(minutes=10))
    await run_jobs(runtime)
    [refund] = await refunds_of(runtime, payment_id)
    assert refund.status == "succeeded"
    assert len(fake.refunds) == 1
    assert (await ledger_check(runtime)).balanced


async def _two_shop_payment(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    fake: FakeProvider,
    market: Any,
    make_buyer: Any,
    *,
    cancel_small: bool = False,
) -> tuple[uuid.UUID, dict[str, Any], dict[str, Any], Any]:
    """One payment of a checkout from two stores: 1,200 at the first, 500 at the other
    (with ``cancel_small``, the 500 order is cancelled before paying: 1,200 is paid)."""
    shops = [await market.open_shop() for _ in range(2)]
    variants = [
        (await shop.list_product(price, stock=5)).variant_id
        for shop, price in zip(shops, (1200, 500), strict=True)
    ]
    buyer = await make_buyer(*variants)
    group = await buyer.checkout()
    big, small = sorted(group["orders"], key=lambda order: -order["subtotal"]["amount"])
    if cancel_small:
        ok(await client.post(f"{ORDERS}/{small['id']}/cancel", headers=buyer.headers))
    started = ok(
        await client.post(
            f"/api/v1/checkout/{group['id']}/payments",
            json={"provider": "fake"},
            headers={**buyer.headers, "Idempotency-Key": uuid.uuid4().hex},
        ),
        201,
    )
    payment_id = uuid.UUID(started["id"])
    assert started["amount_minor"] == (1200 if cancel_small else 1700)
    fake.settle(payment_id, ProviderStatus.succeeded)
    ok(await deliver(client, fake, payment_id, ProviderStatus.succeeded))
    await run_jobs(runtime)
    return payment_id, big, small, buyer


async def test_a_cancellation_after_a_part_refund_gives_back_only_what_is_left_of_the_order(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    fake: FakeProvider,
    market: Any,
    make_buyer: Any,
    make_user: MakeUser,
) -> None:
    """The payment covers both orders, so its own limit (1,700) would let the
    cancellation's 1,200 pass after a 500 refund of the same order: 1,700 paid back for
    a 1,200 order, the other store's money included."""
    payment_id, big, small, buyer = await _two_shop_payment(
        client, runtime, fake, market, make_buyer
    )
    admin = await make_user(Role.admin)
    ok(
        await admin_refund(client, payment_id, admin.headers, amount_minor=500, order_id=big["id"]),
        201,
    )
    ok(await client.post(f"{ORDERS}/{big['id']}/cancel", headers=buyer.headers))
    await run_jobs(runtime)

    refunds = await refunds_of(runtime, payment_id)
    assert [(r.source, r.amount_minor, r.status, str(r.order_id)) for r in refunds] == [
        ("admin", 500, "succeeded", big["id"]),
        ("cancellation", 700, "succeeded", big["id"]),
    ]
    assert sum(r.amount_minor for r in fake.refunds) == 1200
    payment = await payment_row(runtime, payment_id)
    assert (payment.refunded_minor, payment.flag) == (1200, "refund_exceeds")
    assert (await ledger_check(runtime)).balanced
    # The other store's order is untouched and still fully refundable.
    refused(
        await admin_refund(
            client, payment_id, admin.headers, amount_minor=501, order_id=small["id"]
        ),
        409,
        "refund-exceeds-payment",
    )
    ok(
        await admin_refund(
            client, payment_id, admin.headers, amount_minor=500, order_id=small["id"]
        ),
        201,
    )


async def test_refunds_of_one_order_sent_together_never_exceed_it(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    fake: FakeProvider,
    market: Any,
    make_buyer: Any,
    make_user: MakeUser,
) -> None:
    payment_id, _, small, _ = await _two_shop_payment(client, runtime, fake, market, make_buyer)
    admin = await make_user(Role.admin)
    answers = await asyncio.gather(
        *(
            admin_refund(client, payment_id, admin.headers, amount_minor=100, order_id=small["id"])
            for _ in range(12)
        )
    )
    assert sorted(answer.status_code for answer in answers) == [201] * 5 + [409] * 7, [
        answer.text for answer in answers if answer.status_code not in (201, 409)
    ]
    await run_jobs(runtime)
    refunds = await refunds_of(runtime, payment_id)
    assert [r.status for r in refunds] == ["succeeded"] * 5
    assert sum(r.amount_minor for r in fake.refunds) == 500
    assert (await payment_row(runtime, payment_id)).refunded_minor == 500
    assert (await ledger_check(runtime)).balanced


async def test_a_refund_the_ledger_cannot_record_is_refused_before_the_provider_pays(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    fake: FakeProvider,
    place_order: PlaceOrder,
) -> None:
    """The payment's reservation and the ledger disagree (here: 1,000 of the order
    refunded in the ledger by hand, which the payment does not know): the refund is
    checked against the ledger before any money leaves, and fails with nothing paid."""
    from soko.payments import ledger
    from soko.payments.payment_models import Payment, Refund, RefundSource
    from soko.payments.refunds import SEND_REFUND_JOB
    from soko.platform.outbox import enqueue

    placed = await place_order(quantity=2)
    payment_id = await pay_and_confirm(client, runtime, fake, placed)
    async with runtime.db.transaction() as session:
        payment = await session.get(Payment, payment_id)
        assert payment is not None
        await ledger.post_refund(
            session,
            runtime,
            refund_id=uuid.uuid4(),
            payment_id=payment_id,
            provider=payment.provider,
            currency=payment.currency,
            amount_minor=1000,
            order_id=placed.order_id,
            seller_id=placed.shop.seller_id,
        )
        payment.refunded_minor = payment.amount_minor
        refund_id = uuid.uuid4()
        session.add(
            Refund(
                id=refund_id,
                payment_id=payment_id,
                order_id=placed.order_id,
                seller_id=placed.shop.seller_id,
                amount_minor=payment.amount_minor,
                currency=payment.currency,
                status="pending",
                reason="by hand",
                source=RefundSource.admin.value,
                dedupe_key=f"test:{refund_id}",
                created_at=runtime.clock.now(),
                updated_at=runtime.clock.now(),
            )
        )
        await session.flush()
        await enqueue(session, SEND_REFUND_JOB, {"refund_id": str(refund_id), "poll": 0})
    await run_jobs(runtime)

    assert fake.refunds == []
    [refund] = await refunds_of(runtime, payment_id)
    assert refund.status == "failed"
    assert refund.failure_reason == "only 2000 remains refundable in the ledger"
    payment_after = await payment_row(runtime, payment_id)
    assert (payment_after.refunded_minor, payment_after.flag) == (0, "refund_failed")
    assert (await ledger_check(runtime)).balanced


async def test_an_order_cancelled_before_payment_is_not_refundable_from_the_payment(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    fake: FakeProvider,
    market: Any,
    make_buyer: Any,
    make_user: MakeUser,
) -> None:
    """Its money was never taken: a refund of it would take the other store's money,
    or fail at the provider and flag the payment."""
    payment_id, big, small, buyer = await _two_shop_payment(
        client, runtime, fake, market, make_buyer, cancel_small=True
    )
    admin = await make_user(Role.admin)

    never_paid = await admin_refund(
        client, payment_id, admin.headers, amount_minor=500, order_id=small["id"]
    )
    refused(never_paid, 422, "validation-error")
    assert never_paid.json()["errors"][0]["field"] == "order_id"
    assert await refunds_of(runtime, payment_id) == []
    # Left out, the order is the one the payment paid.
    ok(await admin_refund(client, payment_id, admin.headers, amount_minor=300), 201)
    await run_jobs(runtime)
    [refund] = await refunds_of(runtime, payment_id)
    assert (str(refund.order_id), refund.amount_minor, refund.status) == (
        big["id"],
        300,
        "succeeded",
    )
    # Cancelled after payment, it was paid: what is left of it may still be refunded by
    # hand, and no more (its cancellation refunded the rest).
    ok(await client.post(f"{ORDERS}/{big['id']}/cancel", headers=buyer.headers))
    await run_jobs(runtime)
    refused(
        await admin_refund(client, payment_id, admin.headers, amount_minor=1, order_id=big["id"]),
        409,
        "refund-exceeds-payment",
    )
    payment = await payment_row(runtime, payment_id)
    # The cancellation owed 1,200 with 900 left: it refunded 900 and flagged it.
    assert (payment.refunded_minor, payment.flag) == (1200, "refund_exceeds")
    assert (await ledger_check(runtime)).balanced
