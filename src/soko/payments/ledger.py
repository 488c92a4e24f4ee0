"""The ledger: every movement of money as a balanced double-entry transaction.

Amounts are signed integers in minor units, positive for a debit and negative for a
credit; the entries of a transaction sum to zero and are all in its one currency.
Accounts are named by code and created, one per code and currency, the first time an
entry needs them:

``clearing:<provider>``
    money held at the provider for us (debit normal);
``revenue:commission``
    the marketplace's commission (credit normal);
``seller:<seller id>``
    what the marketplace owes the seller (credit normal): the seller's balance is minus
    the sum of its entries, never stored anywhere else;
``suspense:payments``
    money taken that no order owes (a duplicate payment, a late one whose stock is
    gone), waiting for its refund;
``payouts:sent``
    money that left to sellers' banks;
``adjustments:manual``
    the marketplace's side of an admin's correction of a seller's balance.

Every posting is idempotent on ``(kind, reference)`` (``UNIQUE`` in the database): a
capture's reference is the payment id, a refund's the refund id, a payout's the payout
id. Posting twice, even from two transactions racing each other, returns the first
transaction's id and posts nothing more.

Writes that lower a balance and must not lower it past a limit (payouts, and refunds
which must not exceed what was captured) first bump the ``version`` of the account they
debit with an ``UPDATE``: on PostgreSQL that is a row lock held to the commit, which
serializes them per account, and the limit read afterwards sees every committed entry
(READ COMMITTED takes a new snapshot per statement); SQLite serializes writers anyway.
Captures only raise balances and take no lock.

The functions take the caller's session and flush, never commit.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from soko.payments.ledger_errors import (
    CommissionRateInvalid,
    LedgerUnbalanced,
    PayoutAlreadyRecorded,
    PayoutExceedsBalance,
    RefundExceedsCapture,
)
from soko.payments.ledger_models import (
    MEMO_MAX_LENGTH,
    REFERENCE_MAX_LENGTH,
    AccountKind,
    CommissionRate,
    LedgerAccount,
    LedgerEntry,
    LedgerTransaction,
    Payout,
    TransactionKind,
)
from soko.platform.db import dialect_insert
from soko.platform.ids import uuid7
from soko.platform.money import minor_units
from soko.platform.runtime import Runtime

__all__ = [
    "ADJUSTMENTS",
    "BASIS_POINTS",
    "PAYOUTS_SENT",
    "REVENUE",
    "SUSPENSE",
    "CommissionSetting",
    "LedgerCheck",
    "PayoutRecord",
    "SellerShare",
    "clearing_code",
    "commission_of",
    "commission_rate_for",
    "post_adjustment",
    "post_capture",
    "post_refund",
    "record_payout",
    "seller_balance",
    "seller_code",
    "seller_history",
    "set_commission_rate",
    "verify_ledger",
]

REVENUE = "revenue:commission"
SUSPENSE = "suspense:payments"
PAYOUTS_SENT = "payouts:sent"
ADJUSTMENTS = "adjustments:manual"
BASIS_POINTS = 10_000
PROVIDER_MAX_LENGTH = 40
# verify_ledger names at most this many unbalanced transactions (there should be none).
UNBALANCED_SHOWN = 100


def clearing_code(provider: str) -> str:
    return f"clearing:{provider}"


def seller_code(seller_id: uuid.UUID) -> str:
    return f"seller:{seller_id}"


def commission_of(gross_minor: int, rate_bps: int) -> int:
    """The commission on ``gross_minor`` at ``rate_bps``, rounded down (in the seller's
    favour): what a capture credits to ``revenue:commission``."""
    return gross_minor * rate_bps // BASIS_POINTS


# -- value types ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SellerShare:
    """One order's part of a payment."""

    seller_id: uuid.UUID
    order_id: uuid.UUID
    gross_minor: int  # the order's subtotal paid by this payment


@dataclass(frozen=True, slots=True)
class LedgerCheck:
    """The result of :func:`verify_ledger`."""

    #: Transactions whose entries do not sum to zero (at most ``UNBALANCED_SHOWN``).
    unbalanced_transaction_ids: tuple[uuid.UUID, ...]
    #: More unbalanced transactions exist than are named.
    unbalanced_truncated: bool
    #: Currency -> sum of every entry in it; zero in a sound ledger.
    trial_balance: dict[str, int]
    entries: int
    seconds: float

    @property
    def balanced(self) -> bool:
        return not self.unbalanced_transaction_ids and not any(self.trial_balance.values())


@dataclass(frozen=True, slots=True)
class PayoutRecord:
    id: uuid.UUID
    seller_id: uuid.UUID
    amount_minor: int
    currency: str
    reference: str
    note: str | None
    recorded_by: uuid.UUID | None
    created_at: Any
    transaction_id: uuid.UUID
    balance_after_minor: int


@dataclass(frozen=True, slots=True)
class CommissionSetting:
    seller_id: uuid.UUID
    rate_bps: int
    #: Whether an admin set this seller's rate (else it is ``settings.commission_bps``).
    overridden: bool
    updated_by: uuid.UUID | None
    updated_at: Any


# -- validation ------------------------------------------------------------------------------


def _check_currency(currency: str) -> None:
    minor_units(currency)  # raises UnknownCurrencyError on a code it does not know


def _check_provider(provider: str) -> None:
    if not provider or len(provider) > PROVIDER_MAX_LENGTH or not provider.isascii():
        raise ValueError(f"not a provider name: {provider!r}")


def _check_positive(name: str, amount: int) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise ValueError(f"{name} must be a positive integer of minor units, not {amount!r}")


def _check_rate(rate_bps: int) -> None:
    if isinstance(rate_bps, bool) or not isinstance(rate_bps, int):
        raise CommissionRateInvalid(f"rate_bps must be an integer, not {rate_bps!r}.")
    if not 0 <= rate_bps <= BASIS_POINTS:
        raise CommissionRateInvalid(
            f"rate_bps must be between 0 and {BASIS_POINTS}, not {rate_bps}."
        )


def _check_reference(reference: str) -> str:
    cleaned = reference.strip()
    if not cleaned or len(cleaned) > REFERENCE_MAX_LENGTH:
        raise ValueError(f"a reference is 1 to {REFERENCE_MAX_LENGTH} characters")
    return cleaned


# -- accounts --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Account:
    code: str
    kind: AccountKind
    seller_id: uuid.UUID | None = None


def _clearing(provider: str) -> _Account:
    return _Account(clearing_code(provider), AccountKind.clearing)


def _seller(seller_id: uuid.UUID) -> _Account:
    return _Account(seller_code(seller_id), AccountKind.seller, seller_id)


_REVENUE = _Account(REVENUE, AccountKind.revenue)
_SUSPENSE = _Account(SUSPENSE, AccountKind.suspense)
_PAYOUTS = _Account(PAYOUTS_SENT, AccountKind.payouts)
_ADJUSTMENTS = _Account(ADJUSTMENTS, AccountKind.adjustments)


def _now(runtime: Runtime) -> Any:
    return runtime.clock.now()


async def _account_ids(
    session: AsyncSession, runtime: Runtime, currency: str, wanted: Iterable[_Account]
) -> dict[str, uuid.UUID]:
    """The ids of the accounts ``wanted`` in ``currency``, by code, creating the missing
    ones. Concurrency-safe: ``INSERT ... ON CONFLICT DO NOTHING`` then ``SELECT``, so two
    transactions creating the same account both end up with the one row."""
    by_code = {account.code: account for account in wanted}
    lookup = select(LedgerAccount.code, LedgerAccount.id).where(
        LedgerAccount.currency == currency, LedgerAccount.code.in_(by_code)
    )
    found: dict[str, uuid.UUID] = dict((await session.execute(lookup)).all())
    missing = sorted(code for code in by_code if code not in found)
    if missing:
        now = _now(runtime)
        # Sorted: two transactions inserting the same new accounts wait for each other
        # in the same order, never in a cycle.
        rows = [
            {
                "id": uuid7(),
                "code": code,
                "kind": by_code[code].kind.value,
                "seller_id": by_code[code].seller_id,
                "currency": currency,
                "version": 0,
                "created_at": now,
            }
            for code in missing
        ]
        statement = (
            dialect_insert(session)(LedgerAccount)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["code", "currency"])
        )
        await session.execute(statement)
        again = lookup.where(LedgerAccount.code.in_(missing))
        found.update(dict((await session.execute(again)).all()))
    return found


async def _lock_account(session: AsyncSession, account_id: uuid.UUID) -> None:
    """Take the write lock on an account row (held to the commit) by bumping its
    version: what serializes the writes that must not take a balance past a limit."""
    await session.execute(
        update(LedgerAccount)
        .where(LedgerAccount.id == account_id)
        .values(version=LedgerAccount.version + 1)
        .execution_options(synchronize_session=False)
    )


# -- posting ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Line:
    account_id: uuid.UUID
    amount_minor: int
    payment_id: uuid.UUID | None = None
    order_id: uuid.UUID | None = None
    rate_bps: int | None = None


async def _existing_transaction(
    session: AsyncSession, kind: TransactionKind, reference: str
) -> uuid.UUID | None:
    found: uuid.UUID | None = await session.scalar(
        select(LedgerTransaction.id).where(
            LedgerTransaction.kind == kind.value, LedgerTransaction.reference == reference
        )
    )
    return found


async def _post(
    session: AsyncSession,
    runtime: Runtime,
    *,
    kind: TransactionKind,
    reference: str,
    currency: str,
    lines: Sequence[_Line],
    memo: str | None = None,
    actor_id: uuid.UUID | None = None,
) -> tuple[uuid.UUID, bool]:
    """Insert one transaction and its entries; ``(id, True)``, or ``(the existing id,
    False)`` when ``(kind, reference)`` was posted already (by a transaction that
    committed while this one ran: the unique violation is caught in a SAVEPOINT)."""
    if sum(line.amount_minor for line in lines) != 0:
        raise LedgerUnbalanced(f"The {kind.value} {reference} does not balance.")
    kept = [line for line in lines if line.amount_minor != 0]
    if not kept:
        raise ValueError("a transaction needs at least one non-zero entry")
    now = _now(runtime)
    transaction_id = uuid7()
    entries = [
        {
            "id": uuid7(),
            "transaction_id": transaction_id,
            "account_id": line.account_id,
            "amount_minor": line.amount_minor,
            "currency": currency,
            "payment_id": line.payment_id,
            "order_id": line.order_id,
            "rate_bps": line.rate_bps,
            "created_at": now,
        }
        for line in kept
    ]
    try:
        async with session.begin_nested():
            await session.execute(
                insert(LedgerTransaction).values(
                    id=transaction_id,
                    kind=kind.value,
                    reference=reference,
                    currency=currency,
                    memo=memo[:MEMO_MAX_LENGTH] if memo else None,
                    actor_id=actor_id,
                    created_at=now,
                )
            )
            await session.execute(insert(LedgerEntry).values(entries))
    except IntegrityError:
        existing = await _existing_transaction(session, kind, reference)
        if existing is None:
            raise
        return existing, False
    return transaction_id, True


async def _rates(
    session: AsyncSession, runtime: Runtime, seller_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, int]:
    wanted = set(seller_ids)
    rates = {seller_id: runtime.settings.commission_bps for seller_id in wanted}
    if wanted:
        rows = await session.execute(
            select(CommissionRate.seller_id, CommissionRate.rate_bps).where(
                CommissionRate.seller_id.in_(wanted)
            )
        )
        rates.update(dict(rows.all()))
    return rates


async def post_capture(
    session: AsyncSession,
    runtime: Runtime,
    *,
    payment_id: uuid.UUID,
    provider: str,
    currency: str,
    amount_minor: int,
    shares: Sequence[SellerShare],
) -> uuid.UUID:
    """Record a payment's money arriving at ``provider``: debit ``clearing:<provider>``
    with ``amount_minor``; per share credit the seller the gross less commission and
    ``revenue:commission`` the commission (the seller's override, else
    ``settings.commission_bps``, recorded on both entries); credit what no share claims
    to ``suspense:payments``. Idempotent on ``payment_id``: a second call posts nothing
    and returns the first transaction's id."""
    _check_currency(currency)
    _check_provider(provider)
    _check_positive("amount_minor", amount_minor)
    for share in shares:
        if share.gross_minor < 0:
            raise ValueError(f"the share of order {share.order_id} is negative")
    shared = sum(share.gross_minor for share in shares)
    if shared > amount_minor:
        raise ValueError(f"the shares ({shared}) exceed the payment ({amount_minor})")
    reference = str(payment_id)
    existing = await _existing_transaction(session, TransactionKind.capture, reference)
    if existing is not None:
        return existing
    rates = await _rates(session, runtime, (share.seller_id for share in shares))
    wanted = [_clearing(provider), _REVENUE, *(_seller(share.seller_id) for share in shares)]
    if shared < amount_minor:
        wanted.append(_SUSPENSE)
    accounts = await _account_ids(session, runtime, currency, wanted)
    lines = [_Line(accounts[clearing_code(provider)], amount_minor, payment_id=payment_id)]
    for share in shares:
        rate = rates[share.seller_id]
        commission = commission_of(share.gross_minor, rate)
        seller_account = accounts[seller_code(share.seller_id)]
        for account_id, amount in (
            (seller_account, commission - share.gross_minor),
            (accounts[REVENUE], -commission),
        ):
            lines.append(_Line(account_id, amount, payment_id, share.order_id, rate))
    if shared < amount_minor:
        lines.append(_Line(accounts[SUSPENSE], shared - amount_minor, payment_id=payment_id))
    transaction_id, _ = await _post(
        session,
        runtime,
        kind=TransactionKind.capture,
        reference=reference,
        currency=currency,
        lines=lines,
        memo=f"payment {payment_id} captured by {provider}",
    )
    return transaction_id


async def _payment_in_clearing(
    session: AsyncSession, clearing_id: uuid.UUID, payment_id: uuid.UUID
) -> int:
    """What of a payment is still in clearing: captured less refunded."""
    total = await session.scalar(
        select(func.coalesce(func.sum(LedgerEntry.amount_minor), 0)).where(
            LedgerEntry.payment_id == payment_id, LedgerEntry.account_id == clearing_id
        )
    )
    return int(total or 0)


@dataclass(frozen=True, slots=True)
class _OrderTotals:
    gross_captured: int
    commission_captured: int
    gross_refunded: int
    commission_refunded: int


async def _order_totals(
    session: AsyncSession,
    order_id: uuid.UUID,
    *,
    currency: str,
    seller_account: uuid.UUID,
    revenue_account: uuid.UUID,
) -> _OrderTotals:
    rows = await session.execute(
        select(LedgerTransaction.kind, LedgerEntry.account_id, func.sum(LedgerEntry.amount_minor))
        .join(LedgerTransaction, LedgerTransaction.id == LedgerEntry.transaction_id)
        .where(LedgerEntry.order_id == order_id, LedgerEntry.currency == currency)
        .group_by(LedgerTransaction.kind, LedgerEntry.account_id)
    )
    sums: dict[tuple[str, str], int] = {}
    for kind, account_id, total in rows:
        if account_id == seller_account:
            side = "seller"
        elif account_id == revenue_account:
            side = "commission"
        else:
            raise ValueError(f"order {order_id} was captured for another seller")
        sums[(kind, side)] = sums.get((kind, side), 0) + int(total)
    capture, refund = TransactionKind.capture.value, TransactionKind.refund.value
    commission_captured = -sums.get((capture, "commission"), 0)
    commission_refunded = sums.get((refund, "commission"), 0)
    return _OrderTotals(
        gross_captured=commission_captured - sums.get((capture, "seller"), 0),
        commission_captured=commission_captured,
        gross_refunded=commission_refunded + sums.get((refund, "seller"), 0),
        commission_refunded=commission_refunded,
    )


@dataclass(frozen=True, slots=True)
class _Room:
    minor: int  # what may still be refunded
    of: str  # what limits it, for a message
    totals: _OrderTotals | None  # an order's, for its commission


async def _refund_room(
    session: AsyncSession,
    accounts: dict[str, uuid.UUID],
    provider: str,
    payment_id: uuid.UUID,
    order_id: uuid.UUID | None,
    seller_id: uuid.UUID | None,
    *,
    currency: str,
) -> _Room:
    """What a refund of the payment (an order's share of it, or its suspense part) may
    still take: the least of what the payment has left in clearing and what the order was
    captured for less its refunds (or what suspense holds of the payment)."""
    in_clearing = max(
        await _payment_in_clearing(session, accounts[clearing_code(provider)], payment_id), 0
    )
    if seller_id is None:
        in_suspense = -int(
            await session.scalar(
                select(func.coalesce(func.sum(LedgerEntry.amount_minor), 0)).where(
                    LedgerEntry.payment_id == payment_id,
                    LedgerEntry.account_id == accounts[_SUSPENSE.code],
                )
            )
            or 0
        )
        if in_suspense < in_clearing:
            return _Room(max(in_suspense, 0), f"payment {payment_id} held in suspense", None)
        return _Room(in_clearing, f"payment {payment_id}", None)
    assert order_id is not None
    totals = await _order_totals(
        session,
        order_id,
        currency=currency,
        seller_account=accounts[_seller(seller_id).code],
        revenue_account=accounts[REVENUE],
    )
    of_order = max(totals.gross_captured - totals.gross_refunded, 0)
    if of_order < in_clearing:
        return _Room(of_order, f"order {order_id}", totals)
    return _Room(in_clearing, f"payment {payment_id}", totals)


async def refundable(
    session: AsyncSession,
    runtime: Runtime,
    *,
    payment_id: uuid.UUID,
    provider: str,
    currency: str,
    order_id: uuid.UUID | None,
    seller_id: uuid.UUID | None,
) -> int:
    """What :func:`post_refund` would accept now for this payment (and order): checked
    before a refund's money leaves, so a refund the ledger cannot record is refused
    before the provider pays it out."""
    _check_currency(currency)
    _check_provider(provider)
    debited = _seller(seller_id) if seller_id is not None else _SUSPENSE
    accounts = await _account_ids(
        session, runtime, currency, [_clearing(provider), _REVENUE, debited]
    )
    room = await _refund_room(
        session, accounts, provider, payment_id, order_id, seller_id, currency=currency
    )
    return room.minor


async def post_refund(
    session: AsyncSession,
    runtime: Runtime,
    *,
    refund_id: uuid.UUID,
    payment_id: uuid.UUID,
    provider: str,
    currency: str,
    amount_minor: int,
    order_id: uuid.UUID | None,
    seller_id: uuid.UUID | None,
) -> uuid.UUID:
    """Record money returned to the buyer: credit ``clearing:<provider>``; debit the
    seller and ``revenue:commission`` for an order's refund, or ``suspense:payments``
    when ``seller_id`` is ``None``. Idempotent on ``refund_id``.

    The commission is reversed in the proportion the capture took it: after refunds
    totalling ``R`` of an order captured for ``G`` with commission ``C``, exactly
    ``C * R // G`` of it has been reversed, so a full refund (in any number of parts)
    reverses all of it and the seller gives back nothing it was not credited.

    Raises :class:`RefundExceedsCapture` when the refunds of the order (or of the
    payment's suspense part, or of the payment as a whole) would exceed what was
    captured for it.

    Concurrency: the debited account (the seller's, or suspense) is locked before the
    limits are read, so refunds of one order, or of one payment's suspense part, run one
    after the other. Refunds of one payment's orders at different sellers do not wait
    for each other; the payment-wide limit between them is the payments domain's
    conditional ``UPDATE`` of the payment's refunded amount, this check the backstop."""
    _check_currency(currency)
    _check_provider(provider)
    _check_positive("amount_minor", amount_minor)
    if seller_id is not None and order_id is None:
        raise ValueError("a seller's refund names the order it refunds")
    reference = str(refund_id)
    existing = await _existing_transaction(session, TransactionKind.refund, reference)
    if existing is not None:
        return existing
    debited = _seller(seller_id) if seller_id is not None else _SUSPENSE
    accounts = await _account_ids(
        session, runtime, currency, [_clearing(provider), _REVENUE, debited]
    )
    debited_id = accounts[debited.code]
    await _lock_account(session, debited_id)
    # Under the lock: a duplicate that committed meanwhile is seen now.
    existing = await _existing_transaction(session, TransactionKind.refund, reference)
    if existing is not None:
        return existing
    clearing_id = accounts[clearing_code(provider)]
    room = await _refund_room(
        session, accounts, provider, payment_id, order_id, seller_id, currency=currency
    )
    if amount_minor > room.minor:
        raise RefundExceedsCapture(
            f"Only {room.minor} of {room.of} remains refundable.", refundable_minor=room.minor
        )
    lines = [_Line(clearing_id, -amount_minor, payment_id=payment_id)]
    if seller_id is None:
        lines.append(_Line(debited_id, amount_minor, payment_id=payment_id))
    else:
        assert order_id is not None and room.totals is not None
        totals = room.totals
        reversed_after = (
            totals.commission_captured
            * (totals.gross_refunded + amount_minor)
            // totals.gross_captured
        )
        commission = reversed_after - totals.commission_refunded
        lines.append(_Line(debited_id, amount_minor - commission, payment_id, order_id))
        lines.append(_Line(accounts[REVENUE], commission, payment_id, order_id))
    transaction_id, _ = await _post(
        session,
        runtime,
        kind=TransactionKind.refund,
        reference=reference,
        currency=currency,
        lines=lines,
        memo=f"refund {refund_id} of payment {payment_id}"
        + (f", order {order_id}" if seller_id is not None else ", from suspense"),
    )
    return transaction_id


async def post_adjustment(
    session: AsyncSession,
    runtime: Runtime,
    *,
    seller_id: uuid.UUID,
    amount_minor: int,
    currency: str,
    reference: str,
    memo: str,
    actor_id: uuid.UUID | None,
) -> uuid.UUID:
    """An admin's correction of a seller's balance: ``amount_minor`` > 0 credits the
    seller (the marketplace owes more), < 0 debits it, against
    ``adjustments:manual``. Idempotent on ``reference``. A debit may take the balance
    below zero: the seller then owes the marketplace."""
    _check_currency(currency)
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int) or amount_minor == 0:
        raise ValueError("an adjustment is a non-zero integer of minor units")
    reference = _check_reference(reference)
    existing = await _existing_transaction(session, TransactionKind.adjustment, reference)
    if existing is not None:
        return existing
    accounts = await _account_ids(session, runtime, currency, [_seller(seller_id), _ADJUSTMENTS])
    transaction_id, _ = await _post(
        session,
        runtime,
        kind=TransactionKind.adjustment,
        reference=reference,
        currency=currency,
        lines=[
            _Line(accounts[seller_code(seller_id)], -amount_minor),
            _Line(accounts[ADJUSTMENTS], amount_minor),
        ],
        memo=memo,
        actor_id=actor_id,
    )
    return transaction_id


# -- balances and payouts ----------------------------------------------------------------------


async def seller_balance(session: AsyncSession, seller_id: uuid.UUID) -> dict[str, int]:
    """Currency -> what the marketplace owes the seller (negative when the seller owes,
    after refunds of orders already paid out), for every currency the seller has an
    account in."""
    rows = await session.execute(
        select(LedgerAccount.currency, func.coalesce(func.sum(LedgerEntry.amount_minor), 0))
        .outerjoin(LedgerEntry, LedgerEntry.account_id == LedgerAccount.id)
        .where(LedgerAccount.kind == AccountKind.seller.value, LedgerAccount.seller_id == seller_id)
        .group_by(LedgerAccount.currency)
    )
    return {currency: -int(total) for currency, total in rows}


def seller_history(seller_id: uuid.UUID) -> Select[Any]:
    """The entries of the seller's accounts with their transaction's kind, reference and
    memo; ``effect_minor`` is the entry's effect on the balance (credits positive).
    Order and page it with a keyset on ``(LedgerEntry.created_at, LedgerEntry.id)``."""
    accounts = select(LedgerAccount.id).where(
        LedgerAccount.kind == AccountKind.seller.value, LedgerAccount.seller_id == seller_id
    )
    # Eleven columns: past the typed overloads of select(), hence the Any.
    statement: Any = (
        select(
            LedgerEntry.id,
            LedgerEntry.transaction_id,
            LedgerTransaction.kind,
            LedgerTransaction.reference,
            LedgerTransaction.memo,
            LedgerEntry.currency,
            (-LedgerEntry.amount_minor).label("effect_minor"),
            LedgerEntry.payment_id,
            LedgerEntry.order_id,
            LedgerEntry.rate_bps,
            LedgerEntry.created_at,
        )
        .join(LedgerTransaction, LedgerTransaction.id == LedgerEntry.transaction_id)
        .where(LedgerEntry.account_id.in_(accounts))
    )
    selected: Select[Any] = statement
    return selected


async def record_payout(
    session: AsyncSession,
    runtime: Runtime,
    *,
    seller_id: uuid.UUID,
    amount_minor: int,
    currency: str,
    reference: str,
    actor_id: uuid.UUID | None,
    note: str | None = None,
) -> PayoutRecord:
    """Record money sent to the seller's bank: debit the seller, credit
    ``payouts:sent``. Refused with :class:`PayoutExceedsBalance` beyond the seller's
    balance in ``currency``, and with :class:`PayoutAlreadyRecorded` when the seller
    already has a payout with ``reference``.

    Concurrency: the seller's account row is locked first (a version bump), then the
    balance is read, so two payouts racing on one balance run one after the other and
    the second sees the first."""
    _check_currency(currency)
    _check_positive("amount_minor", amount_minor)
    reference = _check_reference(reference)
    accounts = await _account_ids(session, runtime, currency, [_seller(seller_id), _PAYOUTS])
    seller_account = accounts[seller_code(seller_id)]
    await _lock_account(session, seller_account)
    recorded = await session.scalar(
        select(Payout.id).where(Payout.seller_id == seller_id, Payout.reference == reference)
    )
    if recorded is not None:
        raise PayoutAlreadyRecorded(
            f"The payout {reference!r} of this seller is recorded already.",
            payout_id=str(recorded),
        )
    balance = -int(
        await session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount_minor), 0)).where(
                LedgerEntry.account_id == seller_account
            )
        )
        or 0
    )
    if amount_minor > balance:
        raise PayoutExceedsBalance(
            f"The seller's balance is {balance} {currency}; a payout of {amount_minor} "
            "would exceed it.",
            balance_minor=balance,
            currency=currency,
        )
    payout_id = uuid7()
    transaction_id, _ = await _post(
        session,
        runtime,
        kind=TransactionKind.payout,
        reference=str(payout_id),
        currency=currency,
        lines=[_Line(seller_account, amount_minor), _Line(accounts[PAYOUTS_SENT], -amount_minor)],
        memo=f"payout {reference}",
        actor_id=actor_id,
    )
    now = _now(runtime)
    cleaned_note = note.strip()[:MEMO_MAX_LENGTH] if note and note.strip() else None
    await session.execute(
        insert(Payout).values(
            id=payout_id,
            seller_id=seller_id,
            amount_minor=amount_minor,
            currency=currency,
            reference=reference,
            note=cleaned_note,
            recorded_by=actor_id,
            created_at=now,
            transaction_id=transaction_id,
        )
    )
    return PayoutRecord(
        id=payout_id,
        seller_id=seller_id,
        amount_minor=amount_minor,
        currency=currency,
        reference=reference,
        note=cleaned_note,
        recorded_by=actor_id,
        created_at=now,
        transaction_id=transaction_id,
        balance_after_minor=balance - amount_minor,
    )


# -- commission ------------------------------------------------------------------------------


async def commission_rate_for(
    session: AsyncSession, runtime: Runtime, seller_id: uuid.UUID
) -> CommissionSetting:
    """The rate the seller's next capture will use."""
    row = await session.get(CommissionRate, seller_id)
    if row is None:
        return CommissionSetting(seller_id, runtime.settings.commission_bps, False, None, None)
    return CommissionSetting(seller_id, row.rate_bps, True, row.updated_by, row.updated_at)


async def set_commission_rate(
    session: AsyncSession,
    runtime: Runtime,
    *,
    seller_id: uuid.UUID,
    rate_bps: int | None,
    actor_id: uuid.UUID | None,
) -> CommissionSetting:
    """Set the seller's commission (``None`` returns it to the default). Applies to
    captures posted from now on; captures already posted keep their rate, and so do
    their refunds."""
    if rate_bps is None:
        await session.execute(delete(CommissionRate).where(CommissionRate.seller_id == seller_id))
        return CommissionSetting(seller_id, runtime.settings.commission_bps, False, None, None)
    _check_rate(rate_bps)
    now = _now(runtime)
    statement = dialect_insert(session)(CommissionRate).values(
        seller_id=seller_id, rate_bps=rate_bps, updated_by=actor_id, updated_at=now
    )
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=["seller_id"],
            set_={"rate_bps": rate_bps, "updated_by": actor_id, "updated_at": now},
        )
    )
    return CommissionSetting(seller_id, rate_bps, True, actor_id, now)


# -- verification ----------------------------------------------------------------------------


async def verify_ledger(session: AsyncSession) -> LedgerCheck:
    """Check the whole ledger in two set-based statements: the transactions whose
    entries do not sum to zero, and the trial balance (the sum of every entry, per
    currency, which is zero when every transaction balances)."""
    started = time.perf_counter()
    unbalanced = (
        (
            await session.execute(
                select(LedgerEntry.transaction_id)
                .group_by(LedgerEntry.transaction_id)
                .having(func.sum(LedgerEntry.amount_minor) != 0)
                .limit(UNBALANCED_SHOWN + 1)
            )
        )
        .scalars()
        .all()
    )
    rows = await session.execute(
        select(LedgerEntry.currency, func.sum(LedgerEntry.amount_minor), func.count()).group_by(
            LedgerEntry.currency
        )
    )
    trial: dict[str, int] = {}
    entries = 0
    for currency, total, count in rows:
        trial[currency] = int(total)
        entries += int(count)
    return LedgerCheck(
        unbalanced_transaction_ids=tuple(unbalanced[:UNBALANCED_SHOWN]),
        unbalanced_truncated=len(unbalanced) > UNBALANCED_SHOWN,
        trial_balance=trial,
        entries=entries,
        seconds=time.perf_counter() - started,
    )
