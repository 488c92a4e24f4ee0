"""seller invitations

Revision ID: 0881185ea920
Revises: 5c0a7d3e9b21
Create Date: 2026-12-07 16:02:29.431732

Invitations to join a store (``soko.sellers.invitations``), which replace adding a
member directly: an owner invites an email address or phone number, and only an account
that has verified it may accept. The address is stored encrypted, with its blind index.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import soko.platform.db

revision: str = "0881185ea920"
down_revision: str | Sequence[str] | None = "5c0a7d3e9b21"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "seller_invitations",
        sa.Column("seller_id", sa.Uuid(), nullable=False),
        sa.Column("address_kind", sa.String(length=8), nullable=False),
        sa.Column("address_index", sa.String(length=64), nullable=False),
        sa.Column("address_ciphertext", sa.Text(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("invited_by", sa.Uuid(), nullable=False),
        sa.Column("created_at", soko.platform.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", soko.platform.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("decided_at", soko.platform.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("decided_by", sa.Uuid(), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.CheckConstraint(
            "address_kind IN ('email', 'phone')", name=op.f("ck_seller_invitations_address_kind")
        ),
        sa.CheckConstraint(
            "role IN ('owner', 'manager', 'staff')", name=op.f("ck_seller_invitations_role")
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'accepted', 'declined', 'revoked')",
            name=op.f("ck_seller_invitations_status"),
        ),
        sa.ForeignKeyConstraint(
            ["seller_id"],
            ["sellers.id"],
            name=op.f("fk_seller_invitations_seller_id_sellers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_seller_invitations")),
    )
    with op.batch_alter_table("seller_invitations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_seller_invitations_address_index_created_at",
            ["address_index", "created_at"],
            unique=False,
        )
        batch_op.create_index(
            "ix_seller_invitations_invited_by_created_at",
            ["invited_by", "created_at"],
            unique=False,
        )
        batch_op.create_index(
            "ix_seller_invitations_open",
            ["seller_id", "address_index"],
            unique=True,
            sqlite_where=sa.text("status = 'pending'"),
            postgresql_where=sa.text("status = 'pending'"),
        )
        batch_op.create_index(
            "ix_seller_invitations_seller_id_created_at", ["seller_id", "created_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("seller_invitations", schema=None) as batch_op:
        batch_op.drop_index("ix_seller_invitations_seller_id_created_at")
        batch_op.drop_index(
            "ix_seller_invitations_open",
            sqlite_where=sa.text("status = 'pending'"),
            postgresql_where=sa.text("status = 'pending'"),
        )
        batch_op.drop_index("ix_seller_invitations_invited_by_created_at")
        batch_op.drop_index("ix_seller_invitations_address_index_created_at")

    op.drop_table("seller_invitations")
