"""Carts over HTTP (``/api/v1/carts``): open to anonymous buyers, who prove a cart is
theirs with its token (``X-Cart-Token``), and to signed-in ones, whose cart follows
their account."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Header, Request, Response

from soko.cart import service
from soko.cart.schemas import (
    CartCreate,
    CartCreated,
    CartLineOut,
    CartOut,
    LineAdd,
    LineChange,
    LineOut,
    LineWritten,
    MergeAdjustmentOut,
    MergeOut,
    SellerSubtotalOut,
)
from soko.cart.service import CartAccess, CartView, LineWrite
from soko.platform.auth import Principal, public, require
from soko.platform.errors import problem_responses
from soko.platform.etag import etag_for_content, etag_for_version, not_modified, tag_response
from soko.platform.money import Money
from soko.platform.runtime import RuntimeDep, SessionDep

API_PREFIX = "/api/v1"

router = APIRouter(prefix="/carts", tags=["carts"])

Caller = Annotated[Principal | None, public()]
SignedInCaller = Annotated[Principal, require()]
CartToken = Annotated[
    str | None,
    Header(
        alias="X-Cart-Token",
        max_length=128,
        description="An anonymous cart's token, as answered when the cart was created",
    ),
]


def _access(caller: Principal | None, token: str | None) -> CartAccess:
    return CartAccess.of(caller.user_id if caller is not None else None, token)


def _versions(request: Request) -> frozenset[int] | None:
    return service.versions_named(request.headers.get("if-match"))


def cart_out(view: CartView) -> CartOut:
    return CartOut(
        id=view.id,
        status=view.status,
        currency=view.currency,
        version=view.version,
        signed_in=view.signed_in,
        merged_into=view.merged_into,
        lines=[
            CartLineOut(
                variant_id=line.variant_id,
                product_id=line.product_id,
                seller_id=line.seller_id,
                title=line.title,
                sku=line.sku,
                options=line.options,
                image=line.image,
                quantity=line.quantity,
                unit_price=line.unit_price,
                price_when_added=line.price_when_added,
                price_changed=line.price_changed,
                compare_at=line.compare_at,
                line_total=line.line_total,
                available=line.available,
                quantity_available_ok=line.quantity_available_ok,
                purchasable=line.purchasable,
                added_at=line.added_at,
            )
            for line in view.lines
        ],
        sellers=[
            SellerSubtotalOut(
                seller_id=seller.seller_id, subtotal=seller.subtotal, item_count=seller.item_count
            )
            for seller in view.sellers
        ],
        total=view.total,
        item_count=view.item_count,
        created_at=view.created_at,
        updated_at=view.updated_at,
    )


def _written(response: Response, write: LineWrite) -> LineWritten:
    tag_response(response, etag_for_version(write.version))
    line = write.line
    return LineWritten(
        cart_id=write.cart_id,
        version=write.version,
        line=(
            LineOut(
                variant_id=line.variant_id,
                quantity=line.quantity,
                price_when_added=Money(line.unit_price_minor, line.currency),
                added_at=line.added_at,
                updated_at=line.updated_at,
            )
            if line is not None
            else None
        ),
    )


@router.post(
    "",
    status_code=201,
    response_model=CartCreated,
    summary="Open a cart",
    description=(
        "Signed in: your open cart, created if you have none (201) or as it is (200). "
        "Anonymous: a new cart and its token, shown only in this answer."
    ),
    responses={200: {"model": CartCreated}, **problem_responses(401, 422)},
)
async def create_cart(
    caller: Caller,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
    body: Annotated[CartCreate | None, Body()] = None,
) -> CartCreated:
    currency = body.currency if body is not None else None
    token: str | None = None
    if caller is not None:
        cart, created = await service.open_cart_of_user(
            session, runtime, caller.user_id, currency=currency
        )
        if not created:
            response.status_code = 200
    else:
        cart, token = await service.create_anonymous_cart(session, runtime, currency=currency)
    out = cart_out(await service.cart_view(session, runtime, cart))
    response.headers["Location"] = f"{API_PREFIX}/carts/{cart.id}"
    tag_response(response, view_tag(cart.version, out))
    return CartCreated(cart=out, token=token)


def view_tag(version: int, out: CartOut) -> str:
    """The ETag of a cart's whole view: ``"v<version>.<digest>"``. A write's
    ``If-Match`` goes by the version; the digest covers what the view shows besides the
    cart's own lines (today's prices, availability, totals), so a price or stock change
    since a client's copy is not answered ``304``."""
    digest = etag_for_content(out.model_dump(mode="json")).strip('"')[:16]
    return etag_for_version(f"{version}.{digest}")


@router.get(
    "/{cart_id}",
    response_model=CartOut,
    summary="A cart with today's prices and stock",
    responses=problem_responses(401, 404),
)
async def read_cart(
    cart_id: uuid.UUID,
    caller: Caller,
    request: Request,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
    x_cart_token: CartToken = None,
) -> CartOut | Response:
    cart = await service.find_cart(session, cart_id=cart_id, access=_access(caller, x_cart_token))
    out = cart_out(await service.cart_view(session, runtime, cart))
    tag = view_tag(cart.version, out)
    if (unchanged := not_modified(request, tag)) is not None:
        return unchanged
    tag_response(response, tag)
    return out


@router.post(
    "/{cart_id}/items",
    response_model=LineWritten,
    summary="Add a variant to a cart",
    description=(
        "Adds to the line when the variant is already in the cart. Send `If-Match` with "
        "the cart's ETag to apply the change only to that version."
    ),
    responses=problem_responses(401, 404, 409, 412, 422),
)
async def add_item(
    cart_id: uuid.UUID,
    line: LineAdd,
    caller: Caller,
    request: Request,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
    x_cart_token: CartToken = None,
) -> LineWritten:
    write = await service.add_line(
        session,
        runtime,
        cart_id=cart_id,
        access=_access(caller, x_cart_token),
        variant_id=line.variant_id,
        quantity=line.quantity,
        versions=_versions(request),
    )
    return _written(response, write)


@router.patch(
    "/{cart_id}/items/{variant_id}",
    response_model=LineWritten,
    summary="Change a line's quantity (0 removes it)",
    responses=problem_responses(401, 404, 409, 412, 422),
)
async def change_item(
    cart_id: uuid.UUID,
    variant_id: uuid.UUID,
    change: LineChange,
    caller: Caller,
    request: Request,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
    x_cart_token: CartToken = None,
) -> LineWritten:
    write = await service.set_line_quantity(
        session,
        runtime,
        cart_id=cart_id,
        access=_access(caller, x_cart_token),
        variant_id=variant_id,
        quantity=change.quantity,
        versions=_versions(request),
    )
    return _written(response, write)


@router.delete(
    "/{cart_id}/items/{variant_id}",
    status_code=204,
    summary="Remove a line",
    responses=problem_responses(401, 404, 409, 412),
)
async def remove_item(
    cart_id: uuid.UUID,
    variant_id: uuid.UUID,
    caller: Caller,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    x_cart_token: CartToken = None,
) -> Response:
    write = await service.remove_line(
        session,
        runtime,
        cart_id=cart_id,
        access=_access(caller, x_cart_token),
        variant_id=variant_id,
        versions=_versions(request),
    )
    response = Response(status_code=204)
    tag_response(response, etag_for_version(write.version))
    return response


@router.post(
    "/{cart_id}/merge",
    response_model=MergeOut,
    summary="Merge an anonymous cart into your cart",
    description=(
        "For clients that signed in without sending X-Cart-Token: the anonymous cart "
        "`cart_id`, proved by its token, joins your cart (quantities summed, capped at "
        "what is available). Repeating it answers the same cart and changes nothing."
    ),
    responses=problem_responses(401, 404),
)
async def merge_cart(
    cart_id: uuid.UUID,
    caller: SignedInCaller,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
    x_cart_token: CartToken = None,
) -> MergeOut:
    view, outcome = await service.merge_for_request(
        session, runtime, cart_id=cart_id, user_id=caller.user_id, token=x_cart_token
    )
    out = cart_out(view)
    tag_response(response, view_tag(view.version, out))
    return MergeOut(
        cart=out,
        adopted=outcome.adopted,
        adjustments=[
            MergeAdjustmentOut(
                variant_id=item.variant_id,
                requested=item.requested,
                quantity=item.quantity,
                reason=item.reason.value,
            )
            for item in outcome.adjustments
        ],
    )
