"""The catalog's tables: the category tree, products and their variants.

A product belongs to one seller (``seller_id``, no foreign key: sellers are another
domain). Its variants carry the SKU, the option values and the price; every variant of a
product shares the product's currency. ``min_price_minor`` and ``search_text`` are
denormalized onto the product so the public listing filters and sorts on one table.
"""

from __future__ import annotations

import datetime as dt
import uuid
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    DDL,
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from soko.platform.db import Base, UUIDPrimaryKey


class ProductStatus(StrEnum):
    draft = "draft"
    published = "published"
    archived = "archived"


class VariantStatus(StrEnum):
    active = "active"
    archived = "archived"


class AttributeType(StrEnum):
    text = "text"
    number = "number"
    boolean = "boolean"


class Category(UUIDPrimaryKey, Base):
    """A node of the category tree. ``path`` lists the ids from the root down to this
    node (``/<root>/<child>/``), so "this category and everything under it" is one
    prefix match instead of a recursive query."""

    __tablename__ = "catalog_categories"
    __table_args__ = (
        # text_pattern_ops lets PostgreSQL use the index for ``path LIKE 'prefix%'``
        # whatever the database collation.
        Index(
            "ix_catalog_categories_path",
            "path",
            postgresql_ops={"path": "text_pattern_ops"},
        ),
    )

    parent_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("catalog_categories.id"), index=True
    )
    slug: Mapped[str] = mapped_column(String(80), unique=True)
    name: Mapped[str] = mapped_column(String(120))
    path: Mapped[str] = mapped_column(Text)
    position: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    version: Mapped[int] = mapped_column(Integer, default=1)


class Product(UUIDPrimaryKey, Base):
    __tablename__ = "catalog_products"
    __table_args__ = (
        # The public listing's three orders, each behind the status filter; the id
        # breaks ties so every keyset page is one index range.
        Index("ix_catalog_products_listing_newest", "status", "published_at", "id"),
        Index("ix_catalog_products_listing_price", "status", "min_price_minor", "id"),
        Index("ix_catalog_products_listing_title", "status", "title", "id"),
        Index("ix_catalog_products_seller", "seller_id", "created_at", "id"),
        # The same three orders over the products with units on hand, for the
        # ``in_stock`` filter: a page of them reads no product without stock, however
        # few of the catalog's products have any. (Whole indexes, not partial ones:
        # SQLite prefers an index with more equalities to a partial index.)
        Index("ix_catalog_products_stocked_newest", "status", "stocked", "published_at", "id"),
        Index("ix_catalog_products_stocked_price", "status", "stocked", "min_price_minor", "id"),
        Index("ix_catalog_products_stocked_title", "status", "stocked", "title", "id"),
        # Trigrams of the lower-cased text, so PostgreSQL answers ``q`` (a LIKE
        # '%words%') from the index instead of reading every product's text. Elsewhere
        # the filter reads the table, as SQLite suits a single machine's catalog.
        Index(
            "ix_catalog_products_search",
            "search_text",
            postgresql_using="gin",
            postgresql_ops={"search_text": "gin_trgm_ops"},
            # Entries straight into the index, not a pending list that every search
            # reads whole until a vacuum merges it (and that makes the planner cost the
            # index above reading the table after a batch of new products).
            postgresql_with={"fastupdate": "off"},
        ).ddl_if(dialect="postgresql"),
        CheckConstraint("min_price_minor >= 0", name="min_price_not_negative"),
    )

    seller_id: Mapped[uuid.UUID] = mapped_column()
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    category_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("catalog_categories.id"), index=True
    )
    # [{"key": "material", "type": "text", "value": "cotton"}, ...], validated by type.
    attributes: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    images: Mapped[list[str]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16), default=ProductStatus.draft.value)
    currency: Mapped[str] = mapped_column(String(3))
    # The lowest price among the active variants (0 while there are none): the price
    # filter and sort read it without touching the variants.
    min_price_minor: Mapped[int] = mapped_column(BigInteger, default=0)
    # Lower-cased title and description, for the simple ``q`` filter.
    search_text: Mapped[str] = mapped_column(Text, default="")
    # Whether some variant has units on hand at an active location, held or not: kept by
    # inventory's presence listener in the transaction that moves stock across zero.
    stocked: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    published_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    version: Mapped[int] = mapped_column(Integer, default=1)


class Variant(UUIDPrimaryKey, Base):
    __tablename__ = "catalog_variants"
    __table_args__ = (
        UniqueConstraint("seller_id", "sku"),
        Index("ix_catalog_variants_product", "product_id", "position", "id"),
        CheckConstraint("price_minor >= 0", name="price_not_negative"),
        CheckConstraint(
            "compare_at_minor IS NULL OR compare_at_minor > price_minor",
            name="compare_at_above_price",
        ),
        CheckConstraint("weight_grams IS NULL OR weight_grams >= 0", name="weight_not_negative"),
    )

    product_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("catalog_products.id"))
    # Copied from the product so SKU uniqueness per seller is one constraint.
    seller_id: Mapped[uuid.UUID] = mapped_column()
    sku: Mapped[str] = mapped_column(String(64))
    options: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    price_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    compare_at_minor: Mapped[int | None] = mapped_column(BigInteger)
    weight_grams: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=VariantStatus.active.value)
    position: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    version: Mapped[int] = mapped_column(Integer, default=1)


# The trigram operator class comes with PostgreSQL's pg_trgm extension (in contrib, and
# trusted: the database's owner may create it). The migration creates it the same way.
_TRIGRAMS = DDL("CREATE EXTENSION IF NOT EXISTS pg_trgm")  # type: ignore[no-untyped-call]
event.listen(Product.__table__, "before_create", _TRIGRAMS.execute_if(dialect="postgresql"))
