"""What other domains may read of payments: how a checkout group stands with its
payments, and a refund in brief (for notifications). Frozen values, never ORM rows."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.payments.payment_models import Payment, PaymentStatus, Refund

__all__ = ["GroupPaymentStatus", "RefundSummary", "payment_status_of_group", "refund_summary"]


@dataclass(frozen=True, slots=True)
class GroupPaymentStatus:
    """``status`` is ``paid`` when a payment succeeded for the group, ``pending`` while
    an attempt is open, ``failed`` when every attempt failed or was abandoned, and
    ``none`` when no payment was started. ``payment_id`` is the succeeded payment, else
    the latest attempt."""

    group_id: uuid.UUID
    status: str
    payment_id: uuid.UUID | None
    provider: str | None
    amount_minor: int
    refunded_minor: int
    currency: str | None
    attempts: int


async def payment_status_of_group(session: AsyncSession, group_id: uuid.UUID) -> GroupPaymentStatus:
    """How checkout group ``group_id`` stands with its payments (one query)."""
    rows = (
        await session.execute(
            select(
                Payment.id,
                Payment.status,
                Payment.provider,
                Payment.amount_minor,
                Payment.refunded_minor,
                Payment.currency,
            )
            .where(Payment.group_id == group_id)
            .order_by(Payment.id)
        )
    ).all()
    if not rows:
        return GroupPaymentStatus(group_id, "none", None, None, 0, 0, None, 0)
    succeeded = next((row for row in rows if row.status == PaymentStatus.succeeded.value), None)
    chosen = succeeded or rows[-1]
    if succeeded is not None:
        status = "paid"
    elif any(row.status in ("created", "pending") for row in rows):
        status = "pending"
    else:
        status = "failed"
    return GroupPaymentStatus(
        group_id=group_id,
        status=status,
        payment_id=chosen.id,
        provider=chosen.provider,
        amount_minor=chosen.amount_minor,
        refunded_minor=chosen.refunded_minor,
        currency=chosen.currency,
        attempts=len(rows),
    )


@dataclass(frozen=True, slots=True)
class RefundSummary:
    id: uuid.UUID
    payment_id: uuid.UUID
    group_id: uuid.UUID
    buyer_id: uuid.UUID
    order_id: uuid.UUID | None
    amount_minor: int
    currency: str
    status: str
    reason: str
    source: str


async def refund_summary(session: AsyncSession, refund_id: uuid.UUID) -> RefundSummary | None:
    """Refund ``refund_id`` in brief (one query); ``None`` when there is none."""
    row = (
        await session.execute(
            select(Refund, Payment.group_id, Payment.buyer_id)
            .join(Payment, Payment.id == Refund.payment_id)
            .where(Refund.id == refund_id)
        )
    ).first()
    if row is None:
        return None
    refund = row[0]
    return RefundSummary(
        id=refund.id,
        payment_id=refund.payment_id,
        group_id=row.group_id,
        buyer_id=row.buyer_id,
        order_id=refund.order_id,
        amount_minor=refund.amount_minor,
        currency=refund.currency,
        status=refund.status,
        reason=refund.reason,
        source=refund.source,
    )
