"""Random money movements through the ledger, checked against a model after every step.

Hypothesis drives payments split across several sellers (with a part no order owes, for
suspense), refunds of orders and of suspense, full or partial and sometimes beyond what
remains, payouts sometimes beyond the balance, commission changes, and duplicate
postings. After every step:

* every transaction balances and the trial balance is zero per currency;
* no order has been refunded more than was captured for it;
* each seller's balance equals what the test computes on its own: per order the gross
  less its commission, less the refunded part net of the commission given back
  (``C * R // G``), less the seller's payouts;
* the commission, suspense and clearing accounts hold what the model says.

Refusals must happen exactly when the model says the limit would be passed, and change
nothing. Hypothesis runs the machine synchronously, so the test owns an event loop.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import delete, func, select

from soko.payments import ledger
from soko.payments.ledger import SellerShare
from soko.payments.ledger_errors import PayoutExceedsBalance, RefundExceedsCapture
from soko.payments.ledger_models import (
    CommissionRate,
    LedgerAccount,
    LedgerEntry,
    LedgerTransaction,
    Payout,
)
from soko.platform.clock import ManualClock
from soko.platform.config import Settings
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime

T = TypeVar("T")
KES = "KES"
PROVIDER = "sandbox"
SELLERS = 3


@dataclass
class OrderModel:
    seller: int
    payment_id: uuid.UUID
    gross: int
    commission: int
    refunded: int = 0

    @property
    def commission_back(self) -> int:
        return self.commission * self.refunded // self.gross if self.gross else 0

    @property
    def seller_net(self) -> int:
        return (self.gross - self.commission) - (self.refunded - self.commission_back)


@dataclass
class PaymentModel:
    amount: int
    suspense: int
    suspense_refunded: int = 0
    refunded: int = 0  # everything refunded of it


def make_machine(runner: asyncio.Runner, runtime: Runtime) -> type[Any]:
    def run(coroutine: Coroutine[Any, Any, T]) -> T:
        return runner.run(coroutine)

    class LedgerMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.sellers = [uuid7() for _ in range(SELLERS)]
            self.rates = [runtime.settings.commission_bps] * SELLERS
            self.orders: dict[uuid.UUID, OrderModel] = {}
            self.payments: dict[uuid.UUID, PaymentModel] = {}
            self.payouts = [0] * SELLERS
            self.refund_ids: list[tuple[uuid.UUID, dict[str, Any]]] = []

        @initialize(rates=st.lists(st.integers(0, 10_000), min_size=SELLERS, max_size=SELLERS))
        def empty_ledger(self, rates: list[int]) -> None:
            """An empty ledger, and sellers with their own commission rates."""

            async def wipe() -> None:
                async with runtime.db.transaction() as session:
                    for model in (Payout, LedgerEntry, LedgerTransaction, LedgerAccount):
                        await session.execute(delete(model))
                    await session.execute(delete(CommissionRate))

                    for seller_id, rate in zip(self.sellers, rates, strict=True):
                        await ledger.set_commission_rate(
                            session, runtime, seller_id=seller_id, rate_bps=rate, actor_id=None
                        )

            run(wipe())
            self.rates = list(rates)

        # -- the model ---------------------------------------------------------------------

        def expected_balance(self, seller: int) -> int:
            owed = sum(o.seller_net for o in self.orders.values() if o.seller == seller)
            return owed - self.payouts[seller]

        # -- rules -------------------------------------------------------------------------

        @rule(
            shares=st.lists(
                st.tuples(st.integers(0, SELLERS - 1), st.integers(0, 5000)), max_size=3
            ),
            extra=st.integers(0, 1000),
        )
        def capture(self, shares: list[tuple[int, int]], extra: int) -> None:
            amount = sum(gross for _, gross in shares) + extra
            if amount == 0:
                extra, amount = 1, 1
            payment_id = uuid7()
            orders = [(seller, uuid7(), gross) for seller, gross in shares]

            async def post() -> None:
                async with runtime.db.transaction() as session:
                    await ledger.post_capture(
                        session,
                        runtime,
                        payment_id=payment_id,
                        provider=PROVIDER,
                        currency=KES,
                        amount_minor=amount,
                        shares=[
                            SellerShare(self.sellers[seller], order_id, gross)
                            for seller, order_id, gross in orders
                        ],
                    )

            run(post())
            self.payments[payment_id] = PaymentModel(amount, extra)
            for seller, order_id, gross in orders:
                commission = gross * self.rates[seller] // 10_000
                self.orders[order_id] = OrderModel(seller, payment_id, gross, commission)

        @precondition(lambda self: bool(self.payments))
        @rule(data=st.data())
        def capture_again(self, data: st.DataObject) -> None:
            """A duplicate webhook: the same payment posted again changes nothing."""
            payment_id = data.draw(st.sampled_from(sorted(self.payments)))

            async def post() -> None:
                async with runtime.db.transaction() as session:
                    await ledger.post_capture(
                        session,
                        runtime,
                        payment_id=payment_id,
                        provider=PROVIDER,
                        currency=KES,
                        amount_minor=self.payments[payment_id].amount,
                        shares=[],
                    )

            run(post())

        def _refund(self, refund_id: uuid.UUID, arguments: dict[str, Any]) -> bool:
            async def post() -> bool:
                try:
                    async with runtime.db.transaction() as session:
                        await ledger.post_refund(
                            session,
                            runtime,
                            refund_id=refund_id,
                            provider=PROVIDER,
                            currency=KES,
                            **arguments,
                        )
                except RefundExceedsCapture:
                    return False
                return True

            return run(post())

        @precondition(lambda self: bool(self.orders))
        @rule(data=st.data(), kind=st.sampled_from(["part", "rest", "more"]))
        def refund_order(self, data: st.DataObject, kind: str) -> None:
            order_id = data.draw(st.sampled_from(sorted(self.orders)))
            order = self.orders[order_id]
            remaining = order.gross - order.refunded
            if kind == "part" and remaining > 1:
                amount = data.draw(st.integers(1, remaining - 1), label="part")
            elif kind == "more":
                amount = remaining + data.draw(st.integers(1, 100), label="beyond")
            else:
                amount = max(remaining, 1)
            arguments = {
                "payment_id": order.payment_id,
                "amount_minor": amount,
                "order_id": order_id,
                "seller_id": self.sellers[order.seller],
            }
            refund_id = uuid7()
            allowed = amount <= order.gross - order.refunded
            assert self._refund(refund_id, arguments) is allowed
            if allowed:
                order.refunded += amount
                self.payments[order.payment_id].refunded += amount
                self.refund_ids.append((refund_id, arguments))

        @precondition(lambda self: bool(self.payments))
        @rule(data=st.data(), amount=st.integers(1, 1200))
        def refund_suspense(self, data: st.DataObject, amount: int) -> None:
            payment_id = data.draw(st.sampled_from(sorted(self.payments)))
            payment = self.payments[payment_id]
            arguments = {
                "payment_id": payment_id,
                "amount_minor": amount,
                "order_id": None,
                "seller_id": None,
            }
            refund_id = uuid7()
            allowed = amount <= payment.suspense - payment.suspense_refunded
            assert self._refund(refund_id, arguments) is allowed
            if allowed:
                payment.suspense_refunded += amount
                payment.refunded += amount
                self.refund_ids.append((refund_id, arguments))

        @precondition(lambda self: bool(self.refund_ids))
        @rule(data=st.data())
        def refund_again(self, data: st.DataObject) -> None:
            """A retried refund job: the same refund posted again changes nothing."""
            refund_id, arguments = data.draw(st.sampled_from(self.refund_ids))
            assert self._refund(refund_id, arguments)

        @rule(seller=st.integers(0, SELLERS - 1), amount=st.integers(1, 20_000))
        def payout(self, seller: int, amount: int) -> None:
            if amount % 3 == 0:  # often exactly the balance, the boundary
                amount = max(self.expected_balance(seller), 1)

            async def post() -> bool:
                try:
                    async with runtime.db.transaction() as session:
                        await ledger.record_payout(
                            session,
                            runtime,
                            seller_id=self.sellers[seller],
                            amount_minor=amount,
                            currency=KES,
                            reference=uuid.uuid4().hex,
                            actor_id=None,
                        )
                except PayoutExceedsBalance:
                    return False
                return True

            allowed = amount <= self.expected_balance(seller)
            assert run(post()) is allowed
            if allowed:
                self.payouts[seller] += amount

        @rule(seller=st.integers(0, SELLERS - 1), rate=st.none() | st.integers(0, 10_000))
        def set_rate(self, seller: int, rate: int | None) -> None:
            async def post() -> None:
                async with runtime.db.transaction() as session:
                    await ledger.set_commission_rate(
                        session,
                        runtime,
                        seller_id=self.sellers[seller],
                        rate_bps=rate,
                        actor_id=None,
                    )

            run(post())
            self.rates[seller] = runtime.settings.commission_bps if rate is None else rate

        # -- invariants --------------------------------------------------------------------

        @invariant()
        def books_balance(self) -> None:
            async def read() -> tuple[Any, ...]:
                async with runtime.db.transaction(read_only=True) as session:
                    balances = [await ledger.seller_balance(session, s) for s in self.sellers]
                    check = await ledger.verify_ledger(session)
                    over_refunded = (
                        await session.execute(
                            select(LedgerEntry.order_id)
                            .where(LedgerEntry.order_id.is_not(None))
                            .group_by(LedgerEntry.order_id)
                            .having(func.sum(LedgerEntry.amount_minor) > 0)
                        )
                    ).all()
                    accounts = dict(
                        (
                            await session.execute(
                                select(LedgerAccount.code, func.sum(LedgerEntry.amount_minor))
                                .join(LedgerEntry, LedgerEntry.account_id == LedgerAccount.id)
                                .group_by(LedgerAccount.code)
                            )
                        ).all()
                    )
                totals = {k: int(v) for k, v in accounts.items()}
                return check, list(over_refunded), totals, balances

            check, over_refunded, accounts, balances = run(read())
            assert check.balanced, check
            assert set(check.trial_balance.values()) <= {0}
            assert over_refunded == []
            revenue = sum(o.commission - o.commission_back for o in self.orders.values())
            assert -accounts.get(ledger.REVENUE, 0) == revenue
            suspense = sum(p.suspense - p.suspense_refunded for p in self.payments.values())
            assert -accounts.get(ledger.SUSPENSE, 0) == suspense
            clearing = sum(p.amount - p.refunded for p in self.payments.values())
            assert accounts.get(ledger.clearing_code(PROVIDER), 0) == clearing
            assert -accounts.get(ledger.PAYOUTS_SENT, 0) == sum(self.payouts)
            for order in self.orders.values():
                assert 0 <= order.refunded <= order.gross
            for index, balance in enumerate(balances):
                assert balance.get(KES, 0) == self.expected_balance(index), index

    return LedgerMachine


def test_random_money_movements_keep_the_books_balanced(settings: Settings, backend: str) -> None:
    # PostgreSQL is slower per statement: fewer histories there, the same rules.
    examples = hypothesis_settings(
        max_examples=30 if backend == "sqlite" else 8,
        stateful_step_count=15,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    with asyncio.Runner() as runner:
        runtime = Runtime(settings, clock=ManualClock())
        try:
            run_state_machine_as_test(make_machine(runner, runtime), settings=examples)
        finally:
            runner.run(runtime.stop())


@pytest.mark.parametrize("gross", [1, 7, 1001, 99_999])
@pytest.mark.parametrize("rate", [0, 1, 333, 1000, 9999, 10_000])
def test_the_commission_given_back_by_parts_adds_up_to_the_commission(
    gross: int, rate: int
) -> None:
    """The closed form the ledger's step-wise reversal must reach: refunding the whole
    order in parts gives back exactly the commission, whatever the parts."""
    commission = ledger.commission_of(gross, rate)
    given_back = 0
    refunded = 0
    for asked in (1, gross // 3, gross):
        part = min(asked, gross - refunded)
        if part <= 0:
            continue
        target = commission * (refunded + part) // gross
        assert 0 <= target - given_back <= part
        given_back, refunded = target, refunded + part
    assert (refunded, given_back) == (gross, commission)
