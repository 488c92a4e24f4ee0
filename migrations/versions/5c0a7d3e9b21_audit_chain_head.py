"""audit chain head

Revision ID: 5c0a7d3e9b21
Revises: e1d4f345dc6d
Create Date: 2026-12-06 21:55:00.000000

The audit log's last event as one row, which PostgreSQL's appends update together with
the insert of each event. Nothing is copied here: the first append after this revision
writes the row from the newest event (``soko.identity.audit``).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5c0a7d3e9b21"
down_revision: str | Sequence[str] | None = "e1d4f345dc6d"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_audit_chain_head_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_chain_head")),
    )


def downgrade() -> None:
    op.drop_table("audit_chain_head")
