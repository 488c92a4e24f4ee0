"""What other domains may use of orders: the checkout group a payment pays, the step
that marks it paid, and a summary of an order. Frozen values, never ORM rows.

The payments domain pays a checkout group once (:func:`group_for_payment` says how
much, in which currency, to which sellers, and until when the stock is held) and, when
the money is confirmed, calls :func:`pay_group` from its event handler: the one call
that decides what the money buys (see :class:`PayOutcome`). Notifications read
:func:`order_summary` for the ids the order events carry.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.orders import service
from soko.orders.models import CheckoutGroup, Order
from soko.orders.service import PAID_LATE, PayOutcome
from soko.orders.states import Actor
from soko.platform.runtime import Runtime

__all__ = [
    "PAID_LATE",
    "GroupForPayment",
    "GroupOrder",
    "OrderSummary",
    "PayOutcome",
    "group_for_payment",
    "mark_group_paid",
    "order_summary",
    "pay_group",
]


@dataclass(frozen=True, slots=True)
class GroupOrder:
    """One seller's order of a checkout group, as a payment splits the money."""

    order_id: uuid.UUID
    seller_id: uuid.UUID
    status: str
    subtotal_minor: int
    # Whether it was ever paid: an order cancelled after payment was, one cancelled
    # before was not (its money was never taken).
    paid: bool = False


@dataclass(frozen=True, slots=True)
class GroupForPayment:
    """A checkout group as a payment needs it. ``total_minor`` counts the orders not
    cancelled before payment (what is or was paid); ``status`` is ``pending_payment``
    while it may be paid (an ``expired`` group may still be paid late, see
    :func:`pay_group`). ``orders`` holds every order of the group, cancelled ones
    included (filter on ``status`` and ``paid``), ordered by id like ``order_ids``."""

    group_id: uuid.UUID
    buyer_id: uuid.UUID
    status: str
    currency: str
    total_minor: int
    reservation_expires_at: dt.datetime
    order_ids: tuple[uuid.UUID, ...]
    orders: tuple[GroupOrder, ...]


async def group_for_payment(session: AsyncSession, group_id: uuid.UUID) -> GroupForPayment | None:
    """The checkout group ``group_id`` with its orders (one query); ``None`` when there
    is no such group."""
    rows = (
        await session.execute(
            select(
                CheckoutGroup.buyer_id,
                CheckoutGroup.status,
                CheckoutGroup.currency,
                CheckoutGroup.total_minor,
                CheckoutGroup.reservation_expires_at,
                Order.id,
                Order.seller_id,
                Order.status.label("order_status"),
                Order.subtotal_minor,
                Order.paid_at,
            )
            .outerjoin(Order, Order.group_id == CheckoutGroup.id)
            .where(CheckoutGroup.id == group_id)
            .order_by(Order.id)
        )
    ).all()
    if not rows:
        return None
    first = rows[0]
    orders = tuple(
        GroupOrder(
            order_id=row.id,
            seller_id=row.seller_id,
            status=row.order_status,
            subtotal_minor=row.subtotal_minor,
            paid=row.paid_at is not None,
        )
        for row in rows
        if row.id is not None
    )
    return GroupForPayment(
        group_id=group_id,
        buyer_id=first.buyer_id,
        status=first.status,
        currency=first.currency,
        total_minor=first.total_minor,
        reservation_expires_at=first.reservation_expires_at,
        order_ids=tuple(order.order_id for order in orders),
        orders=orders,
    )


async def mark_group_paid(session: AsyncSession, runtime: Runtime, group_id: uuid.UUID) -> bool:
    """The group was paid: it and each of its unpaid orders become ``paid`` (a
    compare-and-set; each order's move is recorded as the system's and publishes
    ``order.paid``), and its held stock is committed to the orders.

    Returns False, changing nothing, unless the group is ``pending_payment``: already
    paid (a second delivery of the payment event), expired or cancelled. It does not
    re-take holds that ran out: a payment should call :func:`pay_group`, which does."""
    return await service.mark_group_paid(session, runtime, group_id, service.Acting(Actor.system))


async def pay_group(session: AsyncSession, runtime: Runtime, group_id: uuid.UUID) -> PayOutcome:
    """The one call payments makes when money for ``group_id`` is confirmed.

    - ``pending_payment`` or ``expired`` (the holds ran out, whether or not the expiry
      job came by): the stock of the orders not cancelled is held again if it is still
      there (holds still running are kept), then the group and those orders become
      ``paid`` and the stock is committed to them -> ``PayOutcome.paid``. Orders move
      ``pending_payment -> paid`` (``pay``) or ``expired -> paid`` (``pay_late``), each
      recorded as the system's (reason :data:`PAID_LATE` when the holds had run out)
      and publishing ``order.paid``.
    - the stock was sold to someone else meanwhile -> ``PayOutcome.stock_gone``,
      nothing changed (the group stays as it was; the money is to be refunded).
    - already ``paid`` -> ``PayOutcome.already_paid``, nothing changed.
    - ``cancelled`` (every order cancelled before payment), or no such group ->
      ``PayOutcome.not_payable``, nothing changed.

    Concurrent calls for one group, and the expiry job, are serialized on the group's
    row: exactly one of them applies. Runs in the caller's transaction (it uses a
    savepoint, so a ``stock_gone`` leaves the caller's other work in place)."""
    return await service.pay_group(session, runtime, group_id, service.Acting(Actor.system))


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


@lru_cache(maxsize=1)
def _summary_statement() -> Any:
    """The read behind :func:`order_summary` (``order_id``), built once: every order
    event's notifications run it."""
    orders: Any = Order.__table__
    return select(
        orders.c.id,
        orders.c.number,
        orders.c.group_id,
        orders.c.buyer_id,
        orders.c.seller_id,
        orders.c.status,
        orders.c.currency,
        orders.c.subtotal_minor,
    ).where(orders.c.id == bindparam("order_id"))


async def order_summary(session: AsyncSession, order_id: uuid.UUID) -> OrderSummary | None:
    """The order ``order_id`` in brief (one query); ``None`` when there is none."""
    row = (await session.execute(_summary_statement(), {"order_id": order_id})).first()
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
