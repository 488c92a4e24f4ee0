"""The cart domain's tables.

A cart belongs either to a signed-in user (``user_id``) or to whoever holds its secret
token (``token_hash``, the SHA-256 of the token, which is shown once and never stored).
A cart changes only through conditional UPDATEs that bump ``version``: the version is
the ETag clients send back in ``If-Match``, and bumping it first also takes the cart's
row lock, so every writer of one cart's lines waits its turn.
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
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from soko.platform.db import Base, UUIDPrimaryKey


class CartStatus(StrEnum):
    open = "open"
    merged = "merged"  # an anonymous cart folded into its owner's cart on sign-in
    converted = "converted"  # checked out
    expired = "expired"  # abandoned for longer than cart_expiry_hours


MAX_LINE_QUANTITY = 999
# Different variants in one cart: bounds what reading, pricing and checking out a cart
# costs (a merge on sign-in may go past it; adding a line then is refused).
MAX_CART_LINES = 200

_OPEN = text("status = 'open'")


class Cart(UUIDPrimaryKey, Base):
    __tablename__ = "carts"
    __table_args__ = (
        # One open cart per user, whatever the race: a second create finds the first.
        Index(
            "uq_carts_open_user",
            "user_id",
            unique=True,
            postgresql_where=_OPEN,
            sqlite_where=_OPEN,
        ),
        # The expiry job walks open carts by their last change.
        Index("ix_carts_status_updated_at", "status", "updated_at"),
    )

    user_id: Mapped[uuid.UUID | None]
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default=CartStatus.open.value)
    currency: Mapped[str] = mapped_column(String(3))
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    merged_into: Mapped[uuid.UUID | None]


class CartLine(UUIDPrimaryKey, Base):
    """One variant in a cart, with the price it had when the buyer added it."""

    __tablename__ = "cart_lines"
    __table_args__ = (
        UniqueConstraint("cart_id", "variant_id"),
        CheckConstraint(f"quantity BETWEEN 1 AND {MAX_LINE_QUANTITY}", name="quantity_range"),
    )

    cart_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("carts.id", ondelete="CASCADE"))
    # A catalog variant; no foreign key across domains.
    variant_id: Mapped[uuid.UUID]
    quantity: Mapped[int] = mapped_column(Integer)
    unit_price_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    added_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
