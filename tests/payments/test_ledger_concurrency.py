"""Races on PostgreSQL, where transactions truly run at once: payouts racing on one
balance never overdraw it, refunds racing on one order never exceed its capture, and a
payment, or a refund, posted by several transactions at once is posted once.

Each racer opens its own transaction and touches the database first, then all are
released together, so they overlap inside the ledger's code."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from soko.payments import ledger
from soko.payments.ledger import SellerShare
from soko.payments.ledger_errors import (
    PayoutAlreadyRecorded,
    PayoutExceedsBalance,
    RefundExceedsCapture,
)
from soko.payments.ledger_models import LedgerAccount, LedgerEntry, LedgerTransaction, Payout
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime

pytestmark = pytest.mark.parametrize(
    "backend", [pytest.param("postgresql", marks=pytest.mark.postgresql)], indirect=True
)

T = TypeVar("T")
KES = "KES"
RACERS = 8


async def race(
    runtime: Runtime, work: Callable[[AsyncSession, int], Awaitable[T]]
) -> list[T | BaseException]:
    """Run ``work`` in ``RACERS`` transactions at once; each result or its exception."""
    ready = 0
    go = asyncio.Event()

    async def racer(index: int) -> T:
        nonlocal ready
        async with runtime.db.transaction() as session:
            await session.execute(text("SELECT 1"))  # the transaction has begun
            ready += 1
            if ready == RACERS:
                go.set()
            await go.wait()
            return await work(session, index)

    return list(
        await asyncio.gather(*(racer(index) for index in range(RACERS)), return_exceptions=True)
    )


async def capture(
    runtime: Runtime, seller_id: uuid.UUID, gross: int
) -> tuple[uuid.UUID, uuid.UUID]:
    payment_id, order_id = uuid7(), uuid7()
    async with runtime.db.transaction() as session:
        await ledger.post_capture(
            session,
            runtime,
            payment_id=payment_id,
            provider="sandbox",
            currency=KES,
            amount_minor=gross,
            shares=[SellerShare(seller_id, order_id, gross)],
        )
    return payment_id, order_id


async def scalar(runtime: Runtime, statement: Any) -> Any:
    async with runtime.db.transaction(read_only=True) as session:
        return await session.scalar(statement)


async def balance(runtime: Runtime, seller_id: uuid.UUID) -> int:
    async with runtime.db.transaction(read_only=True) as session:
        return (await ledger.seller_balance(session, seller_id)).get(KES, 0)


async def test_payouts_racing_on_one_balance_never_overdraw_it(runtime: Runtime) -> None:
    seller = uuid7()
    await capture(runtime, seller, 10_000)  # 9 000 owed: three payouts of 3 000 fit

    async def pay(session: AsyncSession, index: int) -> ledger.PayoutRecord:
        return await ledger.record_payout(
            session,
            runtime,
            seller_id=seller,
            amount_minor=3_000,
            currency=KES,
            reference=f"transfer-{index}",
            actor_id=None,
        )

    results = await race(runtime, pay)
    paid = [result for result in results if isinstance(result, ledger.PayoutRecord)]
    refused = [result for result in results if isinstance(result, PayoutExceedsBalance)]
    assert len(paid) == 3 and len(refused) == RACERS - 3, results
    assert sorted(record.balance_after_minor for record in paid) == [0, 3_000, 6_000]
    assert await balance(runtime, seller) == 0
    assert await scalar(runtime, select(func.count()).select_from(Payout)) == 3


async def test_the_same_payout_recorded_at_once_is_recorded_once(runtime: Runtime) -> None:
    seller = uuid7()
    await capture(runtime, seller, 100_000)
    # An earlier payout: every account exists, so nothing but the ledger's lock orders
    # the racers.
    async with runtime.db.transaction() as session:
        await ledger.record_payout(
            session,
            runtime,
            seller_id=seller,
            amount_minor=500,
            currency=KES,
            reference="MPESA-41",
            actor_id=None,
        )

    async def pay(session: AsyncSession, _index: int) -> ledger.PayoutRecord:
        return await ledger.record_payout(
            session,
            runtime,
            seller_id=seller,
            amount_minor=1_000,
            currency=KES,
            reference="MPESA-42",
            actor_id=None,
        )

    results = await race(runtime, pay)
    assert sum(isinstance(result, ledger.PayoutRecord) for result in results) == 1, results
    assert sum(isinstance(result, PayoutAlreadyRecorded) for result in results) == RACERS - 1
    assert await balance(runtime, seller) == 90_000 - 500 - 1_000


async def test_a_payment_captured_at_once_by_several_transactions_is_posted_once(
    runtime: Runtime,
) -> None:
    seller, order, payment_id = uuid7(), uuid7(), uuid7()

    async def post(session: AsyncSession, _index: int) -> uuid.UUID:
        return await ledger.post_capture(
            session,
            runtime,
            payment_id=payment_id,
            provider="sandbox",
            currency=KES,
            amount_minor=5_000,
            shares=[SellerShare(seller, order, 5_000)],
        )

    results = await race(runtime, post)
    assert all(isinstance(result, uuid.UUID) for result in results), results
    assert len(set(results)) == 1
    assert await scalar(runtime, select(func.count()).select_from(LedgerTransaction)) == 1
    assert await scalar(runtime, select(func.count()).select_from(LedgerEntry)) == 3
    assert await balance(runtime, seller) == 4_500


async def test_captures_creating_the_same_new_accounts_at_once_share_them(
    runtime: Runtime,
) -> None:
    sellers = [uuid7(), uuid7()]

    async def post(session: AsyncSession, index: int) -> uuid.UUID:
        # Half the racers name the sellers in one order, half in the other.
        named = sellers if index % 2 else list(reversed(sellers))
        return await ledger.post_capture(
            session,
            runtime,
            payment_id=uuid7(),
            provider="sandbox",
            currency=KES,
            amount_minor=2_000,
            shares=[SellerShare(seller, uuid7(), 1_000) for seller in named],
        )

    results = await race(runtime, post)
    assert all(isinstance(result, uuid.UUID) for result in results), results
    # clearing, revenue and the two sellers: one account each.
    assert await scalar(runtime, select(func.count()).select_from(LedgerAccount)) == 4
    for seller in sellers:
        assert await balance(runtime, seller) == RACERS * 900


async def test_refunds_racing_on_one_order_never_exceed_its_capture(runtime: Runtime) -> None:
    seller = uuid7()
    payment_id, order_id = await capture(runtime, seller, 10_000)

    async def give_back(session: AsyncSession, _index: int) -> uuid.UUID:
        return await ledger.post_refund(
            session,
            runtime,
            refund_id=uuid7(),
            payment_id=payment_id,
            provider="sandbox",
            currency=KES,
            amount_minor=4_000,
            order_id=order_id,
            seller_id=seller,
        )

    results = await race(runtime, give_back)
    assert sum(isinstance(result, uuid.UUID) for result in results) == 2, results
    assert sum(isinstance(result, RefundExceedsCapture) for result in results) == RACERS - 2
    assert await balance(runtime, seller) == 9_000 - 2 * 3_600
    async with runtime.db.transaction(read_only=True) as session:
        check = await ledger.verify_ledger(session)
    assert check.balanced


async def test_one_refund_posted_at_once_by_several_jobs_is_posted_once(
    runtime: Runtime,
) -> None:
    seller = uuid7()
    payment_id, order_id = await capture(runtime, seller, 10_000)
    refund_id = uuid7()

    async def give_back(session: AsyncSession, _index: int) -> uuid.UUID:
        return await ledger.post_refund(
            session,
            runtime,
            refund_id=refund_id,
            payment_id=payment_id,
            provider="sandbox",
            currency=KES,
            amount_minor=10_000,
            order_id=order_id,
            seller_id=seller,
        )

    results = await race(runtime, give_back)
    assert all(isinstance(result, uuid.UUID) for result in results), results
    assert len(set(results)) == 1
    assert await balance(runtime, seller) == 0
