"""What buyers see: the public product listing, a product's page and the category tree.

Only published products of active stores are shown; anything else answers 404 like a
missing product. Reads are built with Core selects into plain dicts and serialized once
(no ORM objects, no per-item models), and cached whole, body and ETag together, so a
cached answer costs no SQL and no serialization.

A listing page costs three statements whatever its filters:

1. the page of products, with "active store" (``sellers.public.active_seller_ids``), the
   category subtree and, for ``in_stock``, inventory's availability embedded as
   subqueries;
2. the active variants of those products;
3. the availability of those variants (``inventory.public.available_for``).

Cache tags follow the data (ADR 0006): a page carries the catalog's, the sellers' and
inventory's tags, so a product edit, a store suspension or a stock movement is seen on
the next read; a product page also carries its product's tag and the categories' tag.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic_core import to_json
from sqlalchemy import ColumnElement, Select, and_, exists, select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.catalog.categories import CATEGORIES_TAG, category_tree
from soko.catalog.models import Category, Product, ProductStatus, Variant, VariantStatus
from soko.catalog.public import CATALOG_TAG, product_tag
from soko.inventory.public import INVENTORY_TAG, availability_by_variant, available_for
from soko.platform.etag import etag_for_content
from soko.platform.pagination import FieldSelection, Keyset, PageRequest, SortKey
from soko.platform.runtime import Runtime
from soko.sellers.public import SELLERS_TAG, active_seller_ids, seller_cards

# A safety net, not the mechanism: every write invalidates what it changed.
LISTING_TTL_SECONDS = 30.0
PRODUCT_TTL_SECONDS = 30.0
CATEGORIES_TTL_SECONDS = 60.0
LISTING_TAGS = (CATALOG_TAG, SELLERS_TAG, INVENTORY_TAG)
# Bumped when the cached shape changes, so a rolling deploy never serves the old one.
_CACHE_VERSION = "v1"


class ProductSort(StrEnum):
    newest = "newest"
    price = "price"
    price_desc = "-price"
    by_title = "title"  # not `title`: str.title would be shadowed


_LISTING = "catalog.products"
LISTINGS: dict[ProductSort, Keyset] = {
    ProductSort.newest: Keyset(
        _LISTING, SortKey(Product.published_at, descending=True), id_column=Product.id
    ),
    ProductSort.price: Keyset(_LISTING, SortKey(Product.min_price_minor), id_column=Product.id),
    ProductSort.price_desc: Keyset(
        _LISTING, SortKey(Product.min_price_minor, descending=True), id_column=Product.id
    ),
    ProductSort.by_title: Keyset(_LISTING, SortKey(Product.title), id_column=Product.id),
}


@dataclass(frozen=True, slots=True)
class ProductFilters:
    """The public listing's filters, already validated."""

    category: str | None = None  # a slug or an id; includes the descendants
    seller: uuid.UUID | None = None
    min_price: int | None = None
    max_price: int | None = None
    currency: str | None = None
    in_stock: bool = False
    q: str | None = None

    def key(self) -> str:
        return "|".join(
            "" if value is None else str(value)
            for value in (
                self.category,
                self.seller,
                self.min_price,
                self.max_price,
                self.currency,
                int(self.in_stock),
                self.q,
            )
        )


@dataclass(frozen=True, slots=True)
class Rendered:
    """A cacheable answer: the JSON body and its ETag, or nothing (404)."""

    body: bytes | None
    etag: str | None

    @classmethod
    def of(cls, payload: Any) -> Rendered:
        body = to_json(payload)
        return cls(body, etag_for_content(body))

    def to_cache(self) -> dict[str, Any]:
        return {"b": self.body.decode() if self.body is not None else None, "e": self.etag}

    @classmethod
    def from_cache(cls, value: dict[str, Any]) -> Rendered:
        body = value["b"]
        return cls(body.encode() if body is not None else None, value["e"])


async def cached(
    runtime: Runtime,
    key: str,
    render: Callable[[AsyncSession], Awaitable[Rendered]],
    *,
    ttl: float,
    tags: Sequence[str],
) -> Rendered:
    """The rendered answer from the cache, or rendered in a read-only transaction of its
    own: a cache hit never checks out a database connection."""

    async def factory() -> dict[str, Any]:
        async with runtime.db.transaction(read_only=True) as session:
            return (await render(session)).to_cache()

    return Rendered.from_cache(await runtime.cache.get_or_set(key, factory, ttl, tags))


# -- money and variants as plain data -----------------------------------------------------------


def _money(amount: int | None, currency: str) -> dict[str, Any] | None:
    return None if amount is None else {"amount": amount, "currency": currency}


_VARIANT_COLUMNS = (
    Variant.id,
    Variant.product_id,
    Variant.sku,
    Variant.options,
    Variant.price_minor,
    Variant.currency,
    Variant.compare_at_minor,
    Variant.weight_grams,
)


async def _variants_for_sale(
    session: AsyncSession, runtime: Runtime, product_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[dict[str, Any]]]:
    """The active variants of each product with their availability: two statements."""
    by_product: dict[uuid.UUID, list[dict[str, Any]]] = {pid: [] for pid in product_ids}
    if not product_ids:
        return by_product
    rows = (
        await session.execute(
            select(*_VARIANT_COLUMNS)
            .where(
                Variant.product_id.in_(product_ids),
                Variant.status == VariantStatus.active.value,
            )
            .order_by(Variant.product_id, Variant.position, Variant.created_at, Variant.id)
        )
    ).all()
    available = await available_for(session, runtime, [row.id for row in rows])
    for row in rows:
        count = max(0, available.get(row.id, 0))
        by_product[row.product_id].append(
            {
                "id": row.id,
                "sku": row.sku,
                "options": row.options,
                "price": {"amount": row.price_minor, "currency": row.currency},
                "compare_at_price": _money(row.compare_at_minor, row.currency),
                "weight_grams": row.weight_grams,
                "available": count,
                "in_stock": count > 0,
            }
        )
    return by_product


# -- the listing ---------------------------------------------------------------------------------

_CARD_COLUMNS = (
    Product.id,
    Product.seller_id,
    Product.title,
    Product.description,
    Product.category_id,
    Product.attributes,
    Product.images,
    Product.currency,
    Product.min_price_minor,
    Product.published_at,
)


def _visible() -> list[ColumnElement[bool]]:
    return [
        Product.status == ProductStatus.published.value,
        Product.seller_id.in_(active_seller_ids()),
    ]


def _in_category(category: str) -> ColumnElement[bool]:
    try:
        named = Category.id == uuid.UUID(category)
    except ValueError:
        named = Category.slug == category
    subtree_path = select(Category.path).where(named).scalar_subquery()
    return Product.category_id.in_(
        select(Category.id).where(Category.path.startswith(subtree_path))
    )


def _in_stock(runtime: Runtime) -> ColumnElement[bool]:
    available = availability_by_variant(runtime.clock.now()).subquery("availability")
    return exists(
        select(Variant.id)
        .join(available, available.c.variant_id == Variant.id)
        .where(
            Variant.product_id == Product.id,
            Variant.status == VariantStatus.active.value,
            available.c.available > 0,
        )
    )


def listing_statement(runtime: Runtime, filters: ProductFilters) -> Select[Any]:
    """The listing's products before ordering and paging."""
    conditions = _visible()
    if filters.category is not None:
        conditions.append(_in_category(filters.category))
    if filters.seller is not None:
        conditions.append(Product.seller_id == filters.seller)
    if filters.currency is not None:
        conditions.append(Product.currency == filters.currency)
    if filters.min_price is not None:
        conditions.append(Product.min_price_minor >= filters.min_price)
    if filters.max_price is not None:
        conditions.append(Product.min_price_minor <= filters.max_price)
    if filters.q:
        conditions.append(Product.search_text.contains(filters.q.lower(), autoescape=True))
    if filters.in_stock:
        conditions.append(_in_stock(runtime))
    return select(*_CARD_COLUMNS).where(and_(*conditions))


async def product_page(
    session: AsyncSession,
    runtime: Runtime,
    filters: ProductFilters,
    sort: ProductSort,
    page: PageRequest,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of the public listing as plain data, and the next page's cursor."""
    rows, next_cursor = await LISTINGS[sort].fetch(
        session, listing_statement(runtime, filters), page
    )
    variants = await _variants_for_sale(session, runtime, [row.id for row in rows])
    items = []
    for row in rows:
        offered = variants[row.id]
        items.append(
            {
                "id": row.id,
                "title": row.title,
                "description": row.description,
                "category_id": row.category_id,
                "seller_id": row.seller_id,
                "attributes": row.attributes,
                "images": row.images,
                "currency": row.currency,
                "min_price": {"amount": row.min_price_minor, "currency": row.currency},
                "in_stock": any(variant["in_stock"] for variant in offered),
                "published_at": row.published_at,
                "variants": offered,
            }
        )
    return items, next_cursor


def listing_cache_key(
    filters: ProductFilters, sort: ProductSort, page: PageRequest, fields: FieldSelection
) -> str:
    selected = "" if fields.fields is None else ",".join(sorted(fields.fields))
    return (
        f"catalog:products:{_CACHE_VERSION}:{sort.value}:{page.limit}:{page.cursor or ''}:"
        f"{selected}:{filters.key()}"
    )


async def render_listing(
    runtime: Runtime,
    filters: ProductFilters,
    sort: ProductSort,
    page: PageRequest,
    fields: FieldSelection,
) -> Rendered:
    """The listing page as cached JSON and its ETag."""

    async def render(session: AsyncSession) -> Rendered:
        items, next_cursor = await product_page(session, runtime, filters, sort, page)
        if fields.fields is not None:
            wanted = fields.fields
            items = [{k: v for k, v in item.items() if k in wanted} for item in items]
        return Rendered.of({"items": items, "next_cursor": next_cursor})

    return await cached(
        runtime,
        listing_cache_key(filters, sort, page, fields),
        render,
        ttl=LISTING_TTL_SECONDS,
        tags=LISTING_TAGS,
    )


# -- one product ---------------------------------------------------------------------------------


async def product_detail(
    session: AsyncSession, runtime: Runtime, product_id: uuid.UUID
) -> dict[str, Any] | None:
    """A published product of an active store with its variants, their availability, its
    store and its category; ``None`` when buyers may not see it."""
    row = (
        await session.execute(
            select(
                *_CARD_COLUMNS,
                Category.slug.label("category_slug"),
                Category.name.label("category_name"),
            )
            .outerjoin(Category, Category.id == Product.category_id)
            .where(Product.id == product_id, *_visible())
        )
    ).first()
    if row is None:
        return None
    variants = (await _variants_for_sale(session, runtime, [row.id]))[row.id]
    card = (await seller_cards(session, [row.seller_id])).get(row.seller_id)
    if card is None:  # the store vanished between the two reads
        return None
    return {
        "id": row.id,
        "title": row.title,
        "description": row.description,
        "category_id": row.category_id,
        "seller_id": row.seller_id,
        "attributes": row.attributes,
        "images": row.images,
        "currency": row.currency,
        "min_price": {"amount": row.min_price_minor, "currency": row.currency},
        "in_stock": any(variant["in_stock"] for variant in variants),
        "published_at": row.published_at,
        "variants": variants,
        "seller": {"id": card.id, "slug": card.slug, "store_name": card.store_name},
        "category": (
            {"id": row.category_id, "slug": row.category_slug, "name": row.category_name}
            if row.category_id is not None
            else None
        ),
    }


async def render_product(runtime: Runtime, product_id: uuid.UUID) -> Rendered:
    """A product page as cached JSON and its ETag; an empty body when it is not shown."""

    async def render(session: AsyncSession) -> Rendered:
        detail = await product_detail(session, runtime, product_id)
        return Rendered(None, None) if detail is None else Rendered.of(detail)

    return await cached(
        runtime,
        f"catalog:product:{_CACHE_VERSION}:{product_id}",
        render,
        ttl=PRODUCT_TTL_SECONDS,
        tags=(product_tag(product_id), CATEGORIES_TAG, SELLERS_TAG, INVENTORY_TAG),
    )


async def render_categories(runtime: Runtime) -> Rendered:
    async def render(session: AsyncSession) -> Rendered:
        return Rendered.of({"items": await category_tree(session)})

    return await cached(
        runtime,
        f"catalog:categories:{_CACHE_VERSION}",
        render,
        ttl=CATEGORIES_TTL_SECONDS,
        tags=(CATEGORIES_TAG,),
    )
