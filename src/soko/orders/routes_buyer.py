"""A buyer's orders (``/api/v1/orders``): read them, cancel one before it ships, confirm
a delivery, open a dispute. Another buyer's order answers 404."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query, Request, Response

from soko.orders import service
from soko.orders.disputes import open_dispute
from soko.orders.schemas import CancelIn, DisputeIn, DisputeOut, OrderOut, OrderSummaryOut
from soko.orders.service import Acting
from soko.orders.states import Action, Actor, OrderStatus
from soko.orders.views import OrderFields, listing_owner, order_page, order_view, read_order
from soko.platform.auth import SignedIn
from soko.platform.errors import problem_responses
from soko.platform.pagination import FieldSelection, Page, PageRequestDep
from soko.platform.runtime import RuntimeDep, SessionDep

router = APIRouter()


@router.get("", response_model=Page[OrderSummaryOut], summary="Your orders, newest first")
async def list_orders(
    principal: SignedIn,
    session: SessionDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(OrderFields)],
    status: Annotated[OrderStatus | None, Query(description="Only orders in this state")] = None,
) -> Response:
    statement = service.orders_query(buyer_id=principal.user_id, status=status)
    owner = listing_owner("buyer", principal.user_id)
    return await order_page(session, statement, owner, page, fields)


@router.get(
    "/{order_id}",
    response_model=OrderOut,
    summary="One of your orders",
    responses=problem_responses(404),
)
async def read_own_order(
    principal: SignedIn,
    order_id: uuid.UUID,
    request: Request,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> OrderOut | Response:
    order = await service.order_for(session, order_id, buyer_id=principal.user_id)
    return await read_order(request, response, session, runtime, order)


@router.post(
    "/{order_id}/cancel",
    response_model=OrderOut,
    summary="Cancel an order before it ships",
    responses=problem_responses(404, 409),
)
async def cancel_order(
    principal: SignedIn,
    order_id: uuid.UUID,
    session: SessionDep,
    runtime: RuntimeDep,
    body: Annotated[CancelIn | None, Body()] = None,
) -> OrderOut:
    """Possible until the seller ships. The order's stock goes back on sale; a paid
    order is refunded by the payments domain."""
    order = await service.order_for(session, order_id, buyer_id=principal.user_id)
    acting = Acting(Actor.buyer, principal.user_id)
    await service.cancel_order(session, runtime, order, acting, reason=body.reason if body else "")
    return await order_view(session, runtime, order)


@router.post(
    "/{order_id}/confirm-delivery",
    response_model=OrderOut,
    summary="Confirm you received a shipped order",
    responses=problem_responses(404, 409),
)
async def confirm_delivery(
    principal: SignedIn, order_id: uuid.UUID, session: SessionDep, runtime: RuntimeDep
) -> OrderOut:
    order = await service.order_for(session, order_id, buyer_id=principal.user_id)
    await service.move_order(
        session, runtime, order, Action.deliver, Acting(Actor.buyer, principal.user_id)
    )
    return await order_view(session, runtime, order)


@router.post(
    "/{order_id}/dispute",
    status_code=201,
    response_model=DisputeOut,
    summary="Open a dispute about a delivered order, or a late one as not received",
    responses=problem_responses(404, 409, 422),
)
async def dispute_order(
    principal: SignedIn,
    order_id: uuid.UUID,
    body: DisputeIn,
    session: SessionDep,
    runtime: RuntimeDep,
) -> DisputeOut:
    """Within ``SOKO_DISPUTE_WINDOW_DAYS`` of the delivery; or, for an order shipped
    but never marked delivered, as ``not_received`` once
    ``SOKO_DISPUTE_NOT_RECEIVED_AFTER_DAYS`` have passed since it shipped (``409
    dispute-too-early`` before). The seller is asked to answer, then the marketplace
    decides."""
    order = await service.order_for(session, order_id, buyer_id=principal.user_id)
    dispute = await open_dispute(
        session,
        runtime,
        order,
        Acting(Actor.buyer, principal.user_id),
        reason=body.reason,
        details=body.details,
        evidence_urls=[str(url) for url in body.evidence_urls],
    )
    return DisputeOut.of(dispute, order.currency)
