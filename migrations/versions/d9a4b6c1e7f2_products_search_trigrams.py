"""products search trigrams

Revision ID: d9a4b6c1e7f2
Revises: c3f8a1d2e4b5
Create Date: 2026-12-07 23:55:00.000000

On PostgreSQL, a trigram index (pg_trgm, GIN) on ``catalog_products.search_text``: the
listing's ``q`` filter is a ``LIKE '%words%'``, which without it read the text of every
product, a tenth of a second on 100,000 products for words nobody used. The extension
ships in PostgreSQL's contrib and is trusted, so the database's owner may create it.
Nothing changes on SQLite.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "d9a4b6c1e7f2"
down_revision: str | Sequence[str] | None = "c3f8a1d2e4b5"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    op.create_index(
        "ix_catalog_products_search",
        "catalog_products",
        ["search_text"],
        unique=False,
        postgresql_using="gin",
        postgresql_ops={"search_text": "gin_trgm_ops"},
        postgresql_with={"fastupdate": "off"},
    )


def downgrade() -> None:
    # The extension stays: other objects of the database may use it by now.
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_catalog_products_search", table_name="catalog_products")
