"""A store's orders (``/api/v1/seller/orders``): read them, accept, ship, record the
delivery, cancel, answer a dispute. Any member reads and fulfils; cancelling and
answering a dispute take a manager or the owner. Another store's order answers 404."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query, Request, Response

from soko.orders import service
from soko.orders.disputes import answer_dispute, dispute_of
from soko.orders.schemas import (
    CancelIn,
    DisputeOut,
    DisputeResponseIn,
    OrderOut,
    OrderSummaryOut,
    ShipIn,
)
from soko.orders.service import Acting
from soko.orders.states import Action, Actor, OrderStatus
from soko.orders.views import OrderFields, listing_owner, order_page, order_view, read_order
from soko.platform.errors import problem_responses
from soko.platform.pagination import FieldSelection, Page, PageRequestDep
from soko.platform.runtime import RuntimeDep, SessionDep
from soko.sellers.public import ActingSeller, ActingSellerDep, SellerRole, require_role

router = APIRouter()


def _acting(seller: ActingSeller) -> Acting:
    return Acting(Actor.seller, seller.user_id)


@router.get("", response_model=Page[OrderSummaryOut], summary="The store's orders, newest first")
async def list_store_orders(
    seller: ActingSellerDep,
    session: SessionDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(OrderFields)],
    status: Annotated[OrderStatus | None, Query(description="Only orders in this state")] = None,
) -> Response:
    statement = service.orders_query(seller_id=seller.seller_id, status=status)
    owner = listing_owner("seller", seller.seller_id)
    return await order_page(session, statement, owner, page, fields)


@router.get(
    "/{order_id}",
    response_model=OrderOut,
    summary="One of the store's orders",
    responses=problem_responses(404),
)
async def read_store_order(
    seller: ActingSellerDep,
    order_id: uuid.UUID,
    request: Request,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> OrderOut | Response:
    order = await service.order_for(session, order_id, seller_id=seller.seller_id)
    return await read_order(request, response, session, runtime, order)


@router.post(
    "/{order_id}/accept",
    response_model=OrderOut,
    summary="Accept a paid order and start preparing it",
    responses=problem_responses(404, 409),
)
async def accept_order(
    seller: ActingSellerDep, order_id: uuid.UUID, session: SessionDep, runtime: RuntimeDep
) -> OrderOut:
    order = await service.order_for(session, order_id, seller_id=seller.seller_id)
    await service.move_order(session, runtime, order, Action.accept, _acting(seller))
    return await order_view(session, runtime, order)


@router.post(
    "/{order_id}/ship",
    response_model=OrderOut,
    summary="Record that the order left with a carrier",
    responses=problem_responses(404, 409, 422),
)
async def ship_order(
    seller: ActingSellerDep,
    order_id: uuid.UUID,
    body: ShipIn,
    session: SessionDep,
    runtime: RuntimeDep,
) -> OrderOut:
    order = await service.order_for(session, order_id, seller_id=seller.seller_id)
    await service.ship_order(
        session,
        runtime,
        order,
        _acting(seller),
        carrier=body.carrier,
        tracking_number=body.tracking_number,
    )
    return await order_view(session, runtime, order)


@router.post(
    "/{order_id}/mark-delivered",
    response_model=OrderOut,
    summary="Record that the buyer received the order",
    responses=problem_responses(404, 409),
)
async def mark_delivered(
    seller: ActingSellerDep, order_id: uuid.UUID, session: SessionDep, runtime: RuntimeDep
) -> OrderOut:
    order = await service.order_for(session, order_id, seller_id=seller.seller_id)
    await service.move_order(session, runtime, order, Action.deliver, _acting(seller))
    return await order_view(session, runtime, order)


@router.post(
    "/{order_id}/cancel",
    response_model=OrderOut,
    summary="Cancel an order before it ships (manager or owner)",
    responses=problem_responses(403, 404, 409),
)
async def cancel_store_order(
    seller: ActingSellerDep,
    order_id: uuid.UUID,
    session: SessionDep,
    runtime: RuntimeDep,
    body: Annotated[CancelIn | None, Body()] = None,
) -> OrderOut:
    order = await service.order_for(session, order_id, seller_id=seller.seller_id)
    require_role(seller, SellerRole.manager)
    await service.cancel_order(
        session, runtime, order, _acting(seller), reason=body.reason if body else ""
    )
    return await order_view(session, runtime, order)


@router.post(
    "/{order_id}/dispute/response",
    response_model=DisputeOut,
    summary="Answer the buyer's dispute (manager or owner)",
    responses=problem_responses(403, 404, 409, 422),
)
async def answer_store_dispute(
    seller: ActingSellerDep,
    order_id: uuid.UUID,
    body: DisputeResponseIn,
    session: SessionDep,
    runtime: RuntimeDep,
) -> DisputeOut:
    order = await service.order_for(session, order_id, seller_id=seller.seller_id)
    dispute = await dispute_of(session, order.id, seller_id=seller.seller_id)
    require_role(seller, SellerRole.manager)
    dispute = await answer_dispute(
        session, runtime, dispute, _acting(seller), response=body.response
    )
    return DisputeOut.of(dispute, order.currency)
