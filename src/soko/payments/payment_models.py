"""The payments domain's own tables: a payment attempt of a checkout group
(``payments``), every verified inbound webhook stored raw (``payments_webhook_events``)
and every refund (``payments_refunds``).

The database carries the rules that must hold under any concurrency:

* one checkout group has at most one ``succeeded`` payment (a partial unique index); a
  second payment the provider captures for the same group is stored as ``duplicate``
  and refunded in full;
* a payment never refunds more than it took (``CHECK refunded_minor <= amount_minor``,
  and every refund reserves its amount with a conditional UPDATE);
* a provider's event is stored once (``UNIQUE(provider, event_id)``);
* a refund asked for twice by the same cause is created once (``UNIQUE(dedupe_key)``).
"""

from __future__ import annotations

import datetime as dt
import uuid
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from soko.platform.db import Base, UUIDPrimaryKey

PROVIDER_MAX_LENGTH = 40
PROVIDER_ID_MAX_LENGTH = 255
EVENT_ID_MAX_LENGTH = 255
EVENT_TYPE_MAX_LENGTH = 120
REASON_MAX_LENGTH = 500
URL_MAX_LENGTH = 2000
SECRET_MAX_LENGTH = 500
DEDUPE_MAX_LENGTH = 200


class PaymentStatus(StrEnum):
    created = "created"  # stored, the provider not yet asked (or its answer not stored)
    pending = "pending"  # the provider has it; no money yet
    succeeded = "succeeded"  # captured; the money is the group's (final)
    failed = "failed"  # declined or errored; the buyer may try again
    abandoned = "abandoned"  # the buyer left, or it was never completed
    # Captured by the provider after another payment of the same group had succeeded:
    # the money sits in suspense and is refunded in full automatically (final).
    duplicate = "duplicate"


class PaymentFlag(StrEnum):
    """Why an admin should look at a payment (``payments.flag``)."""

    amount_mismatch = "amount_mismatch"  # the provider reports another amount or currency
    refund_failed = "refund_failed"  # a refund was refused for good by the provider
    refund_exceeds = "refund_exceeds"  # a refund was owed beyond what remains refundable
    provider_unknown = "provider_unknown"  # the payment's provider is no longer enabled


class EventStatus(StrEnum):
    received = "received"  # stored; its processing job is queued
    processed = "processed"
    ignored = "ignored"  # verified but of a kind Soko does not act on
    unmatched = "unmatched"  # names no payment Soko knows: for an admin to look at


class RefundStatus(StrEnum):
    pending = "pending"  # reserved on the payment; the provider call is queued
    succeeded = "succeeded"
    failed = "failed"  # refused for good; the amount is refundable again


class RefundSource(StrEnum):
    cancellation = "cancellation"
    dispute = "dispute"
    admin = "admin"
    automatic = "automatic"


def _in(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


_SUCCEEDED = f"status = '{PaymentStatus.succeeded.value}'"


class Payment(UUIDPrimaryKey, Base):
    """One attempt to pay a checkout group. Its ``id`` (a UUIDv7) is the reference sent
    to the provider and the provider-side idempotency key of the start."""

    __tablename__ = "payments"
    __table_args__ = (
        CheckConstraint(_in("status", PaymentStatus), name="status"),
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        CheckConstraint("refunded_minor >= 0", name="refunded_not_negative"),
        CheckConstraint("refunded_minor <= amount_minor", name="refunded_within_amount"),
        CheckConstraint(f"flag IS NULL OR {_in('flag', PaymentFlag)}", name="flag"),
        # At most one succeeded payment per group, whatever the concurrency.
        Index(
            "uq_payments_one_succeeded_per_group",
            "group_id",
            unique=True,
            sqlite_where=text(_SUCCEEDED),
            postgresql_where=text(_SUCCEEDED),
        ),
        Index("ix_payments_group_id", "group_id"),
        Index("ix_payments_provider_payment", "provider", "provider_payment_id"),
        # Reconciliation: open payments, oldest first.
        Index("ix_payments_status_created_at", "status", "created_at"),
        Index("ix_payments_flag", "flag"),
    )

    group_id: Mapped[uuid.UUID]
    buyer_id: Mapped[uuid.UUID]
    provider: Mapped[str] = mapped_column(String(PROVIDER_MAX_LENGTH))
    status: Mapped[str] = mapped_column(String(16), default=PaymentStatus.created.value)
    amount_minor: Mapped[int]
    currency: Mapped[str] = mapped_column(String(3))
    refunded_minor: Mapped[int] = mapped_column(default=0, server_default="0")
    provider_payment_id: Mapped[str | None] = mapped_column(
        String(PROVIDER_ID_MAX_LENGTH), default=None
    )
    next_action_type: Mapped[str | None] = mapped_column(String(20), default=None)
    next_action_url: Mapped[str | None] = mapped_column(String(URL_MAX_LENGTH), default=None)
    # Stripe's client secret lets only the buyer's own client confirm the payment; it is
    # shown to that buyer alone.
    next_action_client_secret: Mapped[str | None] = mapped_column(
        String(SECRET_MAX_LENGTH), default=None
    )
    failure_reason: Mapped[str | None] = mapped_column(String(REASON_MAX_LENGTH), default=None)
    flag: Mapped[str | None] = mapped_column(String(30), default=None)
    flag_detail: Mapped[str | None] = mapped_column(String(REASON_MAX_LENGTH), default=None)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    succeeded_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    version: Mapped[int] = mapped_column(default=1)


class WebhookEvent(UUIDPrimaryKey, Base):
    """A provider's webhook that passed its signature check, stored as received.

    The parsed facts the processing job needs are kept beside the raw body: verifying
    again later would fail for schemes with a timestamp tolerance (Stripe's)."""

    __tablename__ = "payments_webhook_events"
    __table_args__ = (
        UniqueConstraint("provider", "event_id"),
        CheckConstraint(_in("status", EventStatus), name="status"),
        Index("ix_payments_webhook_events_payment_id", "payment_id"),
        Index("ix_payments_webhook_events_status_received", "status", "received_at"),
    )

    provider: Mapped[str] = mapped_column(String(PROVIDER_MAX_LENGTH))
    event_id: Mapped[str] = mapped_column(String(EVENT_ID_MAX_LENGTH))
    event_type: Mapped[str] = mapped_column(String(EVENT_TYPE_MAX_LENGTH))
    reference: Mapped[str | None] = mapped_column(String(PROVIDER_ID_MAX_LENGTH), default=None)
    provider_payment_id: Mapped[str | None] = mapped_column(
        String(PROVIDER_ID_MAX_LENGTH), default=None
    )
    reported_status: Mapped[str | None] = mapped_column(String(16), default=None)
    reported_amount_minor: Mapped[int | None] = mapped_column(default=None)
    reported_currency: Mapped[str | None] = mapped_column(String(3), default=None)
    raw_body: Mapped[bytes] = mapped_column(LargeBinary)
    headers: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=EventStatus.received.value)
    received_at: Mapped[dt.datetime]
    processed_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    payment_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("payments.id", ondelete="SET NULL"), default=None
    )
    error: Mapped[str | None] = mapped_column(Text, default=None)


class Refund(UUIDPrimaryKey, Base):
    """Money given back from one payment, for one order (its seller's share) or, with
    ``order_id`` NULL, from the payment's money in suspense. Its ``id`` is the provider's
    idempotency key for the refund."""

    __tablename__ = "payments_refunds"
    __table_args__ = (
        CheckConstraint(_in("status", RefundStatus), name="status"),
        CheckConstraint(_in("source", RefundSource), name="source"),
        CheckConstraint("amount_minor > 0", name="amount_positive"),
        Index("ix_payments_refunds_payment_id", "payment_id"),
        Index("ix_payments_refunds_order_id", "order_id"),
    )

    payment_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("payments.id", ondelete="RESTRICT"))
    order_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    seller_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    amount_minor: Mapped[int]
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16), default=RefundStatus.pending.value)
    reason: Mapped[str] = mapped_column(String(REASON_MAX_LENGTH), default="")
    source: Mapped[str] = mapped_column(String(16))
    provider_refund_id: Mapped[str | None] = mapped_column(
        String(PROVIDER_ID_MAX_LENGTH), default=None
    )
    failure_reason: Mapped[str | None] = mapped_column(String(REASON_MAX_LENGTH), default=None)
    # Set, and committed, right before a provider without refund idempotency is asked:
    # if the job dies during that call, its next run knows the refund may have been paid.
    sent_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    # The cause, once: "order.cancelled:<order id>", "dispute:<dispute id>", ...
    dedupe_key: Mapped[str] = mapped_column(String(DEDUPE_MAX_LENGTH), unique=True)
    requested_by: Mapped[uuid.UUID | None] = mapped_column(default=None)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    completed_at: Mapped[dt.datetime | None] = mapped_column(default=None)
