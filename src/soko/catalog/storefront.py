"""What buyers see: the public product listing, a product's page and the category tree.

Only published products of active stores are shown; anything else answers 404 like a
missing product. Reads are built with Core selects into plain dicts and serialized once
(no ORM objects, no per-item models), and cached whole, body and ETag together, so a
cached answer costs no SQL and no serialization.

A listing page costs two statements whatever its filters:

1. the page of products, with "active store" (``sellers.public.active_seller_ids``), the
   category subtree and, for ``in_stock``, inventory's availability embedded as
   subqueries;
2. the active variants of those products, each with its availability (inventory's read
   model, ``inventory.public.availability_by_variant``, joined in).

Cache tags follow the data (ADR 0006): a page carries the catalog's, the sellers' and
inventory's tags, so a product edit, a store suspension or a stock movement is seen on
the next read; a product page also carries its product's tag and the categories' tag.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    Select,
    String,
    and_,
    any_,
    bindparam,
    exists,
    literal_column,
    select,
    true,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.types import Uuid

from soko.catalog.categories import CATEGORIES_TAG, category_tree
from soko.catalog.models import Category, Product, ProductStatus, Variant, VariantStatus
from soko.catalog.public import CATALOG_TAG, product_tag
from soko.inventory.public import INVENTORY_TAG, availability_by_variant
from soko.platform import jsonbody
from soko.platform.db import UTCDateTime, json_text, sql_constant
from soko.platform.etag import etag_for_content
from soko.platform.pagination import (
    FieldSelection,
    Keyset,
    PageRequest,
    SortKey,
    decode_cursor,
    encode_cursor,
)
from soko.platform.runtime import Runtime
from soko.sellers.public import SELLERS_TAG, active_seller_ids, seller_cards

# A safety net, not the mechanism: every write invalidates what it changed.
LISTING_TTL_SECONDS = 30.0
PRODUCT_TTL_SECONDS = 30.0
CATEGORIES_TTL_SECONDS = 60.0
LISTING_TAGS = (CATALOG_TAG, SELLERS_TAG, INVENTORY_TAG)
# Bumped when the cached shape changes, so a rolling deploy never serves the old one.
_CACHE_VERSION = "v2"


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
    seller: uuid.UUID | None = None  # a store's id ...
    seller_slug: str | None = None  # ... or its slug (lower-case), never both
    min_price: int | None = None
    max_price: int | None = None
    currency: str | None = None
    in_stock: bool = False
    q: str | None = None

    def key(self) -> list[Any]:
        """The filters as a JSON-able list, for cache keys."""
        return [
            self.category,
            None if self.seller is None else str(self.seller),
            self.min_price,
            self.max_price,
            self.currency,
            self.in_stock,
            self.q,
            self.seller_slug,
        ]


@dataclass(frozen=True, slots=True)
class Rendered:
    """A cacheable answer: the JSON body and its ETag, or nothing (404)."""

    body: bytes | None
    etag: str | None

    @classmethod
    def of(cls, payload: Any) -> Rendered:
        body = jsonbody.dumps(payload)
        return cls(body, etag_for_content(body))

    def to_cache(self) -> bytes:
        """The ETag, a newline, then the body; empty for "nothing" (an ETag has no
        newline: it is a quoted string of visible characters)."""
        if self.body is None or self.etag is None:
            return b""
        return self.etag.encode("ascii") + b"\n" + self.body

    @classmethod
    def from_cache(cls, value: bytes) -> Rendered:
        if not value:
            return cls(None, None)
        etag, _, body = value.partition(b"\n")
        return cls(body, etag.decode("ascii"))


async def cached(
    runtime: Runtime,
    key: str,
    render: Callable[[], Awaitable[Rendered]],
    *,
    ttl: float,
    tags: Sequence[str],
) -> Rendered:
    """The rendered answer from the cache, or ``render()``'s. ``render`` opens its own
    connection, so a cache hit never checks one out of the pool. A process keeps near
    copies of what it served (dropped on every invalidation, in every process), so a
    page asked for again costs no round trip to a shared cache."""

    async def factory() -> bytes:
        return (await render()).to_cache()

    raw = await runtime.cache.get_or_set_raw(key, factory, ttl, tags, near=True)
    return Rendered.from_cache(raw)


# -- the statements, built once per shape ---------------------------------------------------------
#
# Building a SQLAlchemy statement costs more CPU than running it, so the listing's
# statements are built once for each combination of filters and order (a few hundred at
# most) with named parameters, and only the parameters change from one request to the
# next. The compiled form is cached by SQLAlchemy and the prepared statement by asyncpg.

# _card reads these by position: keep the order in step with it. The JSON columns come as
# their stored text, written into the answer unparsed on PostgreSQL (json_text).
_CARD_COLUMNS = (
    Product.id,
    Product.seller_id,
    Product.title,
    Product.description,
    Product.category_id,
    json_text(Product.attributes),
    json_text(Product.images),
    Product.currency,
    Product.min_price_minor,
    Product.published_at,
)

_VARIANT_COLUMNS: tuple[Any, ...] = (
    Variant.id,
    Variant.product_id,
    Variant.sku,
    json_text(Variant.options),
    Variant.price_minor,
    Variant.currency,
    Variant.compare_at_minor,
    Variant.weight_grams,
)


def _now_parameter() -> datetime:
    # Inventory's read model compares hold expiry with ``now``; a bound parameter in its
    # place lets one built statement serve every request at that request's time.
    parameter: Any = bindparam("now", type_=UTCDateTime())
    return cast(datetime, parameter)


def _ids_in(column: Any, name: str, dialect: str) -> ColumnElement[bool]:
    if dialect == "postgresql":
        # One array parameter: no per-request rendering of a placeholder per id.
        return cast(ColumnElement[bool], column == any_(bindparam(name, type_=ARRAY(Uuid()))))
    return cast(ColumnElement[bool], column.in_(bindparam(name, expanding=True)))


def _variant_active() -> ColumnElement[bool]:
    return Variant.status == sql_constant(VariantStatus.active.value)


def _visible() -> list[ColumnElement[bool]]:
    return [
        Product.status == sql_constant(ProductStatus.published.value),
        Product.seller_id.in_(active_seller_ids()),
    ]


@dataclass(frozen=True, slots=True)
class _Shape:
    """Which filters a listing request uses: one built statement per shape."""

    sort: ProductSort
    category: str | None  # "id", "slug" or None
    seller: str | None  # "id", "slug" or None
    min_price: bool
    max_price: bool
    currency: bool
    in_stock: bool
    q: bool
    after: bool


@lru_cache(maxsize=1024)
def _page_statement(shape: _Shape, limit: int) -> Select[Any]:
    """The page's statement for ``shape``, ``limit`` rows written into its SQL.

    The limit is not sent as a parameter: PostgreSQL plans a LIMIT it cannot see anew on
    every execution (its generic plan, costed for an unknown limit, looks dearer than a
    custom one), a tenth of a millisecond of its CPU a page. Clients ask for few page
    sizes (most never change the default), so the statements stay few."""
    conditions = _visible()
    if shape.category is not None:
        named = (
            Category.id == bindparam("category", type_=Uuid())
            if shape.category == "id"
            else Category.slug == bindparam("category", type_=String())
        )
        subtree = select(Category.path).where(named).scalar_subquery()
        conditions.append(
            Product.category_id.in_(select(Category.id).where(Category.path.startswith(subtree)))
        )
    if shape.seller == "id":
        conditions.append(Product.seller_id == bindparam("seller", type_=Uuid()))
    elif shape.seller == "slug":
        # The store's address resolves inside this statement (one row at most, NULL and
        # so nothing listed for an unknown or inactive store): no statement of its own.
        store = active_seller_ids(slug=bindparam("seller", type_=String())).scalar_subquery()
        conditions.append(Product.seller_id == store)
    if shape.currency:
        conditions.append(Product.currency == bindparam("currency", type_=String()))
    if shape.min_price:
        conditions.append(Product.min_price_minor >= bindparam("min_price", type_=BigInteger()))
    if shape.max_price:
        conditions.append(Product.min_price_minor <= bindparam("max_price", type_=BigInteger()))
    if shape.q:
        conditions.append(Product.search_text.like(bindparam("q", type_=String()), escape="\\"))
    if shape.in_stock:
        # Correlated per variant, so PostgreSQL pushes the variant into inventory's
        # aggregate and reads only that variant's stock rows; joined instead, it would
        # aggregate all stock of the marketplace on every request.
        availability = availability_by_variant(_now_parameter()).subquery("availability")
        available = (
            select(availability.c.available)
            .where(availability.c.variant_id == Variant.id)
            .scalar_subquery()
        )
        # The flag first: the page is then a range of one of the stocked indexes, and
        # only products with units on hand have their availability worked out.
        conditions.append(Product.stocked == true())
        conditions.append(
            exists(
                select(Variant.id).where(
                    Variant.product_id == Product.id,
                    _variant_active(),
                    available > 0,
                )
            )
        )
    keyset = LISTINGS[shape.sort]
    if shape.after:
        keys = keyset.keys
        left = tuple_(*(key.column for key in keys))
        right = tuple_(
            *(bindparam(f"after_{i}", type_=key.column.type) for i, key in enumerate(keys))
        )
        # Each order sorts its key and the id the same way, so one row-value comparison
        # selects "after the cursor" and stays an index range scan.
        conditions.append(left < right if keys[0].descending else left > right)
    return (
        select(*_CARD_COLUMNS)
        .where(and_(*conditions))
        .order_by(*keyset.order_by())
        .limit(literal_column(str(limit), Integer()))
    )


@lru_cache(maxsize=4)
def _offers_statement(dialect: str) -> Select[Any]:
    """The active variants of a page of products, each with its availability (``NULL``
    for a variant without stock anywhere): one statement, inventory's read model
    restricted to those variants inside it."""
    of_products = (
        _ids_in(Variant.product_id, "product_ids", dialect),
        _variant_active(),
    )
    available = availability_by_variant(
        _now_parameter(), select(Variant.id).where(*of_products)
    ).subquery("availability")
    return (
        select(*_VARIANT_COLUMNS, available.c.available)
        .outerjoin(available, available.c.variant_id == Variant.id)
        .where(*of_products)
        .order_by(Variant.product_id, Variant.position, Variant.created_at, Variant.id)
    )


def _like_pattern(text: str) -> str:
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# -- money and variants as plain data -----------------------------------------------------------


def _money(amount: int | None, currency: str) -> dict[str, Any] | None:
    return None if amount is None else {"amount": amount, "currency": currency}


async def _offers(
    db: AsyncConnection | AsyncSession, runtime: Runtime, product_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[dict[str, Any]]]:
    """The active variants of each product with what can be bought now: one statement."""
    by_product: dict[uuid.UUID, list[dict[str, Any]]] = {pid: [] for pid in product_ids}
    if not product_ids:
        return by_product
    rows = (
        await db.execute(
            _offers_statement(runtime.db.dialect),
            {"product_ids": product_ids, "now": runtime.clock.now()},
        )
    ).all()
    # Rows unpacked as tuples (in _VARIANT_COLUMNS' order, then the availability): a
    # Row's attribute access costs several times more, sixty variants a page.
    for variant_id, product_id, sku, options, price, currency, compare_at, weight, left in rows:
        count = 0 if left is None or left < 0 else int(left)
        by_product[product_id].append(
            {
                "id": variant_id,
                "sku": sku,
                "options": options,
                "price": {"amount": price, "currency": currency},
                "compare_at_price": _money(compare_at, currency),
                "weight_grams": weight,
                "available": count,
                "in_stock": count > 0,
            }
        )
    return by_product


def _card(row: Sequence[Any], offered: list[dict[str, Any]]) -> dict[str, Any]:
    """A product card from a row starting with ``_CARD_COLUMNS`` (unpacked by position,
    like the variants)."""
    (product_id, seller_id, title, description, category_id) = row[:5]
    (attributes, images, currency, min_price, published_at) = row[5:10]
    return {
        "id": product_id,
        "title": title,
        "description": description,
        "category_id": category_id,
        "seller_id": seller_id,
        "attributes": attributes,
        "images": images,
        "currency": currency,
        "min_price": {"amount": min_price, "currency": currency},
        "in_stock": any(variant["in_stock"] for variant in offered),
        "published_at": published_at,
        "variants": offered,
    }


# -- the listing ---------------------------------------------------------------------------------


def _shape_and_parameters(
    runtime: Runtime, filters: ProductFilters, sort: ProductSort, page: PageRequest
) -> tuple[_Shape, dict[str, Any]]:
    parameters: dict[str, Any] = {}
    category_kind = None
    if filters.category is not None:
        try:
            parameters["category"] = uuid.UUID(filters.category)
            category_kind = "id"
        except ValueError:
            parameters["category"] = filters.category
            category_kind = "slug"
    optional = {
        "seller": filters.seller if filters.seller is not None else filters.seller_slug,
        "min_price": filters.min_price,
        "max_price": filters.max_price,
        "currency": filters.currency,
        "q": _like_pattern(filters.q) if filters.q else None,
    }
    parameters.update({name: value for name, value in optional.items() if value is not None})
    if filters.in_stock:
        parameters["now"] = runtime.clock.now()
    keyset = LISTINGS[sort]
    if page.cursor:
        values = decode_cursor(
            page.cursor, scope=keyset.scope, key=page.signing_key, arity=len(keyset.keys)
        )
        parameters.update({f"after_{i}": value for i, value in enumerate(values)})
    shape = _Shape(
        sort=sort,
        category=category_kind,
        seller="id" if filters.seller is not None else "slug" if filters.seller_slug else None,
        min_price=filters.min_price is not None,
        max_price=filters.max_price is not None,
        currency=filters.currency is not None,
        in_stock=filters.in_stock,
        q=bool(filters.q),
        after=bool(page.cursor),
    )
    return shape, parameters


async def product_page(
    db: AsyncConnection | AsyncSession,
    runtime: Runtime,
    filters: ProductFilters,
    sort: ProductSort,
    page: PageRequest,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of the public listing as plain data, and the next page's cursor."""
    shape, parameters = _shape_and_parameters(runtime, filters, sort, page)
    rows = (await db.execute(_page_statement(shape, page.limit + 1), parameters)).all()
    next_cursor = None
    if len(rows) > page.limit:
        rows = rows[: page.limit]
        keyset = LISTINGS[sort]
        next_cursor = encode_cursor(
            [getattr(rows[-1], key.column.key) for key in keyset.keys],
            scope=keyset.scope,
            key=page.signing_key,
        )
    offers = await _offers(db, runtime, [row.id for row in rows])
    return [_card(row, offers[row[0]]) for row in rows], next_cursor


def listing_cache_key(
    filters: ProductFilters, sort: ProductSort, page: PageRequest, fields: FieldSelection
) -> str:
    """Every parameter of the request, JSON-encoded so that no two requests share a key
    (a separator inside a free-text value cannot make one filter look like another)."""
    selected = None if fields.fields is None else sorted(fields.fields)
    described = json.dumps(
        [sort.value, page.limit, page.cursor, selected, *filters.key()],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return f"catalog:products:{_CACHE_VERSION}:{described}"


async def render_listing(
    runtime: Runtime,
    filters: ProductFilters,
    sort: ProductSort,
    page: PageRequest,
    fields: FieldSelection,
) -> Rendered:
    """The listing page as cached JSON and its ETag."""

    async def render() -> Rendered:
        # Autocommit on PostgreSQL (each statement has its own snapshot at READ COMMITTED
        # anyway); one deferred transaction on SQLite.
        async with runtime.db.reading() as connection:
            items, next_cursor = await product_page(connection, runtime, filters, sort, page)
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
    offered = (await _offers(session, runtime, [row.id]))[row.id]
    card = (await seller_cards(session, [row.seller_id])).get(row.seller_id)
    if card is None:  # the store vanished between the two reads
        return None
    detail = _card(row, offered)
    detail["seller"] = {"id": card.id, "slug": card.slug, "store_name": card.store_name}
    detail["category"] = (
        {"id": row.category_id, "slug": row.category_slug, "name": row.category_name}
        if row.category_id is not None
        else None
    )
    return detail


async def render_product(runtime: Runtime, product_id: uuid.UUID) -> Rendered:
    """A product page as cached JSON and its ETag; an empty body when it is not shown."""

    async def render() -> Rendered:
        async with runtime.db.transaction(read_only=True) as session:
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
    async def render() -> Rendered:
        async with runtime.db.transaction(read_only=True) as session:
            return Rendered.of({"items": await category_tree(session)})

    return await cached(
        runtime,
        f"catalog:categories:{_CACHE_VERSION}",
        render,
        ttl=CATEGORIES_TTL_SECONDS,
        tags=(CATEGORIES_TAG,),
    )
