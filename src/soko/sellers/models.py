"""The sellers domain's tables: stores, the people who act for them, and the history of
the marketplace's decisions about them.

A store's payout details are never stored in clear: they are an AES-GCM ciphertext of a
JSON object, bound to the store's row and column like identity's emails.
"""

from __future__ import annotations

import datetime as dt
import uuid
from enum import StrEnum

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from soko.platform.db import Base, UUIDPrimaryKey
from soko.platform.encrypted import encrypted_column

SLUG_MAX_LENGTH = 60
STORE_NAME_MAX_LENGTH = 120


class SellerStatus(StrEnum):
    pending = "pending"  # applied, waiting for review
    active = "active"  # approved: may sell
    suspended = "suspended"  # approved once, stopped by the marketplace
    rejected = "rejected"  # the application was turned down


class SellerRole(StrEnum):
    """A member's role in one store, from the most to the least powerful."""

    owner = "owner"  # everything, including members and payout details
    manager = "manager"  # the store's profile, products, stock and orders
    staff = "staff"  # reads, and fulfils what the other domains allow staff to

    @property
    def rank(self) -> int:
        return _RANKS[self]


_RANKS = {SellerRole.owner: 3, SellerRole.manager: 2, SellerRole.staff: 1}


def _in(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class Seller(UUIDPrimaryKey, Base):
    """A store on the marketplace."""

    __tablename__ = "sellers"
    __table_args__ = (
        CheckConstraint(_in("status", SellerStatus), name="status"),
        # The review queue and the admin list: by status, newest first.
        Index("ix_sellers_status_created_at", "status", "created_at"),
    )

    slug: Mapped[str] = mapped_column(String(SLUG_MAX_LENGTH), unique=True)
    store_name: Mapped[str] = mapped_column(String(STORE_NAME_MAX_LENGTH))
    description: Mapped[str] = mapped_column(Text, default="")
    contact_email: Mapped[str | None] = mapped_column(String(254))
    contact_phone: Mapped[str | None] = mapped_column(String(32))
    # A JSON object encrypted under the data keys, bound to "sellers.payout_details:<id>".
    payout_details_ciphertext: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default=SellerStatus.pending.value)
    status_reason: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[uuid.UUID]
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    reviewed_at: Mapped[dt.datetime | None]
    reviewed_by: Mapped[uuid.UUID | None]
    # Bumped on every change: the ETag of the store's profile names it.
    version: Mapped[int] = mapped_column(Integer, default=1)


class SellerMember(Base):
    """A user acting for a store, with their role in it."""

    __tablename__ = "seller_members"
    __table_args__ = (
        CheckConstraint(_in("role", SellerRole), name="role"),
        # "Which stores does this user act for": every seller route asks it.
        Index("ix_seller_members_user_id", "user_id"),
    )

    seller_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("sellers.id", ondelete="CASCADE"), primary_key=True
    )
    # A user of the identity domain; no foreign key across domains.
    user_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    added_at: Mapped[dt.datetime]
    added_by: Mapped[uuid.UUID | None]


class InvitationStatus(StrEnum):
    pending = "pending"  # sent, waiting for the invitee (until expires_at)
    accepted = "accepted"  # the invitee joined the store
    declined = "declined"  # the invitee said no
    revoked = "revoked"  # an owner took it back, or invited the same person again


class SellerInvitation(UUIDPrimaryKey, Base):
    """An owner's invitation to join a store, sent to an email address or phone number.

    Nobody becomes a member without accepting, and only an account that has verified
    the address may accept. The address is stored encrypted (bound to the row and
    column) with the blind index that matches it against accounts' verified addresses.
    """

    __tablename__ = "seller_invitations"
    __table_args__ = (
        CheckConstraint(_in("role", SellerRole), name="role"),
        CheckConstraint(_in("status", InvitationStatus), name="status"),
        CheckConstraint("address_kind IN ('email', 'phone')", name="address_kind"),
        # At most one open invitation per store and address: a new one replaces it.
        Index(
            "ix_seller_invitations_open",
            "seller_id",
            "address_index",
            unique=True,
            sqlite_where=text("status = 'pending'"),
            postgresql_where=text("status = 'pending'"),
        ),
        # A store's invitations, newest first.
        Index("ix_seller_invitations_seller_id_created_at", "seller_id", "created_at"),
        # "Which invitations wait for me", and the daily limit per address.
        Index("ix_seller_invitations_address_index_created_at", "address_index", "created_at"),
        # The daily limit per inviting user.
        Index("ix_seller_invitations_invited_by_created_at", "invited_by", "created_at"),
    )

    seller_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sellers.id", ondelete="CASCADE"))
    address_kind: Mapped[str] = mapped_column(String(8))
    address_index: Mapped[str] = mapped_column(String(64))
    # The address, encrypted under the data keys, bound to "seller_invitations.address:<id>".
    address_ciphertext: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=InvitationStatus.pending.value)
    invited_by: Mapped[uuid.UUID]
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    decided_at: Mapped[dt.datetime | None]
    decided_by: Mapped[uuid.UUID | None]


class SellerStatusEvent(UUIDPrimaryKey, Base):
    """One decision about a store (applied, approved, rejected, suspended, reinstated):
    who made it, when, and why."""

    __tablename__ = "seller_status_events"

    seller_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("sellers.id", ondelete="CASCADE"), index=True
    )
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    actor_id: Mapped[uuid.UUID | None]
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[dt.datetime]


# Encrypted with the data keys (see soko.platform.encrypted): a JSON object of strings,
# and an invitation's email address or phone number.
PAYOUT_DETAILS_COLUMN = encrypted_column(
    "sellers.payout_details", Seller.id, Seller.payout_details_ciphertext
)
INVITATION_ADDRESS_COLUMN = encrypted_column(
    "seller_invitations.address", SellerInvitation.id, SellerInvitation.address_ciphertext
)
