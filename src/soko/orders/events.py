"""The events the orders domain publishes (through the outbox), for payments,
notifications and the sellers' tools.

``order.placed`` is published once per order when a checkout creates it; every move of
the state machine publishes the event the table in :mod:`soko.orders.states` names for
it, with :class:`OrderMoved`; every step of a dispute publishes a :class:`DisputeEvent`.
Payloads carry ids and the facts of the change; handlers read anything else through
:mod:`soko.orders.public`.
"""

from __future__ import annotations

import datetime as dt
import uuid

from pydantic import BaseModel, ConfigDict

ORDER_PLACED = "order.placed"
ORDER_PAID = "order.paid"
ORDER_PROCESSING = "order.processing"
ORDER_SHIPPED = "order.shipped"
ORDER_DELIVERED = "order.delivered"
ORDER_COMPLETED = "order.completed"
ORDER_CANCELLED = "order.cancelled"
ORDER_EXPIRED = "order.expired"
ORDER_DISPUTED = "order.disputed"
ORDER_REFUNDED = "order.refunded"
DISPUTE_OPENED = "dispute.opened"
DISPUTE_ANSWERED = "dispute.answered"
DISPUTE_RESOLVED = "dispute.resolved"


class OrderPlaced(BaseModel):
    """A checkout created this order; its stock is held until the group is paid."""

    model_config = ConfigDict(frozen=True)

    order_id: uuid.UUID
    group_id: uuid.UUID
    number: str
    buyer_id: uuid.UUID
    seller_id: uuid.UUID
    currency: str
    subtotal_minor: int
    item_count: int
    placed_at: dt.datetime


class OrderMoved(BaseModel):
    """An order moved from one state to another (the event's name says which move).

    ``refund_due_minor`` is set when the move owes the buyer money back: an order
    cancelled after payment (its subtotal), or a dispute settled with a refund."""

    model_config = ConfigDict(frozen=True)

    order_id: uuid.UUID
    group_id: uuid.UUID
    number: str
    buyer_id: uuid.UUID
    seller_id: uuid.UUID
    from_status: str
    to_status: str
    actor_id: uuid.UUID | None
    actor_kind: str
    reason: str = ""
    at: dt.datetime
    currency: str
    refund_due_minor: int | None = None
    carrier: str | None = None
    tracking_number: str | None = None


class DisputeEvent(BaseModel):
    """A step of a dispute: opened by the buyer, answered by the seller, resolved by the
    marketplace (``outcome`` refund or reject, with ``refund_minor`` for a refund)."""

    model_config = ConfigDict(frozen=True)

    dispute_id: uuid.UUID
    order_id: uuid.UUID
    buyer_id: uuid.UUID
    seller_id: uuid.UUID
    status: str
    actor_id: uuid.UUID | None
    at: dt.datetime
    outcome: str | None = None
    refund_minor: int | None = None
    currency: str | None = None
