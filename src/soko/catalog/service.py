"""Sellers' products and variants: the rules of creating, changing, publishing and
archiving them.

Every write to a product or one of its variants first locks the product row
(``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's writers are serialized already), so
the product's denormalized ``min_price_minor``, its version and the "a published product
keeps an active variant" rule are computed from a state no one else is changing. The
product's version counts changes to the product and to its variants: the ETag of the
seller's view of a product names it.

A product or variant of another store answers 404, like one that does not exist.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from soko.catalog.errors import (
    ProductNeedsVariant,
    ProductStateConflict,
    SkuFixed,
    SkuTaken,
    TooManyVariants,
)
from soko.catalog.events import (
    PRODUCT_ARCHIVED,
    PRODUCT_PUBLISHED,
    ProductArchived,
    ProductPublished,
)
from soko.catalog.models import Category, Product, ProductStatus, Variant, VariantStatus
from soko.catalog.public import CATALOG_TAG, product_tag
from soko.catalog.schemas import (
    MAX_VARIANTS_PER_PRODUCT,
    AttributeOut,
    ProductCreate,
    ProductUpdate,
    SellerProductOut,
    SellerVariantOut,
    VariantIn,
    VariantUpdate,
    attribute_values,
)
from soko.inventory.public import register_item
from soko.platform.errors import NotFound, PreconditionFailed, ValidationFailed
from soko.platform.etag import etag_for_version, if_match_passes
from soko.platform.ids import uuid7
from soko.platform.money import Money, UnknownCurrencyError, minor_units
from soko.platform.outbox import publish
from soko.platform.runtime import Runtime, invalidate_after_commit
from soko.sellers.public import ActingSeller, SellerRole, require_active, require_role

PUBLISHABLE_FROM = frozenset({ProductStatus.draft.value, ProductStatus.archived.value})
ARCHIVABLE_FROM = frozenset({ProductStatus.draft.value, ProductStatus.published.value})


# -- views ------------------------------------------------------------------------------------


def variant_view(variant: Variant) -> SellerVariantOut:
    return SellerVariantOut(
        id=variant.id,
        product_id=variant.product_id,
        sku=variant.sku,
        options=variant.options,
        price=Money(variant.price_minor, variant.currency),
        compare_at_price=(
            Money(variant.compare_at_minor, variant.currency)
            if variant.compare_at_minor is not None
            else None
        ),
        weight_grams=variant.weight_grams,
        status=VariantStatus(variant.status),
        position=variant.position,
        created_at=variant.created_at,
        updated_at=variant.updated_at,
        version=variant.version,
    )


def product_view(product: Product, variants: Sequence[Variant]) -> SellerProductOut:
    has_active = any(v.status == VariantStatus.active.value for v in variants)
    return SellerProductOut(
        id=product.id,
        seller_id=product.seller_id,
        title=product.title,
        description=product.description,
        category_id=product.category_id,
        attributes=[AttributeOut.model_validate(a) for a in product.attributes],
        images=list(product.images),
        status=ProductStatus(product.status),
        currency=product.currency,
        min_price=Money(product.min_price_minor, product.currency) if has_active else None,
        published_at=product.published_at,
        created_at=product.created_at,
        updated_at=product.updated_at,
        version=product.version,
        variants=[variant_view(v) for v in variants],
    )


def product_etag(product: Product) -> str:
    return etag_for_version(product.version)


# -- reading a store's own products --------------------------------------------------------------


def _variant_order() -> tuple[Any, ...]:
    return (Variant.position, Variant.created_at, Variant.id)


async def variants_of(
    session: AsyncSession, product_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, list[Variant]]:
    """The variants (any status) of each product, in display order: one query."""
    ids = list(product_ids)
    found: dict[uuid.UUID, list[Variant]] = {product_id: [] for product_id in ids}
    if not ids:
        return found
    rows = await session.scalars(
        select(Variant).where(Variant.product_id.in_(ids)).order_by(*_variant_order())
    )
    for variant in rows:
        found[variant.product_id].append(variant)
    return found


async def own_product(
    session: AsyncSession, acting: ActingSeller, product_id: uuid.UUID, *, lock: bool = False
) -> Product:
    """The acting store's product; 404 for another store's, like a missing one."""
    statement = select(Product).where(
        Product.id == product_id, Product.seller_id == acting.seller_id
    )
    if lock:
        statement = statement.with_for_update()
    product = await session.scalar(statement.execution_options(populate_existing=True))
    if product is None:
        raise NotFound("No product with this id in your store.")
    return product


def select_own_products(acting: ActingSeller, status: ProductStatus | None) -> Select[Any]:
    """The acting store's products (any status unless one is named), to page through."""
    statement = select(Product).where(Product.seller_id == acting.seller_id)
    if status is not None:
        statement = statement.where(Product.status == status.value)
    return statement


async def own_variant(
    session: AsyncSession, acting: ActingSeller, variant_id: uuid.UUID
) -> Variant:
    """The acting store's variant; 404 for another store's, like a missing one."""
    variant = await session.scalar(
        select(Variant).where(Variant.id == variant_id, Variant.seller_id == acting.seller_id)
    )
    if variant is None:
        raise NotFound("No variant with this id in your store.")
    return variant


async def own_product_view(
    session: AsyncSession, acting: ActingSeller, product_id: uuid.UUID
) -> SellerProductOut:
    product = await own_product(session, acting, product_id)
    variants = await variants_of(session, [product.id])
    return product_view(product, variants[product.id])


# -- checks shared by the writes -----------------------------------------------------------------


def _check_if_match(if_match: str | None, version: int) -> None:
    current = etag_for_version(version)
    if not if_match_passes(if_match, current):
        raise PreconditionFailed(
            "The product has changed since you read it: fetch it again and retry.",
            current_etag=current,
        )


def _check_currency(currency: str, field: str) -> None:
    try:
        minor_units(currency)
    except UnknownCurrencyError:
        raise ValidationFailed.of_field(field, "is not a currency this marketplace knows") from None


def _check_images(runtime: Runtime, images: Iterable[Any], field: str = "images") -> list[str]:
    urls = [str(url) for url in images]
    if runtime.settings.is_production:
        for index, url in enumerate(urls):
            if not url.startswith("https://"):
                raise ValidationFailed.of_field(f"{field}.{index}", "must be an https URL")
    return urls


def _check_attributes(attributes: Sequence[Any]) -> list[dict[str, Any]]:
    keys = [attribute.key for attribute in attributes]
    if len(set(keys)) != len(keys):
        raise ValidationFailed.of_field("attributes", "names the same key twice")
    return attribute_values(list(attributes))


async def _check_category(session: AsyncSession, category_id: uuid.UUID | None) -> None:
    if category_id is None:
        return
    if await session.scalar(select(Category.id).where(Category.id == category_id)) is None:
        raise ValidationFailed.of_field("category_id", "is not a category")


def _price_pair(
    currency: str, price: Money, compare_at: Money | None, field: str = ""
) -> tuple[int, int | None]:
    """The price and compare-at amounts, checked against the product's currency."""
    if price.currency != currency:
        raise ValidationFailed.of_field(
            f"{field}price", f"must be in the product's currency, {currency}"
        )
    if price.amount < 0:
        raise ValidationFailed.of_field(f"{field}price", "cannot be negative")
    if compare_at is None:
        return price.amount, None
    if compare_at.currency != currency:
        raise ValidationFailed.of_field(
            f"{field}compare_at_price", f"must be in the product's currency, {currency}"
        )
    if compare_at.amount <= price.amount:
        raise ValidationFailed.of_field(f"{field}compare_at_price", "must be above the price")
    return price.amount, compare_at.amount


def _search_text(title: str, description: str) -> str:
    return f"{title}\n{description}".lower()


async def _flush_variants(session: AsyncSession, skus: Iterable[str]) -> None:
    try:
        await session.flush()
    except IntegrityError as exc:
        # The unique (seller_id, sku) constraint settles races between two requests.
        taken = ", ".join(sorted(set(skus)))
        raise SkuTaken(f"The SKU {taken} is already used in your store.") from exc


async def _refresh_min_price(session: AsyncSession, product: Product) -> None:
    lowest = await session.scalar(
        select(func.min(Variant.price_minor)).where(
            Variant.product_id == product.id, Variant.status == VariantStatus.active.value
        )
    )
    product.min_price_minor = int(lowest or 0)


def _touch(session: AsyncSession, product: Product, now: dt.datetime) -> None:
    product.version += 1
    product.updated_at = now
    invalidate_after_commit(session, product_tag(product.id), CATALOG_TAG)


def _new_variant(product: Product, body: VariantIn, now: dt.datetime, field: str = "") -> Variant:
    price, compare_at = _price_pair(product.currency, body.price, body.compare_at_price, field)
    return Variant(
        id=uuid7(),
        product_id=product.id,
        seller_id=product.seller_id,
        sku=body.sku,
        options=dict(body.options),
        price_minor=price,
        currency=product.currency,
        compare_at_minor=compare_at,
        weight_grams=body.weight_grams,
        status=VariantStatus.active.value,
        position=body.position,
        created_at=now,
        updated_at=now,
        version=1,
    )


async def _register(session: AsyncSession, variants: Iterable[Variant]) -> None:
    # Inventory learns each variant's owner (and SKU) so it can check stock writes
    # without reading the catalog.
    for variant in variants:
        await register_item(
            session, variant_id=variant.id, seller_id=variant.seller_id, sku=variant.sku
        )


# -- products --------------------------------------------------------------------------------------


async def create_product(
    session: AsyncSession, runtime: Runtime, acting: ActingSeller, body: ProductCreate
) -> SellerProductOut:
    """A new draft product of the acting store, with the variants given."""
    require_role(acting, SellerRole.manager)
    currency = body.currency or runtime.settings.default_currency
    _check_currency(currency, "currency")
    await _check_category(session, body.category_id)
    skus = [variant.sku for variant in body.variants]
    if len(set(skus)) != len(skus):
        raise ValidationFailed.of_field("variants", "names the same SKU twice")
    now = runtime.clock.now()
    product = Product(
        id=uuid7(),
        seller_id=acting.seller_id,
        title=body.title,
        description=body.description,
        category_id=body.category_id,
        attributes=_check_attributes(body.attributes),
        images=_check_images(runtime, body.images),
        status=ProductStatus.draft.value,
        currency=currency,
        min_price_minor=0,
        search_text=_search_text(body.title, body.description),
        published_at=None,
        created_at=now,
        updated_at=now,
        version=1,
    )
    variants = [
        _new_variant(product, variant, now, f"variants.{index}.")
        for index, variant in enumerate(body.variants)
    ]
    product.min_price_minor = min((v.price_minor for v in variants), default=0)
    session.add(product)
    session.add_all(variants)
    await _flush_variants(session, skus)
    await _register(session, variants)
    invalidate_after_commit(session, product_tag(product.id), CATALOG_TAG)
    return product_view(product, variants)


async def update_product(
    session: AsyncSession,
    runtime: Runtime,
    acting: ActingSeller,
    product_id: uuid.UUID,
    body: ProductUpdate,
    *,
    if_match: str | None = None,
) -> SellerProductOut:
    require_role(acting, SellerRole.manager)
    product = await own_product(session, acting, product_id, lock=True)
    _check_if_match(if_match, product.version)
    sent = body.model_fields_set
    variants = (await variants_of(session, [product.id]))[product.id]
    if body.title is not None:
        product.title = body.title
    if body.description is not None:
        product.description = body.description
    if "category_id" in sent and body.category_id != product.category_id:
        await _check_category(session, body.category_id)
        product.category_id = body.category_id
    if body.attributes is not None:
        product.attributes = _check_attributes(body.attributes)
    if body.images is not None:
        product.images = _check_images(runtime, body.images)
    if body.currency is not None and body.currency != product.currency:
        _check_currency(body.currency, "currency")
        if variants:
            raise ValidationFailed.of_field(
                "currency", "cannot change once the product has variants"
            )
        product.currency = body.currency
    product.search_text = _search_text(product.title, product.description)
    _touch(session, product, runtime.clock.now())
    await session.flush()
    return product_view(product, variants)


async def publish_product(
    session: AsyncSession, runtime: Runtime, acting: ActingSeller, product_id: uuid.UUID
) -> SellerProductOut:
    """Make a draft or archived product visible to buyers: the store must be active and
    the product have an active variant."""
    require_role(acting, SellerRole.manager)
    product = await own_product(session, acting, product_id, lock=True)
    require_active(acting)
    if product.status not in PUBLISHABLE_FROM:
        raise ProductStateConflict(
            f"The product is {product.status}.", current_status=product.status
        )
    variants = (await variants_of(session, [product.id]))[product.id]
    if not any(v.status == VariantStatus.active.value for v in variants):
        raise ProductNeedsVariant("Add a variant with a price before publishing.")
    now = runtime.clock.now()
    product.status = ProductStatus.published.value
    # The first publication: a product archived and published again keeps its place
    # in the "newest" order, so a client paging through it neither skips nor repeats it.
    product.published_at = product.published_at or now
    _touch(session, product, now)
    await session.flush()
    await publish(
        session,
        PRODUCT_PUBLISHED,
        ProductPublished(
            product_id=product.id, seller_id=product.seller_id, actor_id=acting.user_id
        ),
    )
    return product_view(product, variants)


async def archive_product(
    session: AsyncSession, runtime: Runtime, acting: ActingSeller, product_id: uuid.UUID
) -> SellerProductOut:
    """Take a product out of the catalog (it can be published again later)."""
    require_role(acting, SellerRole.manager)
    product = await own_product(session, acting, product_id, lock=True)
    if product.status not in ARCHIVABLE_FROM:
        raise ProductStateConflict(
            f"The product is {product.status}.", current_status=product.status
        )
    product.status = ProductStatus.archived.value
    _touch(session, product, runtime.clock.now())
    await session.flush()
    await publish(
        session,
        PRODUCT_ARCHIVED,
        ProductArchived(
            product_id=product.id, seller_id=product.seller_id, actor_id=acting.user_id
        ),
    )
    variants = (await variants_of(session, [product.id]))[product.id]
    return product_view(product, variants)


# -- variants --------------------------------------------------------------------------------------


async def add_variant(
    session: AsyncSession,
    runtime: Runtime,
    acting: ActingSeller,
    product_id: uuid.UUID,
    body: VariantIn,
) -> SellerVariantOut:
    require_role(acting, SellerRole.manager)
    product = await own_product(session, acting, product_id, lock=True)
    # The product's lock queues every other variant write, so the count stays true.
    count = await session.scalar(
        select(func.count()).select_from(Variant).where(Variant.product_id == product.id)
    )
    if (count or 0) >= MAX_VARIANTS_PER_PRODUCT:
        raise TooManyVariants(
            f"A product holds at most {MAX_VARIANTS_PER_PRODUCT} variants.",
            max_variants=MAX_VARIANTS_PER_PRODUCT,
        )
    now = runtime.clock.now()
    variant = _new_variant(product, body, now)
    session.add(variant)
    await _flush_variants(session, [variant.sku])
    await _register(session, [variant])
    await _refresh_min_price(session, product)
    _touch(session, product, now)
    await session.flush()
    return variant_view(variant)


async def _own_variant_locked(
    session: AsyncSession, acting: ActingSeller, variant_id: uuid.UUID
) -> tuple[Product, Variant]:
    product_id = await session.scalar(
        select(Variant.product_id).where(
            Variant.id == variant_id, Variant.seller_id == acting.seller_id
        )
    )
    if product_id is None:
        raise NotFound("No variant with this id in your store.")
    # The product first: every variant write holds the product's lock.
    product = await own_product(session, acting, product_id, lock=True)
    variant = await session.scalar(
        select(Variant).where(Variant.id == variant_id).execution_options(populate_existing=True)
    )
    assert variant is not None  # a variant never leaves its product, nor is deleted
    return product, variant


async def update_variant(
    session: AsyncSession,
    runtime: Runtime,
    acting: ActingSeller,
    variant_id: uuid.UUID,
    body: VariantUpdate,
    *,
    if_match: str | None = None,
) -> SellerVariantOut:
    require_role(acting, SellerRole.manager)
    product, variant = await _own_variant_locked(session, acting, variant_id)
    _check_if_match(if_match, variant.version)
    sent = body.model_fields_set
    price = body.price or Money(variant.price_minor, variant.currency)
    compare_at = (
        body.compare_at_price
        if "compare_at_price" in sent
        else (
            Money(variant.compare_at_minor, variant.currency)
            if variant.compare_at_minor is not None
            else None
        )
    )
    if body.price is not None or "compare_at_price" in sent:
        variant.price_minor, variant.compare_at_minor = _price_pair(
            product.currency, price, compare_at
        )
    if body.options is not None:
        variant.options = dict(body.options)
    if "weight_grams" in sent:
        variant.weight_grams = body.weight_grams
    if body.position is not None:
        variant.position = body.position
    sku_changed = body.sku is not None and body.sku != variant.sku
    if sku_changed and product.published_at is not None:
        # Once buyers could order it, the SKU names this variant for good; renaming it
        # would free the old one for another variant while orders still carry it.
        raise SkuFixed(
            f"The SKU {variant.sku!r} has been on sale and names this variant for good.",
            sku=variant.sku,
        )
    if body.sku is not None:
        variant.sku = body.sku
    now = runtime.clock.now()
    variant.version += 1
    variant.updated_at = now
    await _flush_variants(session, [variant.sku])
    if sku_changed:
        await _register(session, [variant])
    await _refresh_min_price(session, product)
    _touch(session, product, now)
    await session.flush()
    return variant_view(variant)


async def archive_variant(
    session: AsyncSession, runtime: Runtime, acting: ActingSeller, variant_id: uuid.UUID
) -> SellerVariantOut:
    """Stop selling a variant (its SKU stays taken). A published product keeps at least
    one active variant: archive the product instead. Archiving twice changes nothing."""
    require_role(acting, SellerRole.manager)
    product, variant = await _own_variant_locked(session, acting, variant_id)
    if variant.status == VariantStatus.archived.value:
        return variant_view(variant)
    if product.status == ProductStatus.published.value:
        others = await session.scalar(
            select(func.count())
            .select_from(Variant)
            .where(
                Variant.product_id == product.id,
                Variant.status == VariantStatus.active.value,
                Variant.id != variant.id,
            )
        )
        if not others:
            raise ProductNeedsVariant(
                "This is the published product's last active variant: archive the product "
                "instead, or add another variant first."
            )
    now = runtime.clock.now()
    variant.status = VariantStatus.archived.value
    variant.version += 1
    variant.updated_at = now
    await session.flush()
    await _refresh_min_price(session, product)
    _touch(session, product, now)
    await session.flush()
    return variant_view(variant)
