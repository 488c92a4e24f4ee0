"""What other domains may use of the catalog: frozen facts and cache tags, never ORM rows.

Carts and orders read variants through :func:`variants_for_sale` (one query however many
variants); cached reads that show catalog data carry :data:`CATALOG_TAG` or
:func:`product_tag` so a catalog change makes them stale.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import BindParameter, Select, bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from soko.catalog.models import Product, ProductStatus, Variant, VariantStatus
from soko.inventory.public import availability_by_variant
from soko.platform.db import UTCDateTime
from soko.sellers.public import active_seller_ids

__all__ = [
    "CATALOG_TAG",
    "VariantForSale",
    "product_tag",
    "variants_for_sale",
]

CATALOG_TAG = "catalog"
"""Invalidated by every catalog write: product lists and anything else that shows more
than one product."""


def product_tag(product_id: uuid.UUID) -> str:
    """The cache tag of one product and its variants, invalidated whenever either
    changes (title, price, status, a variant added or archived)."""
    return f"catalog:product:{product_id}"


@lru_cache(maxsize=2)
def _for_sale_statement(with_stock: bool) -> Select[Any]:
    """The statement of :func:`variants_for_sale`, built once with bind parameters
    (``variant_ids``, expanding, and ``stock_at``): building it anew, with inventory's
    availability as a subquery, cost more CPU than running it, on every checkout and
    every cart read."""
    ids: BindParameter[Any] = bindparam("variant_ids", expanding=True)
    query: Any = (
        select(
            Variant.id,
            Variant.product_id,
            Variant.seller_id,
            Variant.sku,
            Variant.options,
            Variant.price_minor,
            Variant.currency,
            Variant.compare_at_minor,
            Variant.weight_grams,
            Variant.status,
            Product.title,
            Product.images,
            Product.status.label("product_status"),
            Variant.seller_id.in_(active_seller_ids()).label("seller_active"),
        )
        .join(Product, Product.id == Variant.product_id)
        .where(Variant.id.in_(ids))
    )
    if with_stock:
        stock_at: Any = bindparam("stock_at", type_=UTCDateTime())
        stock = availability_by_variant(stock_at, ids).subquery()
        query = query.outerjoin(stock, stock.c.variant_id == Variant.id).add_columns(
            func.coalesce(stock.c.available, 0).label("available")
        )
    statement: Select[Any] = query
    return statement


@dataclass(frozen=True, slots=True)
class VariantForSale:
    """A variant as a cart or an order needs it, read at the moment of asking.

    ``purchasable`` says the product is published, the variant active and its store
    active (checkout asks the sellers domain again, under its own transaction); how
    many are in stock is inventory's answer, read in the same statement when asked
    (``available``).
    """

    variant_id: uuid.UUID
    product_id: uuid.UUID
    seller_id: uuid.UUID
    title: str  # the product's title
    sku: str
    options: dict[str, str]  # {"size": "M", "colour": "red"}
    price_minor: int
    currency: str
    compare_at_minor: int | None
    image: str | None  # the product's first image
    purchasable: bool
    weight_grams: int | None = None
    # Units available at the moment given as ``stock_at`` (inventory's read model, no
    # lock taken); None when the caller did not ask.
    available: int | None = None


async def variants_for_sale(
    session: AsyncSession | AsyncConnection,
    variant_ids: Iterable[uuid.UUID],
    *,
    stock_at: dt.datetime | None = None,
) -> dict[uuid.UUID, VariantForSale]:
    """The variants among ``variant_ids`` that exist, in one query; unknown ids are left
    out of the answer (archived variants, unpublished products and the products of a
    store that is not active are returned, with ``purchasable`` false, so a cart can
    show what became unavailable). With ``stock_at``, the same query also reads how
    many units of each are available at that moment."""
    ids = list(dict.fromkeys(variant_ids))
    if not ids:
        return {}
    parameters: dict[str, Any] = {"variant_ids": ids}
    if stock_at is not None:
        parameters["stock_at"] = stock_at
    rows = await session.execute(_for_sale_statement(stock_at is not None), parameters)
    found: dict[uuid.UUID, VariantForSale] = {}
    for row in rows:
        images = row.images or []
        found[row.id] = VariantForSale(
            variant_id=row.id,
            product_id=row.product_id,
            seller_id=row.seller_id,
            title=row.title,
            sku=row.sku,
            options=dict(row.options or {}),
            price_minor=row.price_minor,
            currency=row.currency,
            compare_at_minor=row.compare_at_minor,
            image=images[0] if images else None,
            purchasable=(
                row.product_status == ProductStatus.published.value
                and row.status == VariantStatus.active.value
                and bool(row.seller_active)
            ),
            weight_grams=row.weight_grams,
            available=max(0, int(row.available)) if stock_at is not None else None,
        )
    return found
