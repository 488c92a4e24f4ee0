"""An order as its buyer, its seller and the marketplace's staff see it, and the lists
they page through."""

from __future__ import annotations

import uuid

from fastapi import Request, Response
from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.orders import service
from soko.orders.models import Order
from soko.orders.schemas import OrderOut, OrderSummaryOut
from soko.platform.etag import etag_for_content, not_modified, tag_response
from soko.platform.pagination import (
    FieldSelection,
    Keyset,
    PageRequest,
    SortKey,
    field_selection,
    page_response,
)
from soko.platform.runtime import Runtime

OrderFields = field_selection(OrderSummaryOut, always=("id",))


def order_listing(owner: str) -> Keyset:
    """Newest first. ``owner`` (``buyer:<id>``, ``seller:<id>``, ``admin``) is bound into
    the cursors, so a cursor only pages the list it came from."""
    return Keyset(f"orders.{owner}", SortKey(Order.placed_at, descending=True), id_column=Order.id)


async def order_page(
    session: AsyncSession,
    statement: Select[Order],
    owner: str,
    page: PageRequest,
    fields: FieldSelection,
) -> Response:
    rows, next_cursor = await order_listing(owner).fetch(session, statement, page)
    return page_response([OrderSummaryOut.of(order) for order in rows], next_cursor, fields)


async def order_view(session: AsyncSession, runtime: Runtime, order: Order) -> OrderOut:
    details = await service.order_details(session, order)
    return OrderOut.full(
        order,
        details.lines,
        details.transitions,
        details.dispute,
        service.dispute_window_closes(order, runtime),
        details.shipping_address,
    )


async def read_order(
    request: Request, response: Response, session: AsyncSession, runtime: Runtime, order: Order
) -> OrderOut | Response:
    """The order, with an ETag over all of it (its dispute changes without the order)."""
    view = await order_view(session, runtime, order)
    tag = etag_for_content(view.model_dump(mode="json"))
    if (unchanged := not_modified(request, tag)) is not None:
        return unchanged
    tag_response(response, tag)
    return view


def listing_owner(kind: str, owner_id: uuid.UUID) -> str:
    return f"{kind}:{owner_id}"
