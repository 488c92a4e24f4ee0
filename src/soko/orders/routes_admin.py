"""The marketplace's view of orders (``/api/v1/admin/orders``) and its dispute desk
(``/api/v1/admin/disputes``)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy import select

from soko.identity.public import DISPUTES_RESOLVE, ORDERS_READ_ALL
from soko.orders import service
from soko.orders.disputes import resolve_dispute
from soko.orders.models import Dispute, DisputeStatus, Order
from soko.orders.schemas import (
    AdminDisputeOut,
    OrderOut,
    OrderSummaryOut,
    ResolveIn,
)
from soko.orders.service import Acting
from soko.orders.states import Actor, OrderStatus
from soko.orders.views import OrderFields, order_page, read_order
from soko.platform.auth import Principal, require
from soko.platform.errors import NotFound, problem_responses
from soko.platform.pagination import (
    FieldSelection,
    Keyset,
    Page,
    PageRequestDep,
    SortKey,
    field_selection,
    page_response,
)
from soko.platform.runtime import RuntimeDep, SessionDep

router = APIRouter()

DisputeFields = field_selection(AdminDisputeOut, always=("id",))
DISPUTE_LISTING = Keyset("orders.admin.disputes", SortKey(Dispute.opened_at), id_column=Dispute.id)


@router.get("/orders", response_model=Page[OrderSummaryOut], summary="Every order, newest first")
async def list_all_orders(
    _staff: Annotated[Principal, require(ORDERS_READ_ALL)],
    session: SessionDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(OrderFields)],
    status: Annotated[OrderStatus | None, Query(description="Only orders in this state")] = None,
    seller_id: Annotated[uuid.UUID | None, Query(description="Only this store's")] = None,
    buyer_id: Annotated[uuid.UUID | None, Query(description="Only this buyer's")] = None,
) -> Response:
    statement = service.orders_query(buyer_id=buyer_id, seller_id=seller_id, status=status)
    return await order_page(session, statement, "admin", page, fields)


@router.get(
    "/orders/{order_id}",
    response_model=OrderOut,
    summary="Any order",
    responses=problem_responses(404),
)
async def read_any_order(
    _staff: Annotated[Principal, require(ORDERS_READ_ALL)],
    order_id: uuid.UUID,
    request: Request,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> OrderOut | Response:
    order = await service.order_for(session, order_id)
    return await read_order(request, response, session, runtime, order)


@router.get(
    "/disputes",
    response_model=Page[AdminDisputeOut],
    summary="Disputes, oldest first (the queue to work through)",
)
async def list_disputes(
    _staff: Annotated[Principal, require(DISPUTES_RESOLVE)],
    session: SessionDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(DisputeFields)],
    status: Annotated[
        DisputeStatus | None, Query(description="Only disputes in this state")
    ] = None,
) -> Response:
    statement = select(Dispute)
    if status is not None:
        statement = statement.where(Dispute.status == status.value)
    disputes, next_cursor = await DISPUTE_LISTING.fetch(session, statement, page)
    orders = {}
    if disputes:
        rows = await session.scalars(
            select(Order).where(Order.id.in_([dispute.order_id for dispute in disputes]))
        )
        orders = {order.id: order for order in rows}
    items = [AdminDisputeOut.of_order(d, orders[d.order_id]) for d in disputes]
    return page_response(items, next_cursor, fields)


@router.post(
    "/disputes/{dispute_id}/resolve",
    response_model=AdminDisputeOut,
    summary="Settle a dispute with a refund or for the seller",
    responses=problem_responses(404, 409, 422),
)
async def resolve(
    staff: Annotated[Principal, require(DISPUTES_RESOLVE)],
    dispute_id: uuid.UUID,
    body: ResolveIn,
    session: SessionDep,
    runtime: RuntimeDep,
) -> AdminDisputeOut:
    """A refund (all of the order, or ``refund_minor`` of it) moves the order to
    refunded and publishes ``dispute.resolved`` with the amount, which the payments
    domain pays back; a rejection completes the order."""
    dispute = await session.get(Dispute, dispute_id, populate_existing=True)
    if dispute is None:
        raise NotFound("No such dispute.")
    order = await service.order_for(session, dispute.order_id)
    dispute = await resolve_dispute(
        session,
        runtime,
        dispute,
        order,
        Acting(Actor.admin, staff.user_id),
        refund=body.outcome == "refund",
        refund_minor=body.refund_minor,
        note=body.note,
    )
    return AdminDisputeOut.of_order(dispute, order)
