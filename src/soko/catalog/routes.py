"""The catalog's routes: the public listing, product pages and category tree; a store's
own products and variants (``/seller/...``); the category tree's administration
(``/admin/categories``)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import Field

from soko.catalog import service
from soko.catalog.categories import create_category, delete_category, update_category
from soko.catalog.models import Product, ProductStatus
from soko.catalog.schemas import (
    CategoryCreate,
    CategoryOut,
    CategoryTreeOut,
    CategoryUpdate,
    ProductCardOut,
    ProductCreate,
    ProductDetailOut,
    ProductUpdate,
    SellerProductOut,
    SellerVariantOut,
    VariantIn,
    VariantUpdate,
)
from soko.catalog.storefront import (
    ProductFilters,
    ProductSort,
    Rendered,
    render_categories,
    render_listing,
    render_product,
)
from soko.identity.public import CATALOG_MANAGE
from soko.platform.auth import Principal, public, require
from soko.platform.compression import accepts_gzip, gzipped
from soko.platform.errors import NotFound, ValidationFailed, problem_responses
from soko.platform.etag import REVALIDATE, etag_for_version, not_modified, tag_response
from soko.platform.money import MAX_AMOUNT_MINOR
from soko.platform.pagination import (
    CURSOR_DESCRIPTION,
    CURSOR_MAX_LENGTH,
    DEFAULT_LIMIT,
    FIELDS_MAX_LENGTH,
    LIMIT_DESCRIPTION,
    MAX_LIMIT,
    FieldSelection,
    Keyset,
    Page,
    PageRequestDep,
    SortKey,
    field_selection,
    fields_description,
    fields_reader,
    page_of,
    page_response,
)
from soko.platform.query import QueryModel, query_parameters, query_reader
from soko.platform.runtime import Runtime, RuntimeDep, SessionDep
from soko.sellers.public import ActingSellerDep, seller_slug

router = APIRouter()

CatalogManager = Annotated[Principal, require(CATALOG_MANAGE)]
SellerProductFields = field_selection(SellerProductOut)


async def _answer(request: Request, runtime: Runtime, rendered: Rendered) -> Response:
    if rendered.body is None or rendered.etag is None:
        raise NotFound("No such product.")
    if (unchanged := not_modified(request, rendered.etag)) is not None:
        return unchanged
    body = rendered.body
    headers = {"ETag": rendered.etag, "Cache-Control": REVALIDATE}
    settings = runtime.settings
    if len(body) >= settings.gzip_min_bytes and accepts_gzip(request):
        # Compressed once per content and process, not once per client.
        body = await gzipped(rendered.etag, body, settings.gzip_level)
        headers.update({"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
    return Response(body, media_type="application/json", headers=headers)


# -- what everyone sees --------------------------------------------------------------------------


@router.get(
    "/categories",
    response_model=CategoryTreeOut,
    summary="The category tree",
    dependencies=[public()],
)
async def categories(request: Request, runtime: RuntimeDep) -> Response:
    """Every category, roots first, each with its subcategories (siblings by position,
    then name)."""
    return await _answer(request, runtime, await render_categories(runtime))


# Room for a store id in any form uuid.UUID reads, and for the longest slug.
SELLER_FILTER_MAX_LENGTH = 80


def _seller_filter(raw: str | None) -> tuple[uuid.UUID | None, str | None]:
    """The ``seller`` filter as a store id or a store slug (at most one of the two).

    A value that reads as a UUID is an id (so a storefront whose slug happened to look
    like one is filtered by its id); anything else must be a possible slug, else 422.
    Blank means no filter, like the other text filters."""
    if raw is None or not raw.strip():
        return None, None
    try:
        return uuid.UUID(raw.strip()), None
    except ValueError:
        pass
    slug = seller_slug(raw)
    if slug is None:
        raise ValidationFailed.of_field(
            "seller", "is neither a store id nor a store slug", location="query"
        )
    return None, slug


class ProductListQuery(QueryModel):
    """The public listing's query parameters, read in one validation (ADR 0021)."""

    category: str | None = Field(
        None, max_length=80, description="A category slug or id; its subcategories count too"
    )
    seller: str | None = Field(
        None,
        max_length=SELLER_FILTER_MAX_LENGTH,
        description="A store's id, or its slug (the address of its storefront)",
    )
    min_price: int | None = Field(
        None, ge=0, le=MAX_AMOUNT_MINOR, description="Lowest price, in minor units (inclusive)"
    )
    max_price: int | None = Field(
        None, ge=0, le=MAX_AMOUNT_MINOR, description="Highest price, in minor units (inclusive)"
    )
    currency: str | None = Field(
        None, pattern=r"^[A-Z]{3}$", description="Only prices in this currency"
    )
    in_stock: bool = Field(False, description="Only products that can be bought now")
    q: str | None = Field(
        None, max_length=100, description="Words the title or description contains"
    )
    sort: ProductSort = Field(
        ProductSort.newest, description="newest, price (lowest first), -price or title"
    )
    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description=LIMIT_DESCRIPTION)
    cursor: str | None = Field(None, max_length=CURSOR_MAX_LENGTH, description=CURSOR_DESCRIPTION)
    fields: str | None = Field(
        None, max_length=FIELDS_MAX_LENGTH, description=fields_description(ProductCardOut)
    )


read_product_card_fields = fields_reader(ProductCardOut)


@router.get(
    "/products",
    response_model=Page[ProductCardOut],
    summary="Browse the catalog",
    dependencies=[public()],
    responses=problem_responses(400, 422),
    openapi_extra=query_parameters(ProductListQuery),
)
async def list_products(
    request: Request,
    runtime: RuntimeDep,
    query: Annotated[ProductListQuery, Depends(query_reader(ProductListQuery))],
) -> Response:
    """Published products of active stores, each with its variants and what can be bought
    now. Prices filter and sort on a product's lowest variant price. Pages are keyset
    pages: products added while you page never make you skip or repeat one."""
    min_price, max_price = query.min_price, query.max_price
    if min_price is not None and max_price is not None and max_price < min_price:
        raise ValidationFailed.of_field("max_price", "is below min_price", location="query")
    seller_id, store_slug = _seller_filter(query.seller)
    fields = read_product_card_fields(query.fields)
    page = page_of(request, query.limit, query.cursor)
    category, q = query.category, query.q
    filters = ProductFilters(
        category=category.strip() or None if category is not None else None,
        seller=seller_id,
        seller_slug=store_slug,
        min_price=min_price,
        max_price=max_price,
        currency=query.currency,
        in_stock=query.in_stock,
        q=q.strip() or None if q is not None else None,
    )
    listing = await render_listing(runtime, filters, query.sort, page, fields)
    return await _answer(request, runtime, listing)


@router.get(
    "/products/{product_id}",
    response_model=ProductDetailOut,
    summary="A product's page",
    dependencies=[public()],
    responses=problem_responses(404),
)
async def product_page(product_id: uuid.UUID, request: Request, runtime: RuntimeDep) -> Response:
    """A published product of an active store, with its variants, how many of each can
    be bought now, its store and its category."""
    return await _answer(request, runtime, await render_product(runtime, product_id))


# -- a store's own products ------------------------------------------------------------------------


def _tagged(response: Response, version: int) -> None:
    tag_response(response, etag_for_version(version))


@router.get(
    "/seller/products",
    response_model=Page[SellerProductOut],
    summary="Your store's products",
    responses=problem_responses(400, 403),
)
async def my_products(
    acting: ActingSellerDep,
    session: SessionDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(SellerProductFields)],
    status: Annotated[
        ProductStatus | None, Query(description="Only products in this state")
    ] = None,
) -> Response:
    """Every product of the acting store, newest first, in any state."""
    listing = Keyset(
        f"catalog.seller_products:{acting.seller_id}",
        SortKey(Product.created_at, descending=True),
        id_column=Product.id,
    )
    statement = service.select_own_products(acting, status)
    products, next_cursor = await listing.fetch(session, statement, page)
    variants = await service.variants_of(session, [product.id for product in products])
    items = [service.product_view(product, variants[product.id]) for product in products]
    return page_response(items, next_cursor, fields)


@router.post(
    "/seller/products",
    status_code=201,
    response_model=SellerProductOut,
    summary="Add a product",
    responses=problem_responses(400, 403, 409, 422),
)
async def add_product(
    acting: ActingSellerDep,
    body: ProductCreate,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> SellerProductOut:
    """A draft, with the variants given (more can be added later). Managers and owners."""
    product = await service.create_product(session, runtime, acting, body)
    _tagged(response, product.version)
    response.headers["Location"] = f"/api/v1/seller/products/{product.id}"
    return product


@router.get(
    "/seller/products/{product_id}",
    response_model=SellerProductOut,
    summary="One of your store's products",
    responses=problem_responses(400, 403, 404),
)
async def my_product(
    acting: ActingSellerDep,
    product_id: uuid.UUID,
    request: Request,
    session: SessionDep,
) -> Response:
    view = await service.own_product_view(session, acting, product_id)
    etag = etag_for_version(view.version)
    if (unchanged := not_modified(request, etag)) is not None:
        return unchanged
    answer = Response(view.model_dump_json(), media_type="application/json")
    tag_response(answer, etag)
    return answer


@router.patch(
    "/seller/products/{product_id}",
    response_model=SellerProductOut,
    summary="Change a product",
    responses=problem_responses(400, 403, 404, 412, 422),
)
async def change_product(
    acting: ActingSellerDep,
    product_id: uuid.UUID,
    body: ProductUpdate,
    request: Request,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> SellerProductOut:
    """Fields not sent keep their value. With ``If-Match`` (the product's ETag), the
    change happens only if nobody changed the product or its variants since."""
    product = await service.update_product(
        session, runtime, acting, product_id, body, if_match=request.headers.get("if-match")
    )
    _tagged(response, product.version)
    return product


@router.post(
    "/seller/products/{product_id}/publish",
    response_model=SellerProductOut,
    summary="Publish a product",
    responses=problem_responses(400, 403, 404, 409),
)
async def publish_product(
    acting: ActingSellerDep,
    product_id: uuid.UUID,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> SellerProductOut:
    """Buyers see it from now on. Needs an active store and an active variant."""
    product = await service.publish_product(session, runtime, acting, product_id)
    _tagged(response, product.version)
    return product


@router.post(
    "/seller/products/{product_id}/archive",
    response_model=SellerProductOut,
    summary="Archive a product",
    responses=problem_responses(400, 403, 404, 409),
)
async def archive_product(
    acting: ActingSellerDep,
    product_id: uuid.UUID,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> SellerProductOut:
    """Buyers no longer see it nor can buy it; it can be published again later."""
    product = await service.archive_product(session, runtime, acting, product_id)
    _tagged(response, product.version)
    return product


@router.post(
    "/seller/products/{product_id}/variants",
    status_code=201,
    response_model=SellerVariantOut,
    summary="Add a variant",
    responses=problem_responses(400, 403, 404, 409, 422),
)
async def add_variant(
    acting: ActingSellerDep,
    product_id: uuid.UUID,
    body: VariantIn,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> SellerVariantOut:
    """Its SKU must be new in the store, its price in the product's currency."""
    variant = await service.add_variant(session, runtime, acting, product_id, body)
    _tagged(response, variant.version)
    response.headers["Location"] = f"/api/v1/seller/variants/{variant.id}"
    return variant


@router.get(
    "/seller/variants/{variant_id}",
    response_model=SellerVariantOut,
    summary="One of your store's variants",
    responses=problem_responses(400, 403, 404),
)
async def my_variant(
    acting: ActingSellerDep,
    variant_id: uuid.UUID,
    request: Request,
    session: SessionDep,
) -> Response:
    variant = service.variant_view(await service.own_variant(session, acting, variant_id))
    etag = etag_for_version(variant.version)
    if (unchanged := not_modified(request, etag)) is not None:
        return unchanged
    answer = Response(variant.model_dump_json(), media_type="application/json")
    tag_response(answer, etag)
    return answer


@router.patch(
    "/seller/variants/{variant_id}",
    response_model=SellerVariantOut,
    summary="Change a variant",
    responses=problem_responses(400, 403, 404, 409, 412, 422),
)
async def change_variant(
    acting: ActingSellerDep,
    variant_id: uuid.UUID,
    body: VariantUpdate,
    request: Request,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> SellerVariantOut:
    """Fields not sent keep their value; ``If-Match`` takes the variant's ETag."""
    variant = await service.update_variant(
        session, runtime, acting, variant_id, body, if_match=request.headers.get("if-match")
    )
    _tagged(response, variant.version)
    return variant


@router.post(
    "/seller/variants/{variant_id}/archive",
    response_model=SellerVariantOut,
    summary="Archive a variant",
    responses=problem_responses(400, 403, 404, 409),
)
async def archive_variant(
    acting: ActingSellerDep,
    variant_id: uuid.UUID,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> SellerVariantOut:
    """It can no longer be bought; its SKU stays taken."""
    variant = await service.archive_variant(session, runtime, acting, variant_id)
    _tagged(response, variant.version)
    return variant


# -- the category tree's administration ------------------------------------------------------------


@router.post(
    "/admin/categories",
    status_code=201,
    response_model=CategoryOut,
    summary="Add a category",
    responses=problem_responses(409, 422),
)
async def add_category(
    _admin: CatalogManager, body: CategoryCreate, session: SessionDep, runtime: RuntimeDep
) -> CategoryOut:
    return await create_category(session, runtime.clock, body)


@router.patch(
    "/admin/categories/{category_id}",
    response_model=CategoryOut,
    summary="Rename or move a category",
    responses=problem_responses(404, 409, 422),
)
async def change_category(
    _admin: CatalogManager,
    category_id: uuid.UUID,
    body: CategoryUpdate,
    session: SessionDep,
    runtime: RuntimeDep,
) -> CategoryOut:
    """A move takes the whole subtree along; a category cannot move under itself."""
    return await update_category(session, runtime.clock, category_id, body)


@router.delete(
    "/admin/categories/{category_id}",
    status_code=204,
    summary="Delete a category",
    responses=problem_responses(404, 409),
)
async def remove_category(
    _admin: CatalogManager, category_id: uuid.UUID, session: SessionDep
) -> Response:
    """Only a category without subcategories or products."""
    await delete_category(session, category_id)
    return Response(status_code=204)
