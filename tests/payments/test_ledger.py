"""The ledger on SQLite and PostgreSQL: captures split into seller shares and commission,
refunds reversing the commission at the capture's rate and never exceeding the capture,
payouts within the balance, idempotent postings, and the balance check."""

from __future__ import annotations

import io
import uuid
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy import func, insert, select

from soko.payments import ledger, ledger_cli
from soko.payments.ledger import SellerShare
from soko.payments.ledger_cli import verify_command
from soko.payments.ledger_errors import (
    CommissionRateInvalid,
    LedgerUnbalanced,
    PayoutAlreadyRecorded,
    PayoutExceedsBalance,
    RefundExceedsCapture,
)
from soko.payments.ledger_models import (
    LedgerAccount,
    LedgerEntry,
    LedgerTransaction,
    Payout,
    TransactionKind,
)
from soko.platform.ids import uuid7
from soko.platform.money import UnknownCurrencyError
from soko.platform.runtime import Runtime

KES = "KES"


# -- pure rules ------------------------------------------------------------------------------


def test_commission_is_rounded_down_in_the_sellers_favour() -> None:
    assert ledger.commission_of(10_000, 1000) == 1000
    assert ledger.commission_of(999, 1000) == 99
    assert ledger.commission_of(1, 9999) == 0
    assert ledger.commission_of(5000, 10_000) == 5000
    assert ledger.commission_of(5000, 0) == 0


def test_a_check_is_balanced_only_with_no_unbalanced_transaction_and_a_zero_trial() -> None:
    sound = ledger.LedgerCheck((), False, {KES: 0}, 4, 0.0)
    assert sound.balanced
    assert not ledger.LedgerCheck((uuid7(),), False, {KES: 0}, 4, 0.0).balanced
    assert not ledger.LedgerCheck((), False, {KES: 5}, 4, 0.0).balanced


# -- helpers ---------------------------------------------------------------------------------


async def capture(
    runtime: Runtime,
    *shares: tuple[uuid.UUID, uuid.UUID, int],
    amount: int | None = None,
    payment_id: uuid.UUID | None = None,
    currency: str = KES,
) -> tuple[uuid.UUID, uuid.UUID]:
    payment_id = payment_id or uuid7()
    gross = sum(share[2] for share in shares)
    async with runtime.db.transaction() as session:
        transaction_id = await ledger.post_capture(
            session,
            runtime,
            payment_id=payment_id,
            provider="sandbox",
            currency=currency,
            amount_minor=gross if amount is None else amount,
            shares=[SellerShare(seller, order, value) for seller, order, value in shares],
        )
    return payment_id, transaction_id


async def refund(
    runtime: Runtime,
    payment_id: uuid.UUID,
    amount: int,
    *,
    order_id: uuid.UUID | None = None,
    seller_id: uuid.UUID | None = None,
    refund_id: uuid.UUID | None = None,
    currency: str = KES,
) -> uuid.UUID:
    async with runtime.db.transaction() as session:
        return await ledger.post_refund(
            session,
            runtime,
            refund_id=refund_id or uuid7(),
            payment_id=payment_id,
            provider="sandbox",
            currency=currency,
            amount_minor=amount,
            order_id=order_id,
            seller_id=seller_id,
        )


async def balance(runtime: Runtime, seller_id: uuid.UUID) -> dict[str, int]:
    async with runtime.db.transaction(read_only=True) as session:
        return await ledger.seller_balance(session, seller_id)


async def account_balance(runtime: Runtime, code: str, currency: str = KES) -> int:
    async with runtime.db.transaction(read_only=True) as session:
        total = await session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount_minor), 0))
            .join(LedgerAccount, LedgerAccount.id == LedgerEntry.account_id)
            .where(LedgerAccount.code == code, LedgerAccount.currency == currency)
        )
    return int(total or 0)


async def check(runtime: Runtime) -> ledger.LedgerCheck:
    async with runtime.db.transaction(read_only=True) as session:
        return await ledger.verify_ledger(session)


async def count(runtime: Runtime, model: Any) -> int:
    async with runtime.db.transaction(read_only=True) as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def set_rate(runtime: Runtime, seller_id: uuid.UUID, rate: int | None) -> None:
    async with runtime.db.transaction() as session:
        await ledger.set_commission_rate(
            session, runtime, seller_id=seller_id, rate_bps=rate, actor_id=None
        )


async def payout(
    runtime: Runtime, seller_id: uuid.UUID, amount: int, reference: str | None = None
) -> ledger.PayoutRecord:
    async with runtime.db.transaction() as session:
        return await ledger.record_payout(
            session,
            runtime,
            seller_id=seller_id,
            amount_minor=amount,
            currency=KES,
            reference=reference or f"bank-{uuid.uuid4().hex[:8]}",
            actor_id=None,
        )


# -- captures --------------------------------------------------------------------------------


async def test_a_capture_splits_the_payment_between_sellers_commission_and_suspense(
    runtime: Runtime,
) -> None:
    seller_a, seller_b = uuid7(), uuid7()
    order_a, order_b = uuid7(), uuid7()
    await set_rate(runtime, seller_b, 250)
    payment_id, transaction_id = await capture(
        runtime, (seller_a, order_a, 10_000), (seller_b, order_b, 4_000), amount=14_500
    )
    assert await balance(runtime, seller_a) == {KES: 9_000}  # default 10 %
    assert await balance(runtime, seller_b) == {KES: 3_900}  # 2.5 %
    assert await account_balance(runtime, ledger.REVENUE) == -1_100
    assert await account_balance(runtime, ledger.SUSPENSE) == -500
    assert await account_balance(runtime, ledger.clearing_code("sandbox")) == 14_500
    async with runtime.db.transaction(read_only=True) as session:
        rates = set(
            (
                await session.scalars(
                    select(LedgerEntry.rate_bps).where(
                        LedgerEntry.transaction_id == transaction_id,
                        LedgerEntry.order_id == order_b,
                    )
                )
            ).all()
        )
        payments = set(
            (
                await session.scalars(
                    select(LedgerEntry.payment_id).where(
                        LedgerEntry.transaction_id == transaction_id
                    )
                )
            ).all()
        )
    assert rates == {250}
    assert payments == {payment_id}
    result = await check(runtime)
    assert result.balanced and result.entries == 6 and result.trial_balance == {KES: 0}


async def test_a_capture_is_posted_once_per_payment(runtime: Runtime) -> None:
    seller, order = uuid7(), uuid7()
    payment_id, first = await capture(runtime, (seller, order, 1000))
    entries = await count(runtime, LedgerEntry)
    _, again = await capture(runtime, (seller, order, 1000), payment_id=payment_id)
    assert again == first
    assert await count(runtime, LedgerEntry) == entries
    assert await balance(runtime, seller) == {KES: 900}


async def test_a_capture_that_lost_the_race_returns_the_winners_transaction(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The duplicate was committed after this capture looked for it: the unique
    violation is caught in a savepoint and the rest of the transaction survives."""
    seller, order = uuid7(), uuid7()
    payment_id, first = await capture(runtime, (seller, order, 1000))
    entries = await count(runtime, LedgerEntry)

    real = ledger._existing_transaction
    calls = 0

    async def late(session: Any, kind: TransactionKind, reference: str) -> uuid.UUID | None:
        nonlocal calls
        if kind is TransactionKind.capture:
            calls += 1
            if calls == 1:
                return None  # as if the other capture had not committed yet
        return await real(session, kind, reference)

    monkeypatch.setattr(ledger, "_existing_transaction", late)
    async with runtime.db.transaction() as session:
        again = await ledger.post_capture(
            session,
            runtime,
            payment_id=payment_id,
            provider="sandbox",
            currency=KES,
            amount_minor=1000,
            shares=[SellerShare(seller, order, 1000)],
        )
        # The transaction is still usable after the savepoint rolled back.
        await ledger.post_adjustment(
            session,
            runtime,
            seller_id=seller,
            amount_minor=5,
            currency=KES,
            reference="after-the-race",
            memo="still writable",
            actor_id=None,
        )
    assert again == first
    assert calls == 2
    assert await count(runtime, LedgerEntry) == entries + 2
    assert await balance(runtime, seller) == {KES: 905}


async def test_a_capture_refuses_shares_beyond_the_payment_and_unknown_currencies(
    runtime: Runtime,
) -> None:
    with pytest.raises(ValueError, match="exceed"):
        await capture(runtime, (uuid7(), uuid7(), 1000), amount=999)
    with pytest.raises(ValueError):
        await capture(runtime, amount=0)
    with pytest.raises(UnknownCurrencyError):
        await capture(runtime, (uuid7(), uuid7(), 1000), currency="XXZ")
    assert await count(runtime, LedgerTransaction) == 0


async def test_a_commission_change_applies_to_later_captures_only(runtime: Runtime) -> None:
    seller = uuid7()
    first_order, second_order = uuid7(), uuid7()
    first_payment, _ = await capture(runtime, (seller, first_order, 10_000))
    await set_rate(runtime, seller, 2000)
    await capture(runtime, (seller, second_order, 10_000))
    assert await balance(runtime, seller) == {KES: 9_000 + 8_000}
    # Refunding the first order in full reverses the 10 % it took, not today's 20 %.
    await refund(runtime, first_payment, 10_000, order_id=first_order, seller_id=seller)
    assert await balance(runtime, seller) == {KES: 8_000}
    assert await account_balance(runtime, ledger.REVENUE) == -2_000
    await set_rate(runtime, seller, None)
    async with runtime.db.transaction(read_only=True) as session:
        setting = await ledger.commission_rate_for(session, runtime, seller)
    assert (setting.rate_bps, setting.overridden) == (runtime.settings.commission_bps, False)
    assert (await check(runtime)).balanced


async def test_a_commission_rate_must_be_in_range(runtime: Runtime) -> None:
    for bad in (-1, 10_001):
        with pytest.raises(CommissionRateInvalid):
            await set_rate(runtime, uuid7(), bad)
    seller = uuid7()
    await set_rate(runtime, seller, 10_000)
    await set_rate(runtime, seller, 0)
    async with runtime.db.transaction(read_only=True) as session:
        setting = await ledger.commission_rate_for(session, runtime, seller)
    assert (setting.rate_bps, setting.overridden) == (0, True)


# -- refunds ---------------------------------------------------------------------------------


async def test_partial_refunds_reverse_exactly_the_commission_of_a_full_refund(
    runtime: Runtime,
) -> None:
    seller, order = uuid7(), uuid7()
    await set_rate(runtime, seller, 333)  # 3.33 %: the parts do not divide evenly
    payment_id, _ = await capture(runtime, (seller, order, 1001))
    assert await balance(runtime, seller) == {KES: 1001 - 33}
    for part in (1, 500, 498):
        await refund(runtime, payment_id, part, order_id=order, seller_id=seller)
    # 1 + 500 + 498 = 999 of 1001 refunded: commission reversed is floor(33 * 999 / 1001).
    assert await account_balance(runtime, ledger.REVENUE) == -33 + 32
    with pytest.raises(RefundExceedsCapture) as refused:
        await refund(runtime, payment_id, 3, order_id=order, seller_id=seller)
    assert refused.value.extensions["refundable_minor"] == 2
    await refund(runtime, payment_id, 2, order_id=order, seller_id=seller)
    assert await balance(runtime, seller) == {KES: 0}
    assert await account_balance(runtime, ledger.REVENUE) == 0
    assert await account_balance(runtime, ledger.clearing_code("sandbox")) == 0
    with pytest.raises(RefundExceedsCapture):
        await refund(runtime, payment_id, 1, order_id=order, seller_id=seller)
    assert (await check(runtime)).balanced


async def test_refunds_of_one_order_do_not_touch_another_sellers_share(runtime: Runtime) -> None:
    seller_a, seller_b = uuid7(), uuid7()
    order_a, order_b = uuid7(), uuid7()
    payment_id, _ = await capture(runtime, (seller_a, order_a, 3000), (seller_b, order_b, 2000))
    with pytest.raises(RefundExceedsCapture) as refused:
        await refund(runtime, payment_id, 2001, order_id=order_b, seller_id=seller_b)
    assert refused.value.extensions["refundable_minor"] == 2000
    await refund(runtime, payment_id, 2000, order_id=order_b, seller_id=seller_b)
    assert await balance(runtime, seller_a) == {KES: 2700}
    assert await balance(runtime, seller_b) == {KES: 0}
    # Naming another seller than the order's is a caller's bug, refused.
    with pytest.raises(ValueError, match="another seller"):
        await refund(runtime, payment_id, 10, order_id=order_a, seller_id=seller_b)


async def test_a_refund_is_posted_once_per_refund_id(runtime: Runtime) -> None:
    seller, order = uuid7(), uuid7()
    payment_id, _ = await capture(runtime, (seller, order, 1000))
    refund_id = uuid7()
    first = await refund(
        runtime, payment_id, 1000, order_id=order, seller_id=seller, refund_id=refund_id
    )
    # The whole order is refunded: a second refund would be refused, the same one is not.
    again = await refund(
        runtime, payment_id, 1000, order_id=order, seller_id=seller, refund_id=refund_id
    )
    assert again == first
    assert await balance(runtime, seller) == {KES: 0}


async def test_suspense_refunds_stay_within_the_suspense_part_of_their_payment(
    runtime: Runtime,
) -> None:
    seller, order = uuid7(), uuid7()
    duplicate, _ = await capture(runtime, amount=2500)  # no order owes any of it
    mixed, _ = await capture(runtime, (seller, order, 1000), amount=1200)
    with pytest.raises(RefundExceedsCapture) as refused:
        await refund(runtime, mixed, 201)
    assert refused.value.extensions["refundable_minor"] == 200
    await refund(runtime, mixed, 200)
    await refund(runtime, duplicate, 2000)
    with pytest.raises(RefundExceedsCapture):
        await refund(runtime, duplicate, 501)
    await refund(runtime, duplicate, 500)
    assert await account_balance(runtime, ledger.SUSPENSE) == 0
    assert await balance(runtime, seller) == {KES: 900}
    assert (await check(runtime)).balanced


async def test_a_refund_in_another_currency_or_of_an_unknown_payment_is_refused(
    runtime: Runtime,
) -> None:
    seller, order = uuid7(), uuid7()
    payment_id, _ = await capture(runtime, (seller, order, 1000))
    with pytest.raises(RefundExceedsCapture):
        await refund(runtime, payment_id, 10, order_id=order, seller_id=seller, currency="NGN")
    with pytest.raises(RefundExceedsCapture):
        await refund(runtime, uuid7(), 10, order_id=order, seller_id=seller)
    with pytest.raises(ValueError):
        await refund(runtime, payment_id, 10, seller_id=seller)  # no order named
    assert await balance(runtime, seller) == {KES: 900}


async def test_a_refund_after_a_payout_takes_the_balance_below_zero(runtime: Runtime) -> None:
    seller, order = uuid7(), uuid7()
    payment_id, _ = await capture(runtime, (seller, order, 1000))
    await payout(runtime, seller, 900)
    await refund(runtime, payment_id, 1000, order_id=order, seller_id=seller)
    assert await balance(runtime, seller) == {KES: -900}
    with pytest.raises(PayoutExceedsBalance):
        await payout(runtime, seller, 1)


# -- payouts and adjustments -----------------------------------------------------------------


async def test_payouts_stay_within_the_balance(runtime: Runtime) -> None:
    seller = uuid7()
    await capture(runtime, (seller, uuid7(), 5000))
    with pytest.raises(PayoutExceedsBalance) as refused:
        await payout(runtime, seller, 4501)
    assert refused.value.extensions == {"balance_minor": 4500, "currency": KES}
    first = await payout(runtime, seller, 4000, reference="MPESA-1")
    assert first.balance_after_minor == 500
    with pytest.raises(PayoutAlreadyRecorded) as duplicate:
        await payout(runtime, seller, 100, reference="MPESA-1")
    assert duplicate.value.extensions["payout_id"] == str(first.id)
    last = await payout(runtime, seller, 500, reference="MPESA-2")
    assert last.balance_after_minor == 0
    assert await balance(runtime, seller) == {KES: 0}
    assert await account_balance(runtime, ledger.PAYOUTS_SENT) == -4500
    assert await count(runtime, Payout) == 2
    async with runtime.db.transaction(read_only=True) as session:
        kinds = (
            await session.scalars(
                select(LedgerTransaction.kind).where(
                    LedgerTransaction.id.in_([first.transaction_id, last.transaction_id])
                )
            )
        ).all()
    assert set(kinds) == {TransactionKind.payout.value}
    assert (await check(runtime)).balanced


async def test_a_payout_needs_a_positive_amount_and_a_reference(runtime: Runtime) -> None:
    seller = uuid7()
    await capture(runtime, (seller, uuid7(), 5000))
    with pytest.raises(ValueError):
        await payout(runtime, seller, 0)
    with pytest.raises(ValueError):
        await payout(runtime, seller, 10, reference="   ")


async def test_an_adjustment_moves_a_balance_either_way_once_per_reference(
    runtime: Runtime,
) -> None:
    seller = uuid7()

    async def adjust(amount: int, reference: str) -> uuid.UUID:
        async with runtime.db.transaction() as session:
            return await ledger.post_adjustment(
                session,
                runtime,
                seller_id=seller,
                amount_minor=amount,
                currency=KES,
                reference=reference,
                memo="goodwill",
                actor_id=uuid7(),
            )

    first = await adjust(700, "case-1")
    assert await adjust(700, "case-1") == first
    await adjust(-1000, "case-2")
    assert await balance(runtime, seller) == {KES: -300}
    with pytest.raises(ValueError):
        await adjust(0, "case-3")
    assert (await check(runtime)).balanced


async def test_balances_are_kept_per_currency(runtime: Runtime) -> None:
    seller = uuid7()
    await capture(runtime, (seller, uuid7(), 1000))
    await capture(runtime, (seller, uuid7(), 2000), currency="NGN")
    assert await balance(runtime, seller) == {KES: 900, "NGN": 1800}
    result = await check(runtime)
    assert result.trial_balance == {KES: 0, "NGN": 0}
    assert await balance(runtime, uuid7()) == {}


async def test_the_seller_history_lists_the_effect_of_each_entry(runtime: Runtime) -> None:
    seller, order = uuid7(), uuid7()
    payment_id, _ = await capture(runtime, (seller, order, 1000))
    await refund(runtime, payment_id, 400, order_id=order, seller_id=seller)
    async with runtime.db.transaction(read_only=True) as session:
        rows = (
            await session.execute(
                ledger.seller_history(seller).order_by(
                    LedgerEntry.created_at.desc(), LedgerEntry.id.desc()
                )
            )
        ).all()
    assert [(row.kind, row.effect_minor) for row in rows] == [("refund", -360), ("capture", 900)]
    assert rows[1].rate_bps == 1000 and rows[1].order_id == order


# -- the balance check -----------------------------------------------------------------------


async def test_an_unbalanced_posting_is_refused_before_anything_is_written(
    runtime: Runtime,
) -> None:
    async with runtime.db.transaction() as session:
        accounts = await ledger._account_ids(session, runtime, KES, [ledger._REVENUE])
        with pytest.raises(LedgerUnbalanced):
            await ledger._post(
                session,
                runtime,
                kind=TransactionKind.adjustment,
                reference="lopsided",
                currency=KES,
                lines=[ledger._Line(accounts[ledger.REVENUE], 5)],
            )
    assert await count(runtime, LedgerTransaction) == 0


async def test_the_check_finds_a_transaction_that_does_not_balance(runtime: Runtime) -> None:
    seller, order = uuid7(), uuid7()
    _, transaction_id = await capture(runtime, (seller, order, 1000))
    assert (await check(runtime)).balanced
    async with runtime.db.transaction() as session:
        account_id = await session.scalar(select(LedgerAccount.id).limit(1))
        # Written behind the ledger's back: what the check exists to catch.
        await session.execute(
            insert(LedgerEntry).values(
                id=uuid7(),
                transaction_id=transaction_id,
                account_id=account_id,
                amount_minor=7,
                currency=KES,
                created_at=runtime.clock.now(),
            )
        )
    result = await check(runtime)
    assert not result.balanced
    assert result.unbalanced_transaction_ids == (transaction_id,)
    assert result.trial_balance == {KES: 7}
    assert result.entries == 4


# -- soko ledger verify ----------------------------------------------------------------------


async def test_the_verify_command_exits_by_the_verdict(runtime: Runtime) -> None:
    console = Console(file=io.StringIO(), width=120)
    assert await verify_command(runtime, console) == 0  # an empty ledger balances
    seller, order = uuid7(), uuid7()
    _, transaction_id = await capture(runtime, (seller, order, 1000))
    assert await verify_command(runtime, console) == 0
    async with runtime.db.transaction() as session:
        account_id = await session.scalar(select(LedgerAccount.id).limit(1))
        await session.execute(
            insert(LedgerEntry).values(
                id=uuid7(),
                transaction_id=transaction_id,
                account_id=account_id,
                amount_minor=-3,
                currency=KES,
                created_at=runtime.clock.now(),
            )
        )
    assert await verify_command(runtime, console) == 1
    printed = console.file.getvalue()  # type: ignore[attr-defined]
    assert "The ledger balances." in printed
    assert "The ledger does not balance." in printed
    assert f"unbalanced transaction {transaction_id}" in printed
    assert "KES" in printed and "-3" in printed


def test_the_ledger_command_group_runs_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    calls: list[Runtime] = []

    async def fake_verify(runtime: Runtime, console: Any = None) -> int:
        calls.append(runtime)
        return 1

    monkeypatch.setattr(ledger_cli, "verify_command", fake_verify)
    result = CliRunner().invoke(ledger_cli.ledger_commands(), ["verify"])
    assert result.exit_code == 1, result.output
    assert len(calls) == 1
