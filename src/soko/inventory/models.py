"""The inventory domain's tables.

A stock level is one variant at one location. Its three counters move only through
conditional UPDATEs, and the CHECK constraints are the last line of defence: whatever a
bug does, the database refuses negative stock and more committed units than are on hand.
"""

from __future__ import annotations

import datetime as dt
import uuid
from enum import StrEnum

from sqlalchemy import (
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


def _in(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class LocationKind(StrEnum):
    warehouse = "warehouse"
    shop = "shop"


class AdjustmentKind(StrEnum):
    set = "set"  # the seller counted and set the level
    adjust = "adjust"  # a delta without a more specific cause
    sale = "sale"  # units left with a shipped order
    return_ = "return"  # units came back
    correction = "correction"  # a miscount put right


class ReservationStatus(StrEnum):
    held = "held"  # counted in reserved until expires_at
    committed = "committed"  # paid: counted in allocated
    released = "released"  # given back on purpose (cancelled, expired order)
    expired = "expired"  # given back because its hold time ran out
    fulfilled = "fulfilled"  # shipped: left on_hand
    renewed = "renewed"  # ended, then held again under a new row by rehold_if_available


class InventoryItem(Base):
    """A variant inventory knows about, and whose it is: registered by the catalog so
    inventory can check ownership without reading the catalog's tables."""

    __tablename__ = "inventory_items"

    variant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    seller_id: Mapped[uuid.UUID] = mapped_column(index=True)
    sku: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime]


class Location(UUIDPrimaryKey, Base):
    """A place a seller keeps stock: a warehouse or a shop. An inactive location keeps
    its levels and history but serves no new reservation."""

    __tablename__ = "inventory_locations"
    __table_args__ = (
        CheckConstraint(_in("kind", LocationKind), name="kind"),
        UniqueConstraint("seller_id", "name"),
    )

    seller_id: Mapped[uuid.UUID] = mapped_column(index=True)
    name: Mapped[str] = mapped_column(String(120))
    kind: Mapped[str] = mapped_column(String(16), default=LocationKind.warehouse.value)
    address: Mapped[str] = mapped_column(Text, default="")
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    version: Mapped[int] = mapped_column(Integer, default=1)


class StockLevel(Base):
    """How many units of one variant are at one location, and how many of them are
    promised: ``reserved`` to checkouts not yet paid, ``allocated`` to paid orders."""

    __tablename__ = "inventory_stock_levels"
    __table_args__ = (
        CheckConstraint("on_hand >= 0", name="on_hand_not_negative"),
        CheckConstraint("reserved >= 0", name="reserved_not_negative"),
        CheckConstraint("allocated >= 0", name="allocated_not_negative"),
        CheckConstraint("reserved + allocated <= on_hand", name="committed_within_on_hand"),
        Index("ix_inventory_stock_levels_seller_variant", "seller_id", "variant_id"),
    )

    variant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("inventory_items.variant_id"), primary_key=True
    )
    location_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("inventory_locations.id"), primary_key=True
    )
    seller_id: Mapped[uuid.UUID]
    on_hand: Mapped[int] = mapped_column(Integer, default=0)
    reserved: Mapped[int] = mapped_column(Integer, default=0)
    allocated: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[dt.datetime]


class StockAdjustment(UUIDPrimaryKey, Base):
    """One change of on_hand: who made it, why, by how much, and what it left."""

    __tablename__ = "inventory_stock_adjustments"
    __table_args__ = (
        CheckConstraint(_in("kind", AdjustmentKind), name="kind"),
        Index("ix_inventory_stock_adjustments_seller_at", "seller_id", "at", "id"),
        Index("ix_inventory_stock_adjustments_variant_at", "variant_id", "at", "id"),
    )

    variant_id: Mapped[uuid.UUID]
    location_id: Mapped[uuid.UUID]
    seller_id: Mapped[uuid.UUID]
    delta: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(500), default="")
    kind: Mapped[str] = mapped_column(String(16))
    actor_id: Mapped[uuid.UUID | None]  # None: the system (a shipped order)
    on_hand_after: Mapped[int] = mapped_column(Integer)
    at: Mapped[dt.datetime]


class Reservation(UUIDPrimaryKey, Base):
    """Units of one stock level promised to a holder (a checkout group)."""

    __tablename__ = "inventory_reservations"
    __table_args__ = (
        CheckConstraint(_in("status", ReservationStatus), name="status"),
        CheckConstraint("quantity > 0", name="quantity_positive"),
        Index("ix_inventory_reservations_status_expires", "status", "expires_at"),
        Index("ix_inventory_reservations_holder", "holder_ref"),
        # Expired holds of the variants being reserved are released inline; this finds them.
        Index("ix_inventory_reservations_variant_status", "variant_id", "status", "expires_at"),
    )

    holder_ref: Mapped[uuid.UUID]
    variant_id: Mapped[uuid.UUID]
    location_id: Mapped[uuid.UUID]
    quantity: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=ReservationStatus.held.value)
    expires_at: Mapped[dt.datetime]
    created_at: Mapped[dt.datetime]
    ended_at: Mapped[dt.datetime | None]
    end_reason: Mapped[str | None] = mapped_column(String(200))
