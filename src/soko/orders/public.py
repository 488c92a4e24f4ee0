"""What other domains may use of orders: the checkout group a payment pays, the step
that marks it paid, and a summary of an order. Frozen values, never ORM rows.

The payments domain pays a checkout group once (:func:`group_for_payment` says how
much, in which currency, and until when the stock is held) and, when the money is in,
calls :func:`mark_group_paid` from its event handler. Notifications read
:func:`order_summary` for the ids the order events carry.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.orders import service
from soko.orders.models import CheckoutGroup, Order
from soko.orders.states import Actor
from soko.platform.runtime import Runtime

__all__ = [
    "GroupForPayment",
    "OrderSummary",
    "group_for_payment",
    "mark_group_paid",
    "order_summary",
]


@dataclass(frozen=True, slots=True)
class GroupForPayment:
    """A checkout group as a payment needs it. ``total_minor`` counts only the orders
    that are not cancelled; ``status`` is ``pending_payment`` while it may be paid."""

    group_id: uuid.UUID
    buyer_id: uuid.UUID
    status: str
    currency: str
    total_minor: int
    reservation_expires_at: dt.datetime
    order_ids: tuple[uuid.UUID, ...]


async def group_for_payment(session: AsyncSession, group_id: uuid.UUID) -> GroupForPayment | None:
    """The checkout group ``group_id`` with the ids of its orders (one query); ``None``
    when there is no such group."""
    rows = (
        await session.execute(
            select(
                CheckoutGroup.buyer_id,
                CheckoutGroup.status,
                CheckoutGroup.currency,
                CheckoutGroup.total_minor,
                CheckoutGroup.reservation_expires_at,
                Order.id,
            )
            .outerjoin(Order, Order.group_id == CheckoutGroup.id)
            .where(CheckoutGroup.id == group_id)
            .order_by(Order.id)
        )
    ).all()
    if not rows:
        return None
    first = rows[0]
    return GroupForPayment(
        group_id=group_id,
        buyer_id=first.buyer_id,
        status=first.status,
        currency=first.currency,
        total_minor=first.total_minor,
        reservation_expires_at=first.reservation_expires_at,
        order_ids=tuple(row.id for row in rows if row.id is not None),
    )


async def mark_group_paid(session: AsyncSession, runtime: Runtime, group_id: uuid.UUID) -> bool:
    """The group was paid: it and each of its unpaid orders become ``paid`` (a
    compare-and-set; each order's move is recorded as the system's and publishes
    ``order.paid``), and its held stock is committed to the orders.

    Returns False, changing nothing, unless the group is ``pending_payment``: already
    paid (a second delivery of the payment event), expired or cancelled. A payment that
    arrives after the stock holds ran out but before the expiry job came by still
    succeeds here; re-take the holds first with ``inventory.public.rehold_if_available``
    so nothing the buyer paid for was sold to someone else meanwhile."""
    return await service.mark_group_paid(session, runtime, group_id, service.Acting(Actor.system))


@dataclass(frozen=True, slots=True)
class OrderSummary:
    id: uuid.UUID
    number: str
    group_id: uuid.UUID
    buyer_id: uuid.UUID
    seller_id: uuid.UUID
    status: str
    currency: str
    subtotal_minor: int


async def order_summary(session: AsyncSession, order_id: uuid.UUID) -> OrderSummary | None:
    """The order ``order_id`` in brief (one query); ``None`` when there is none."""
    row = (
        await session.execute(
            select(
                Order.id,
                Order.number,
                Order.group_id,
                Order.buyer_id,
                Order.seller_id,
                Order.status,
                Order.currency,
                Order.subtotal_minor,
            ).where(Order.id == order_id)
        )
    ).first()
    if row is None:
        return None
    return OrderSummary(
        id=row.id,
        number=row.number,
        group_id=row.group_id,
        buyer_id=row.buyer_id,
        seller_id=row.seller_id,
        status=row.status,
        currency=row.currency,
        subtotal_minor=row.subtotal_minor,
    )
