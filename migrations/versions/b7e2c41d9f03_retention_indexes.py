"""retention indexes

Revision ID: b7e2c41d9f03
Revises: 0881185ea920
Create Date: 2026-12-07 18:10:00.000000

Indexes on the time columns the hourly retention purges select by: ended sessions
(expires_at; revoked_at where revoked), spent one-time codes, link tokens and MFA
challenges (expires_at), and finished webhook deliveries (completed_at where finished).
Without them each run read those tables whole, even with nothing due.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b7e2c41d9f03"
down_revision: str | Sequence[str] | None = "0881185ea920"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EXPIRES = ("auth_sessions", "verification_tokens", "one_time_codes", "mfa_challenges")


def upgrade() -> None:
    for table in _EXPIRES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_index(f"ix_{table}_expires_at", ["expires_at"], unique=False)
    with op.batch_alter_table("auth_sessions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_auth_sessions_revoked_at",
            ["revoked_at"],
            unique=False,
            sqlite_where=sa.text("revoked_at IS NOT NULL"),
            postgresql_where=sa.text("revoked_at IS NOT NULL"),
        )
    with op.batch_alter_table("webhooks_deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_webhooks_deliveries_completed_at",
            ["completed_at"],
            unique=False,
            sqlite_where=sa.text("completed_at IS NOT NULL"),
            postgresql_where=sa.text("completed_at IS NOT NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("webhooks_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_webhooks_deliveries_completed_at")
    with op.batch_alter_table("auth_sessions", schema=None) as batch_op:
        batch_op.drop_index("ix_auth_sessions_revoked_at")
    for table in reversed(_EXPIRES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f"ix_{table}_expires_at")
