# ruff: noqa: F401, F811
# (pytest fixtures are imported from test_pay_support and named as parameters)
"""Reconciliation on SQLite and PostgreSQL: payments left open past the threshold are
asked about at their provider and settled like a webhook would; mismatches are flagged;
the payments desk lists and filters them."""

from __future__ import annotations

import datetime as dt
import uuid

import httpx2
from sqlalchemy import select, update

from soko.identity.models import Role
from soko.payments.payment_models import Payment
from soko.payments.providers.base import ProviderStatus
from soko.payments.reconciliation import RECONCILE_PAYMENT_JOB, queue_stale_payments
from soko.platform.clock import ManualClock
from soko.platform.jobs import registry
from soko.platform.outbox import OutboxMessage
from soko.platform.runtime import Runtime
from tests.identity.conftest import MakeUser
from tests.orders.conftest import ADMIN, refused
from tests.payments.test_pay_support import (
    FakeProvider,
    PlaceOrder,
    balance,
    fake,
    ledger_check,
    make_buyer,
    make_user,
    market,
    ok,
    order_status,
    payment_row,
    place_order,
    run_jobs,
    start_payment,
)

PAST_THRESHOLD = dt.timedelta(minutes=16)


def test_reconciliation_runs_every_five_minutes() -> None:
    assert registry.schedules["payments.reconcile"].cron == "*/5 * * * *"


async def test_a_payment_whose_webhook_never_came_is_settled_by_reconciliation(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    fake: FakeProvider,
    place_order: PlaceOrder,
) -> None:
    placed = await place_order(quantity=2)
    paid = uuid.UUID((await start_payment(client, placed))["id"])
    fake.settle(paid, ProviderStatus.succeeded)  # ...and its webhook is lost

    clock.advance(dt.timedelta(minutes=5))
    await run_jobs(runtime)
    assert (await payment_row(runtime, paid)).status == "pending"  # not yet due

    clock.advance(PAST_THRESHOLD)
    await run_jobs(runtime)
    await placed.sign_in_again(runtime)
    assert (await payment_row(runtime, paid)).status == "succeeded"
    assert await order_status(client, placed) == "paid"
    assert await balance(runtime, placed.shop.seller_id) == {"KES": 2700}
    assert (await ledger_check(runtime)).balanced


async def test_reconciliation_leaves_open_payments_open_and_flags_mismatches(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    fake: FakeProvider,
    place_order: PlaceOrder,
    make_user: MakeUser,
) -> None:
    still_open = await place_order()
    lying = await place_order()
    abandoned = await place_order()
    open_id = uuid.UUID((await start_payment(client, still_open))["id"])
    lying_id = uuid.UUID((await start_payment(client, lying))["id"])
    abandoned_id = uuid.UUID((await start_payment(client, abandoned))["id"])
    fake.settle(lying_id, ProviderStatus.succeeded, amount_minor=1)
    fake.settle(abandoned_id, ProviderStatus.abandoned)
    fetched_before = fake.fetches

    clock.advance(PAST_THRESHOLD)
    await run_jobs(runtime)
    assert fake.fetches - fetched_before == 3
    rows = {p: await payment_row(runtime, p) for p in (open_id, lying_id, abandoned_id)}
    assert (rows[open_id].status, rows[open_id].flag) == ("pending", None)
    assert (rows[lying_id].status, rows[lying_id].flag) == ("pending", "amount_mismatch")
    assert rows[abandoned_id].status == "abandoned"

    # The open one is looked at again only after another threshold.
    clock.advance(dt.timedelta(minutes=5))
    await run_jobs(runtime)
    assert fake.fetches - fetched_before == 3

    admin = await make_user(Role.admin)
    desk = f"{ADMIN}/payments"
    flagged = ok(await client.get(desk, params={"flagged": "true"}, headers=admin.headers))
    assert [item["id"] for item in flagged["items"]] == [str(lying_id)]
    assert flagged["items"][0]["flag_detail"].startswith("provider reports 1 KES")
    pending = ok(
        await client.get(desk, params={"status": "pending", "limit": 1}, headers=admin.headers)
    )
    assert len(pending["items"]) == 1 and pending["next_cursor"]
    rest = ok(
        await client.get(
            desk,
            params={"status": "pending", "limit": 1, "cursor": pending["next_cursor"]},
            headers=admin.headers,
        )
    )
    assert {pending["items"][0]["id"], rest["items"][0]["id"]} == {str(open_id), str(lying_id)}
    assert "next_action_client_secret" not in rest["items"][0]
    buyer = still_open.buyer
    await still_open.sign_in_again(runtime)
    refused(await client.get(desk, headers=still_open.buyer.headers), 403, "forbidden")
    assert buyer.user_id == still_open.buyer.user_id


async def test_a_payment_never_started_at_the_provider_is_abandoned(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    fake: FakeProvider,
    place_order: PlaceOrder,
) -> None:
    placed = await place_order()
    now = clock.now()
    async with runtime.db.transaction() as session:
        # Stored, and then the process stopped before the provider was asked.
        payment = Payment(
            group_id=placed.group_id,
            buyer_id=placed.buyer.user_id,
            provider="fake",
            status="created",
            amount_minor=3000,
            currency="KES",
            created_at=now,
            updated_at=now,
        )
        session.add(payment)
        await session.flush()
        payment_id = payment.id
    clock.advance(PAST_THRESHOLD)
    await run_jobs(runtime)
    row = await payment_row(runtime, payment_id)
    assert (row.status, row.failure_reason) == ("abandoned", "never started at the provider")


async def test_a_provider_outage_leaves_payments_for_the_next_run(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    fake: FakeProvider,
    place_order: PlaceOrder,
) -> None:
    placed = await place_order()
    payment_id = uuid.UUID((await start_payment(client, placed))["id"])
    fake.settle(payment_id, ProviderStatus.succeeded)
    fake.down = True
    clock.advance(PAST_THRESHOLD)
    await run_jobs(runtime)
    assert (await payment_row(runtime, payment_id)).status == "pending"
    fake.down = False
    clock.advance(dt.timedelta(minutes=5))
    await run_jobs(runtime)
    assert (await payment_row(runtime, payment_id)).status == "succeeded"


async def _reconcile_jobs(runtime: Runtime) -> list[tuple[str, str]]:
    async with runtime.db.transaction(read_only=True) as session:
        rows = await session.execute(
            select(OutboxMessage.payload, OutboxMessage.status)
            .where(OutboxMessage.name == RECONCILE_PAYMENT_JOB)
            .order_by(OutboxMessage.created_at, OutboxMessage.id)
        )
        return [(row.payload["payment_id"], row.status) for row in rows]


async def test_each_stale_payment_is_asked_about_in_a_job_of_its_own(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    fake: FakeProvider,
    place_order: PlaceOrder,
) -> None:
    """A job's transaction waits for one provider call, and what one settlement locks
    is not held while the provider is asked about another payment."""
    first, second = await place_order(), await place_order()
    ids = [uuid.UUID((await start_payment(client, placed))["id"]) for placed in (first, second)]
    for payment_id in ids:
        fake.settle(payment_id, ProviderStatus.succeeded)
    fetched_before = fake.fetches
    clock.advance(PAST_THRESHOLD)
    await run_jobs(runtime)
    assert sorted(await _reconcile_jobs(runtime)) == sorted((str(p), "done") for p in ids)
    assert fake.fetches - fetched_before == 2
    assert [(await payment_row(runtime, p)).status for p in ids] == ["succeeded"] * 2


async def test_a_payment_settled_before_its_job_runs_is_not_asked_about(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    fake: FakeProvider,
    place_order: PlaceOrder,
) -> None:
    placed = await place_order()
    payment_id = uuid.UUID((await start_payment(client, placed))["id"])
    clock.advance(PAST_THRESHOLD)
    async with runtime.db.transaction() as session:
        assert await queue_stale_payments(session, runtime, "run-1") == 1
        # The same run queues it once; a later run again.
        assert await queue_stale_payments(session, runtime, "run-1") == 0
        assert await queue_stale_payments(session, runtime, "run-2") == 1
    assert [job for job, _status in await _reconcile_jobs(runtime)] == [str(payment_id)] * 2
    # Its webhook arrives first, say: the payment is no longer stale.
    async with runtime.db.transaction() as session:
        await session.execute(
            update(Payment).where(Payment.id == payment_id).values(updated_at=clock.now())
        )
    fetched_before = fake.fetches
    await run_jobs(runtime)
    assert fake.fetches == fetched_before
    assert [status for _job, status in await _reconcile_jobs(runtime)] == ["done", "done"]
