"""The inventory domain's routes: a seller's locations, stock levels and their history
(``/seller/...``). Any member of the store may read; managers and owners write."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Query, Request, Response
from sqlalchemy import Select

from soko.identity.public import user_cards
from soko.inventory import service
from soko.inventory.models import AdjustmentKind, Location, StockAdjustment, StockLevel
from soko.inventory.schemas import (
    AdjustmentOut,
    AdjustmentResult,
    LocationChange,
    LocationIn,
    LocationOut,
    StockAdjust,
    StockOut,
    StockSet,
)
from soko.platform.errors import problem_responses
from soko.platform.etag import etag_for_version, not_modified, tag_response
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
from soko.sellers.public import ActingSeller, ActingSellerDep, SellerRole, require_role

router = APIRouter(tags=["inventory"])

LocationFields = field_selection(LocationOut)
StockFields = field_selection(StockOut, always=("variant_id", "location_id"))
AdjustmentFields = field_selection(AdjustmentOut)


def _writer(acting: ActingSeller) -> None:
    """Stock and locations are changed by managers and owners; staff only look."""
    require_role(acting, SellerRole.manager)


def _location_view(location: Location) -> LocationOut:
    return LocationOut.model_validate(location)


def _stock_view(view: service.StockView) -> StockOut:
    return StockOut.model_validate(view)


async def _adjustment_views(session: Any, rows: list[StockAdjustment]) -> list[AdjustmentOut]:
    cards = await user_cards(session, {row.actor_id for row in rows if row.actor_id})
    views = []
    for row in rows:
        view = AdjustmentOut.model_validate(row)
        card = cards.get(row.actor_id) if row.actor_id else None
        views.append(view.model_copy(update={"actor_name": card.display_name if card else None}))
    return views


# -- locations -------------------------------------------------------------------------------


@router.get(
    "/seller/locations",
    response_model=Page[LocationOut],
    summary="Your store's locations",
    responses=problem_responses(400, 403),
)
async def list_locations(
    acting: ActingSellerDep,
    session: SessionDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(LocationFields)],
) -> Response:
    listing = Keyset(f"inventory.locations:{acting.seller_id}", id_column=Location.id)
    rows, next_cursor = await listing.fetch(
        session, service.seller_locations(acting.seller_id), page
    )
    return page_response([_location_view(row) for row in rows], next_cursor, fields)


@router.post(
    "/seller/locations",
    status_code=201,
    response_model=LocationOut,
    summary="Add a location (warehouse or shop)",
    responses=problem_responses(400, 403, 409, 422),
)
async def create_location(
    acting: ActingSellerDep,
    body: LocationIn,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> LocationOut:
    """Managers and owners."""
    _writer(acting)
    location = await service.create_location(
        session,
        runtime.clock.now(),
        seller_id=acting.seller_id,
        name=body.name,
        kind=body.kind,
        address=body.address,
    )
    tag_response(response, etag_for_version(location.version))
    response.headers["Location"] = f"/api/v1/seller/locations/{location.id}"
    return _location_view(location)


@router.get(
    "/seller/locations/{location_id}",
    response_model=LocationOut,
    summary="One of your store's locations",
    responses=problem_responses(400, 403, 404),
)
async def get_location(
    acting: ActingSellerDep, location_id: uuid.UUID, request: Request, session: SessionDep
) -> Response:
    location = await service.seller_location(session, acting.seller_id, location_id)
    etag = etag_for_version(location.version)
    if (unchanged := not_modified(request, etag)) is not None:
        return unchanged
    answer = Response(
        content=_location_view(location).model_dump_json(), media_type="application/json"
    )
    tag_response(answer, etag)
    return answer


@router.patch(
    "/seller/locations/{location_id}",
    response_model=LocationOut,
    summary="Change a location",
    responses=problem_responses(400, 403, 404, 409, 412, 422),
)
async def change_location(
    acting: ActingSellerDep,
    location_id: uuid.UUID,
    body: LocationChange,
    request: Request,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> LocationOut:
    """Managers and owners. ``If-Match`` (optional) makes the change conditional on the
    version read; ``active: false`` stops the location serving new reservations."""
    _writer(acting)
    changes = body.model_dump(exclude_unset=True)
    if_match = request.headers.get("if-match")
    location = await service.update_location(
        session,
        runtime.clock.now(),
        seller_id=acting.seller_id,
        location_id=location_id,
        changes=changes,
        if_match=if_match,
    )
    tag_response(response, etag_for_version(location.version))
    return _location_view(location)


# -- stock -----------------------------------------------------------------------------------


@router.get(
    "/seller/stock",
    response_model=Page[StockOut],
    summary="Your store's stock levels",
    responses=problem_responses(400, 403),
)
async def list_stock(
    acting: ActingSellerDep,
    session: SessionDep,
    runtime: RuntimeDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(StockFields)],
    variant_id: Annotated[uuid.UUID | None, Query(description="Only this variant.")] = None,
    location_id: Annotated[uuid.UUID | None, Query(description="Only this location.")] = None,
) -> Response:
    """Each level with what is available now; filter by variant or location."""
    statement = service.stock_views(acting.seller_id, runtime.clock.now())
    if variant_id is not None:
        statement = statement.where(StockLevel.variant_id == variant_id)
    if location_id is not None:
        statement = statement.where(StockLevel.location_id == location_id)
    listing = Keyset(
        f"inventory.stock:{acting.seller_id}:{variant_id}:{location_id}",
        SortKey(StockLevel.variant_id),
        id_column=StockLevel.location_id,
    )
    rows, next_cursor = await listing.fetch(session, cast("Select[Any]", statement), page)
    return page_response([_stock_view(service.view_of(row)) for row in rows], next_cursor, fields)


@router.put(
    "/seller/stock/{variant_id}/{location_id}",
    response_model=StockOut,
    summary="Set a stock level after a count",
    responses=problem_responses(400, 403, 404, 409, 422),
)
async def set_stock(
    acting: ActingSellerDep,
    variant_id: uuid.UUID,
    location_id: uuid.UUID,
    body: StockSet,
    session: SessionDep,
    runtime: RuntimeDep,
) -> StockOut:
    """Managers and owners. Refused (409 ``stock-below-committed``) below the units
    reserved and allocated; the change is recorded in the history as ``set``."""
    _writer(acting)
    view, _ = await service.set_stock(
        session,
        runtime.clock.now(),
        seller_id=acting.seller_id,
        variant_id=variant_id,
        location_id=location_id,
        on_hand=body.on_hand,
        reason=body.reason,
        actor_id=acting.user_id,
        clock=runtime.clock,
    )
    return _stock_view(view)


@router.post(
    "/seller/stock/{variant_id}/{location_id}/adjustments",
    status_code=201,
    response_model=AdjustmentResult,
    summary="Add or remove units",
    responses=problem_responses(400, 403, 404, 409, 422),
)
async def adjust_stock(
    acting: ActingSellerDep,
    variant_id: uuid.UUID,
    location_id: uuid.UUID,
    body: StockAdjust,
    session: SessionDep,
    runtime: RuntimeDep,
) -> AdjustmentResult:
    """Managers and owners. ``delta`` is added to on hand in one conditional statement:
    refused (409 ``stock-below-committed``) when the level would drop below the units
    reserved and allocated, or below zero."""
    _writer(acting)
    view, adjustment = await service.adjust_stock(
        session,
        runtime.clock.now(),
        seller_id=acting.seller_id,
        variant_id=variant_id,
        location_id=location_id,
        delta=body.delta,
        kind=AdjustmentKind(body.kind.value),
        reason=body.reason,
        actor_id=acting.user_id,
        clock=runtime.clock,
    )
    (shown,) = await _adjustment_views(session, [adjustment])
    return AdjustmentResult(adjustment=shown, stock=_stock_view(view))


@router.get(
    "/seller/stock/adjustments",
    response_model=Page[AdjustmentOut],
    summary="The history of your store's stock changes",
    responses=problem_responses(400, 403),
)
async def list_adjustments(
    acting: ActingSellerDep,
    session: SessionDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(AdjustmentFields)],
    variant_id: Annotated[uuid.UUID | None, Query(description="Only this variant.")] = None,
    location_id: Annotated[uuid.UUID | None, Query(description="Only this location.")] = None,
) -> Response:
    """Newest first: who changed what, why, by how much, and the level it left."""
    statement = service.adjustments(acting.seller_id)
    if variant_id is not None:
        statement = statement.where(StockAdjustment.variant_id == variant_id)
    if location_id is not None:
        statement = statement.where(StockAdjustment.location_id == location_id)
    listing = Keyset(
        f"inventory.adjustments:{acting.seller_id}:{variant_id}:{location_id}",
        SortKey(StockAdjustment.at, descending=True),
        id_column=StockAdjustment.id,
    )
    rows, next_cursor = await listing.fetch(session, statement, page)
    return page_response(await _adjustment_views(session, rows), next_cursor, fields)
