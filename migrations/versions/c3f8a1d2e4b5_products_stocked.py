"""products stocked

Revision ID: c3f8a1d2e4b5
Revises: b7e2c41d9f03
Create Date: 2026-12-07 23:40:00.000000

``catalog_products.stocked``: whether some variant of the product has units on hand at an
active location, kept by inventory's presence listener from now on and worked out here
for the products already stored. Three indexes, the listing's three orders behind the
status and the flag, serve the ``in_stock`` filter: without them a page of it tested
the stock of every product in turn until it had found enough, seconds on a large
catalog whose shelves are mostly empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c3f8a1d2e4b5"
down_revision: str | Sequence[str] | None = "b7e2c41d9f03"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ORDERS = (("newest", "published_at"), ("price", "min_price_minor"), ("title", "title"))


def upgrade() -> None:
    with op.batch_alter_table("catalog_products", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("stocked", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    op.execute(
        """
        UPDATE catalog_products SET stocked = EXISTS (
            SELECT 1
            FROM catalog_variants
            JOIN inventory_stock_levels
                ON inventory_stock_levels.variant_id = catalog_variants.id
            JOIN inventory_locations
                ON inventory_locations.id = inventory_stock_levels.location_id
            WHERE catalog_variants.product_id = catalog_products.id
                AND inventory_stock_levels.on_hand > 0
                AND inventory_locations.active
        )
        """
    )
    with op.batch_alter_table("catalog_products", schema=None) as batch_op:
        for name, column in _ORDERS:
            batch_op.create_index(
                f"ix_catalog_products_stocked_{name}",
                ["status", "stocked", column, "id"],
                unique=False,
            )


def downgrade() -> None:
    with op.batch_alter_table("catalog_products", schema=None) as batch_op:
        for name, _ in reversed(_ORDERS):
            batch_op.drop_index(f"ix_catalog_products_stocked_{name}")
        batch_op.drop_column("stocked")
