"""The ledger's tables: accounts, balanced transactions and their entries, each seller's
commission rate, and the payouts recorded against sellers' balances.

Double entry in integer minor units: an entry's ``amount_minor`` is signed, positive for
a debit and negative for a credit, and the entries of one transaction sum to zero (the
code checks it before inserting, :func:`soko.payments.ledger.verify_ledger` checks the
whole ledger). Balances are never stored: a seller's balance is minus the sum of the
entries on its ``seller:<id>`` account. Sellers, payments and orders are other domains'
rows and are stored by id only.
"""

from __future__ import annotations

import datetime as dt
import uuid
from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from soko.platform.db import Base, UUIDPrimaryKey

ACCOUNT_CODE_MAX_LENGTH = 80
REFERENCE_MAX_LENGTH = 100
MEMO_MAX_LENGTH = 500


class AccountKind(StrEnum):
    clearing = "clearing"  # money held at a provider (debit normal)
    revenue = "revenue"  # the marketplace's commission (credit normal)
    seller = "seller"  # what the marketplace owes one seller (credit normal)
    suspense = "suspense"  # money taken that no order owes, waiting for its refund
    payouts = "payouts"  # money that left to sellers' banks (debit normal)
    adjustments = "adjustments"  # the marketplace's side of manual corrections


class TransactionKind(StrEnum):
    capture = "capture"
    refund = "refund"
    payout = "payout"
    adjustment = "adjustment"


def _in(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class LedgerAccount(UUIDPrimaryKey, Base):
    """One account in one currency, created the first time an entry needs it."""

    __tablename__ = "payments_ledger_accounts"
    __table_args__ = (
        UniqueConstraint("code", "currency"),
        CheckConstraint(_in("kind", AccountKind), name="kind"),
        CheckConstraint(
            "(kind = 'seller') = (seller_id IS NOT NULL)", name="seller_id_on_seller_accounts"
        ),
        Index("ix_payments_ledger_accounts_seller_id", "seller_id"),
    )

    code: Mapped[str] = mapped_column(String(ACCOUNT_CODE_MAX_LENGTH))
    kind: Mapped[str] = mapped_column(String(16))
    seller_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    currency: Mapped[str] = mapped_column(String(3))
    # Bumped by every write that must see the balance it is about to lower (payouts,
    # refunds, negative adjustments): the UPDATE is the row lock that serializes them.
    version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime]


class LedgerTransaction(UUIDPrimaryKey, Base):
    """One movement of money: balanced entries in one currency, posted once per
    ``(kind, reference)`` (a capture's reference is the payment id, a refund's the refund
    id, a payout's the payout id)."""

    __tablename__ = "payments_ledger_transactions"
    __table_args__ = (
        UniqueConstraint("kind", "reference"),
        CheckConstraint(_in("kind", TransactionKind), name="kind"),
    )

    kind: Mapped[str] = mapped_column(String(16))
    reference: Mapped[str] = mapped_column(String(REFERENCE_MAX_LENGTH))
    currency: Mapped[str] = mapped_column(String(3))
    memo: Mapped[str | None] = mapped_column(Text, default=None)
    actor_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    created_at: Mapped[dt.datetime]


class LedgerEntry(UUIDPrimaryKey, Base):
    """One side of a transaction: ``amount_minor`` debited (> 0) or credited (< 0) to an
    account.

    Capture and refund entries carry the payment they belong to; the entries of an
    order's share (the seller's and the commission's) carry the order, and captures the
    commission rate applied, so a refund reverses the commission in the proportion the
    capture took it."""

    __tablename__ = "payments_ledger_entries"
    __table_args__ = (
        CheckConstraint("amount_minor <> 0", name="amount_not_zero"),
        CheckConstraint(
            "rate_bps IS NULL OR (rate_bps >= 0 AND rate_bps <= 10000)", name="rate_bps_range"
        ),
        # The balance check: GROUP BY transaction over (transaction_id, amount) only, an
        # index-only scan on PostgreSQL.
        Index("ix_payments_ledger_entries_transaction_amount", "transaction_id", "amount_minor"),
        # An account's balance and its history, newest first.
        Index("ix_payments_ledger_entries_account_created", "account_id", "created_at", "id"),
        # Refund limits: what an order, and a payment, captured and refunded so far.
        Index("ix_payments_ledger_entries_order_id", "order_id"),
        Index("ix_payments_ledger_entries_payment_id", "payment_id"),
    )

    transaction_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("payments_ledger_transactions.id"))
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("payments_ledger_accounts.id"))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    payment_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    order_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    rate_bps: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[dt.datetime]


class CommissionRate(Base):
    """A seller's commission, overriding ``settings.commission_bps``."""

    __tablename__ = "payments_commission_rates"
    __table_args__ = (
        CheckConstraint("rate_bps >= 0 AND rate_bps <= 10000", name="rate_bps_range"),
    )

    seller_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    rate_bps: Mapped[int] = mapped_column(Integer)
    updated_by: Mapped[uuid.UUID | None] = mapped_column(default=None)
    updated_at: Mapped[dt.datetime]


class Payout(UUIDPrimaryKey, Base):
    """Money sent to a seller's bank, recorded by an admin against the seller's balance.

    ``reference`` is the bank's or the transfer's reference: one payout per seller and
    reference, so the same transfer is never recorded twice."""

    __tablename__ = "payments_payouts"
    __table_args__ = (
        UniqueConstraint("seller_id", "reference"),
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        Index("ix_payments_payouts_seller_created", "seller_id", "created_at", "id"),
        Index("ix_payments_payouts_created", "created_at", "id"),
    )

    seller_id: Mapped[uuid.UUID]
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    reference: Mapped[str] = mapped_column(String(REFERENCE_MAX_LENGTH))
    note: Mapped[str | None] = mapped_column(String(MEMO_MAX_LENGTH), default=None)
    recorded_by: Mapped[uuid.UUID | None] = mapped_column(default=None)
    created_at: Mapped[dt.datetime]
    transaction_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("payments_ledger_transactions.id"))
