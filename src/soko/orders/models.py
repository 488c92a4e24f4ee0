"""The orders domain's tables: checkout groups, orders and their lines, the record of
every move, and disputes.

A checkout makes one group (what the buyer pays once) and one order per seller in it.
Lines keep the title, SKU, options and price as they were at checkout: the catalog may
change afterwards, an order never does. Sellers, buyers, variants and products are other
domains' rows and are stored by id only.
"""

from __future__ import annotations

import datetime as dt
import uuid
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, CheckConstraint, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

# The idempotency table is the platform's; the app loads it with the platform's models.
# Imported here as well so that every process that knows orders knows its checkout keys.
import soko.platform.idempotency  # noqa: F401
from soko.orders.states import Actor, OrderStatus
from soko.platform.db import Base, UUIDPrimaryKey

NUMBER_MAX_LENGTH = 20
CARRIER_MAX_LENGTH = 100
TRACKING_MAX_LENGTH = 100
REASON_MAX_LENGTH = 500
DETAILS_MAX_LENGTH = 4000


class GroupStatus(StrEnum):
    pending_payment = "pending_payment"  # waiting for the buyer's one payment
    paid = "paid"
    expired = "expired"  # not paid before the stock holds ran out
    cancelled = "cancelled"  # every order in it was cancelled before payment


class DisputeStatus(StrEnum):
    open = "open"  # opened by the buyer, waiting for the seller
    answered = "answered"  # the seller responded; waiting for the marketplace
    resolved_refund = "resolved_refund"  # settled with a full or partial refund
    resolved_rejected = "resolved_rejected"  # settled for the seller


class DisputeReason(StrEnum):
    not_received = "not_received"
    not_as_described = "not_as_described"
    damaged = "damaged"
    other = "other"


def _in(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class CheckoutGroup(UUIDPrimaryKey, Base):
    """One checkout: the orders placed together and paid with one payment."""

    __tablename__ = "orders_checkout_groups"
    __table_args__ = (
        CheckConstraint(_in("status", GroupStatus), name="status"),
        CheckConstraint("total_minor >= 0", name="total_not_negative"),
        # The expiry job: unpaid groups whose holds ran out, oldest first.
        Index("ix_orders_checkout_groups_status_expires", "status", "reservation_expires_at"),
        Index("ix_orders_checkout_groups_buyer_created", "buyer_id", "created_at"),
    )

    buyer_id: Mapped[uuid.UUID]
    cart_id: Mapped[uuid.UUID]
    status: Mapped[str] = mapped_column(String(16))
    currency: Mapped[str] = mapped_column(String(3))
    # What the group costs: its orders less those cancelled before it was paid (one
    # cancelled later keeps counting: it was paid, and its refund is its own record).
    total_minor: Mapped[int] = mapped_column(BigInteger)
    reservation_expires_at: Mapped[dt.datetime]
    shipping_address: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[dt.datetime]
    paid_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    updated_at: Mapped[dt.datetime]
    version: Mapped[int] = mapped_column(Integer, default=1)


class Order(UUIDPrimaryKey, Base):
    """What one seller owes one buyer from one checkout."""

    __tablename__ = "orders"
    __table_args__ = (
        CheckConstraint(_in("status", OrderStatus), name="status"),
        CheckConstraint("subtotal_minor >= 0", name="subtotal_not_negative"),
        CheckConstraint("item_count >= 1", name="item_count_positive"),
        Index("ix_orders_buyer_placed", "buyer_id", "placed_at"),
        Index("ix_orders_seller_placed", "seller_id", "placed_at"),
        Index("ix_orders_group_id", "group_id"),
        # The auto-complete job: delivered orders, oldest delivery first.
        Index("ix_orders_status_delivered", "status", "delivered_at"),
    )

    group_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders_checkout_groups.id"))
    seller_id: Mapped[uuid.UUID]
    buyer_id: Mapped[uuid.UUID]
    # A short reference people can read out on the phone ("SK-7KQ2M-9XA3D").
    number: Mapped[str] = mapped_column(String(NUMBER_MAX_LENGTH), unique=True)
    status: Mapped[str] = mapped_column(String(20))
    currency: Mapped[str] = mapped_column(String(3))
    subtotal_minor: Mapped[int] = mapped_column(BigInteger)
    item_count: Mapped[int] = mapped_column(Integer)
    carrier: Mapped[str | None] = mapped_column(String(CARRIER_MAX_LENGTH), default=None)
    tracking_number: Mapped[str | None] = mapped_column(String(TRACKING_MAX_LENGTH), default=None)
    placed_at: Mapped[dt.datetime]
    paid_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    shipped_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    completed_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    cancelled_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    updated_at: Mapped[dt.datetime]
    version: Mapped[int] = mapped_column(Integer, default=1)


class OrderLine(UUIDPrimaryKey, Base):
    """One variant bought, as it was at checkout."""

    __tablename__ = "orders_lines"
    __table_args__ = (
        CheckConstraint("quantity >= 1", name="quantity_positive"),
        CheckConstraint("line_total_minor = unit_price_minor * quantity", name="line_total"),
        Index("ix_orders_lines_order_id", "order_id"),
    )

    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"))
    variant_id: Mapped[uuid.UUID]
    product_id: Mapped[uuid.UUID]
    title: Mapped[str] = mapped_column(String(200))
    sku: Mapped[str] = mapped_column(String(64))
    options: Mapped[dict[str, str]] = mapped_column(JSON)
    unit_price_minor: Mapped[int] = mapped_column(BigInteger)
    quantity: Mapped[int] = mapped_column(Integer)
    line_total_minor: Mapped[int] = mapped_column(BigInteger)
    position: Mapped[int] = mapped_column(Integer)


class OrderTransition(UUIDPrimaryKey, Base):
    """One move of an order: from which state to which, who made it, when and why."""

    __tablename__ = "orders_transitions"
    __table_args__ = (
        CheckConstraint(_in("actor_kind", Actor), name="actor_kind"),
        Index("ix_orders_transitions_order_at", "order_id", "at"),
    )

    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"))
    from_status: Mapped[str] = mapped_column(String(20))
    to_status: Mapped[str] = mapped_column(String(20))
    actor_id: Mapped[uuid.UUID | None]
    actor_kind: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(REASON_MAX_LENGTH), default="")
    at: Mapped[dt.datetime]


class Dispute(UUIDPrimaryKey, Base):
    """A buyer's complaint about a delivered order, the seller's answer and the
    marketplace's decision. At most one per order."""

    __tablename__ = "orders_disputes"
    __table_args__ = (
        CheckConstraint(_in("status", DisputeStatus), name="status"),
        CheckConstraint(_in("reason", DisputeReason), name="reason"),
        CheckConstraint("refund_minor IS NULL OR refund_minor > 0", name="refund_positive"),
        Index("ix_orders_disputes_status_opened", "status", "opened_at"),
    )

    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders.id"), unique=True)
    buyer_id: Mapped[uuid.UUID]
    seller_id: Mapped[uuid.UUID]
    status: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str] = mapped_column(String(20))
    details: Mapped[str] = mapped_column(Text)
    evidence_urls: Mapped[list[str]] = mapped_column(JSON)
    seller_response: Mapped[str | None] = mapped_column(Text, default=None)
    responded_by: Mapped[uuid.UUID | None] = mapped_column(default=None)
    responded_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    resolution_note: Mapped[str | None] = mapped_column(Text, default=None)
    refund_minor: Mapped[int | None] = mapped_column(BigInteger, default=None)
    resolved_by: Mapped[uuid.UUID | None] = mapped_column(default=None)
    opened_at: Mapped[dt.datetime]
    resolved_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    version: Mapped[int] = mapped_column(Integer, default=1)
