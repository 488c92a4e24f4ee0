"""The events the sellers domain publishes (through the outbox).

Every event of a store's review carries the same payload: which store, who decided (the
applicant for ``seller.applied``, an administrator otherwise) and why. Handlers read the
store's current state through :mod:`soko.sellers.public`.
"""

from __future__ import annotations

import uuid
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

SELLER_APPLIED = "seller.applied"
SELLER_APPROVED = "seller.approved"
SELLER_REJECTED = "seller.rejected"
SELLER_SUSPENDED = "seller.suspended"
SELLER_REINSTATED = "seller.reinstated"


class SellerEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: ClassVar[str]

    seller_id: uuid.UUID
    actor_id: uuid.UUID | None
    reason: str = ""


class SellerApplied(SellerEvent):
    """A user applied for a store; it waits for review."""

    name = SELLER_APPLIED


class SellerApproved(SellerEvent):
    """The store may sell from now on; its owners hold the ``seller`` role."""

    name = SELLER_APPROVED


class SellerRejected(SellerEvent):
    """The application was turned down."""

    name = SELLER_REJECTED


class SellerSuspended(SellerEvent):
    """The store may no longer sell: its products leave the catalog and cannot be bought."""

    name = SELLER_SUSPENDED


class SellerReinstated(SellerEvent):
    """A suspended store may sell again."""

    name = SELLER_REINSTATED
