"""A seller's locations and stock levels, and the history of every change of on hand.

Every function takes the acting seller's id and treats anything of another seller as
missing (404). Stock changes are conditional on what is promised: on hand never drops
below reserved + allocated, and never below zero.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, and_, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from soko.inventory.errors import LocationNameTaken, StockBelowCommitted
from soko.inventory.models import (
    AdjustmentKind,
    InventoryItem,
    Location,
    LocationKind,
    Reservation,
    ReservationStatus,
    StockAdjustment,
    StockLevel,
)
from soko.inventory.presence import presence_changed
from soko.inventory.reservations import release_expired_at, stock_changed
from soko.inventory.schemas import MAX_UNITS
from soko.platform.clock import Clock
from soko.platform.db import dialect_insert
from soko.platform.errors import NotFound, PreconditionFailed, ValidationFailed
from soko.platform.etag import etag_for_version, if_match_passes
from soko.platform.ids import uuid7

S = StockLevel
R = Reservation


# -- locations ---------------------------------------------------------------------------------


async def create_location(
    session: AsyncSession,
    now: dt.datetime,
    *,
    seller_id: uuid.UUID,
    name: str,
    kind: LocationKind,
    address: str,
) -> Location:
    statement = (
        dialect_insert(session)(Location)
        .values(
            id=uuid7(),
            seller_id=seller_id,
            name=name,
            kind=kind.value,
            address=address,
            active=True,
            created_at=now,
            updated_at=now,
            version=1,
        )
        .on_conflict_do_nothing(index_elements=[Location.seller_id, Location.name])
        .returning(Location)
    )
    location: Location | None = (await session.scalars(statement)).one_or_none()
    if location is None:
        raise LocationNameTaken(f"You already have a location named {name!r}.")
    return location


async def seller_location(
    session: AsyncSession,
    seller_id: uuid.UUID,
    location_id: uuid.UUID,
    *,
    share_lock: bool = False,
) -> Location:
    """One of the seller's locations; with ``share_lock``, locked against a change of it
    (``FOR SHARE`` on PostgreSQL) until the transaction ends."""
    statement = select(Location).where(Location.id == location_id, Location.seller_id == seller_id)
    if share_lock:
        statement = statement.with_for_update(read=True)
    location = await session.scalar(statement)
    if location is None:
        raise NotFound(f"No location {location_id}.")
    return location


def seller_locations(seller_id: uuid.UUID) -> Select[Any]:
    return select(Location).where(Location.seller_id == seller_id)


async def update_location(
    session: AsyncSession,
    now: dt.datetime,
    *,
    seller_id: uuid.UUID,
    location_id: uuid.UUID,
    changes: dict[str, Any],
    if_match: str | None = None,
) -> Location:
    """Apply ``changes`` (name, kind, address, active) to one of the seller's locations.

    With ``if_match``, only if the location is still at the version it names (412
    otherwise, also when another change lands between the read and the write)."""
    location = await seller_location(session, seller_id, location_id)
    current = etag_for_version(location.version)
    if if_match is not None and not if_match_passes(if_match, current):
        raise _location_changed(current)
    if not changes:
        return location
    values = {key: value.value if key == "kind" else value for key, value in changes.items()}
    guard = [Location.id == location_id, Location.seller_id == seller_id]
    if if_match is not None:
        guard.append(Location.version == location.version)
    try:
        async with session.begin_nested():
            result = await session.execute(
                update(Location)
                .where(*guard)
                .values(**values, updated_at=now, version=Location.version + 1)
                .execution_options(synchronize_session=False)
            )
    except IntegrityError:
        name = changes.get("name")
        raise LocationNameTaken(f"You already have a location named {name!r}.") from None
    if result.rowcount == 0:  # type: ignore[attr-defined]
        await session.refresh(location)
        raise _location_changed(etag_for_version(location.version))
    if "active" in changes:
        # A location going (in)active changes what every variant stocked there offers.
        levels = (
            await session.execute(
                select(S.variant_id, S.on_hand).where(S.location_id == location_id)
            )
        ).all()
        stock_changed(session, [variant_id for variant_id, _ in levels])
        await presence_changed(session, [v for v, on_hand in levels if on_hand > 0])
    await session.refresh(location)
    return location


def _location_changed(current_etag: str) -> PreconditionFailed:
    return PreconditionFailed(
        "The location changed since you read it: fetch it and try again.",
        current_etag=current_etag,
    )


# -- stock levels --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StockView:
    """A stock level as a seller sees it. ``reserved`` counts live holds only: units of
    holds past their time are already back in ``available``."""

    variant_id: uuid.UUID
    location_id: uuid.UUID
    sku: str
    location_name: str
    location_active: bool
    on_hand: int
    reserved: int
    allocated: int
    available: int
    version: int
    updated_at: dt.datetime


def stock_views(seller_id: uuid.UUID, now: dt.datetime) -> Select[*tuple[Any, ...]]:
    """The seller's stock levels with their live counters, for paging."""
    expired = (
        select(R.variant_id, R.location_id, func.sum(R.quantity).label("quantity"))
        .where(R.status == ReservationStatus.held.value, R.expires_at <= now)
        .group_by(R.variant_id, R.location_id)
        .subquery("expired_holds")
    )
    expired_units = func.coalesce(expired.c.quantity, 0)
    return (
        select(
            S.variant_id,
            S.location_id,
            InventoryItem.sku,
            Location.name.label("location_name"),
            Location.active.label("location_active"),
            S.on_hand,
            (S.reserved - expired_units).label("reserved"),
            S.allocated,
            (S.on_hand - S.reserved - S.allocated + expired_units).label("available"),
            S.version,
            S.updated_at,
        )
        .join(InventoryItem, InventoryItem.variant_id == S.variant_id)
        .join(Location, Location.id == S.location_id)
        .outerjoin(
            expired,
            and_(expired.c.variant_id == S.variant_id, expired.c.location_id == S.location_id),
        )
        .where(S.seller_id == seller_id)
    )


def view_of(row: Any) -> StockView:
    return StockView(
        variant_id=row.variant_id,
        location_id=row.location_id,
        sku=row.sku,
        location_name=row.location_name,
        location_active=bool(row.location_active),
        on_hand=row.on_hand,
        reserved=int(row.reserved),
        allocated=row.allocated,
        available=max(0, int(row.available)),
        version=row.version,
        updated_at=row.updated_at,
    )


async def stock_view(
    session: AsyncSession,
    now: dt.datetime,
    *,
    seller_id: uuid.UUID,
    variant_id: uuid.UUID,
    location_id: uuid.UUID,
) -> StockView:
    row = (
        await session.execute(
            stock_views(seller_id, now).where(
                S.variant_id == variant_id, S.location_id == location_id
            )
        )
    ).one()
    return view_of(row)


async def _check_ownership(
    session: AsyncSession, seller_id: uuid.UUID, variant_id: uuid.UUID, location_id: uuid.UUID
) -> None:
    owner = await session.scalar(
        select(InventoryItem.seller_id).where(InventoryItem.variant_id == variant_id)
    )
    if owner != seller_id:
        raise NotFound(f"No variant {variant_id}.")
    # Locked until the stock write commits: a location going (in)active meanwhile waits,
    # then sees this write's units on hand, and this write's presence listener never
    # reads a location state that is about to change (ADR 0023).
    await seller_location(session, seller_id, location_id, share_lock=True)


async def _record(
    session: AsyncSession,
    now: dt.datetime,
    *,
    seller_id: uuid.UUID,
    variant_id: uuid.UUID,
    location_id: uuid.UUID,
    delta: int,
    kind: AdjustmentKind,
    reason: str,
    actor_id: uuid.UUID | None,
    on_hand_after: int,
) -> StockAdjustment:
    result = await session.scalars(
        insert(StockAdjustment)
        .values(
            id=uuid7(),
            variant_id=variant_id,
            location_id=location_id,
            seller_id=seller_id,
            delta=delta,
            kind=kind.value,
            reason=reason,
            actor_id=actor_id,
            on_hand_after=on_hand_after,
            at=now,
        )
        .returning(StockAdjustment)
    )
    return result.one()


def _below_committed(on_hand: int, committed: int, wanted: int) -> StockBelowCommitted:
    return StockBelowCommitted(
        f"{committed} units are reserved or allocated; on hand cannot become {wanted}.",
        on_hand=on_hand,
        committed=committed,
    )


async def set_stock(
    session: AsyncSession,
    now: dt.datetime,
    *,
    seller_id: uuid.UUID,
    variant_id: uuid.UUID,
    location_id: uuid.UUID,
    on_hand: int,
    reason: str,
    actor_id: uuid.UUID,
    clock: Clock | None = None,
) -> tuple[StockView, StockAdjustment]:
    """Set the level after a count; refused when fewer than the promised units.

    ``clock`` (else ``now``) times the history row, read once the level is locked, so
    the history lists concurrent changes in the order they were made."""
    await _check_ownership(session, seller_id, variant_id, location_id)
    # Holds past their time must not stand in the seller's way.
    await release_expired_at(session, now, variant_id, location_id)
    await session.execute(
        dialect_insert(session)(S)
        .values(
            variant_id=variant_id,
            location_id=location_id,
            seller_id=seller_id,
            on_hand=0,
            reserved=0,
            allocated=0,
            version=1,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=[S.variant_id, S.location_id])
    )
    key = and_(S.variant_id == variant_id, S.location_id == location_id)
    before, reserved, allocated = (
        await session.execute(
            select(S.on_hand, S.reserved, S.allocated).where(key).with_for_update()
        )
    ).one()
    if on_hand < reserved + allocated:
        raise _below_committed(before, reserved + allocated, on_hand)
    await session.execute(
        update(S)
        .where(key, S.reserved + S.allocated <= on_hand)
        .values(on_hand=on_hand, version=S.version + 1, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    adjustment = await _record(
        session,
        clock.now() if clock is not None else now,
        seller_id=seller_id,
        variant_id=variant_id,
        location_id=location_id,
        delta=on_hand - before,
        kind=AdjustmentKind.set,
        reason=reason,
        actor_id=actor_id,
        on_hand_after=on_hand,
    )
    stock_changed(session, [variant_id])
    if (before > 0) != (on_hand > 0):
        await presence_changed(session, [variant_id])
    view = await stock_view(
        session, now, seller_id=seller_id, variant_id=variant_id, location_id=location_id
    )
    return view, adjustment


async def adjust_stock(
    session: AsyncSession,
    now: dt.datetime,
    *,
    seller_id: uuid.UUID,
    variant_id: uuid.UUID,
    location_id: uuid.UUID,
    delta: int,
    kind: AdjustmentKind,
    reason: str,
    actor_id: uuid.UUID,
    clock: Clock | None = None,
) -> tuple[StockView, StockAdjustment]:
    """Add ``delta`` (negative to remove) in one conditional statement; ``clock`` as for
    :func:`set_stock`."""
    await _check_ownership(session, seller_id, variant_id, location_id)
    await release_expired_at(session, now, variant_id, location_id)
    key = and_(S.variant_id == variant_id, S.location_id == location_id)
    if delta > 0:
        insert_ = dialect_insert(session)(S).values(
            variant_id=variant_id,
            location_id=location_id,
            seller_id=seller_id,
            on_hand=delta,
            reserved=0,
            allocated=0,
            version=1,
            updated_at=now,
        )
        statement = insert_.on_conflict_do_update(
            index_elements=[S.variant_id, S.location_id],
            set_={"on_hand": S.on_hand + delta, "version": S.version + 1, "updated_at": now},
            # A level holds at most MAX_UNITS, however many adjustments add to it.
            where=S.on_hand + delta <= MAX_UNITS,
        ).returning(S.on_hand)
    else:
        statement = (
            update(S)
            .where(key, S.on_hand + delta >= S.reserved + S.allocated)
            .values(on_hand=S.on_hand + delta, version=S.version + 1, updated_at=now)
            .returning(S.on_hand)
            .execution_options(synchronize_session=False)
        )
    after = await session.scalar(statement)
    if after is None and delta > 0:
        raise ValidationFailed.of_field(
            "delta",
            f"would take the level above {MAX_UNITS:,} units on hand, the most one holds",
        )
    if after is None:
        current = (
            await session.execute(select(S.on_hand, S.reserved, S.allocated).where(key))
        ).one_or_none()
        if current is None:
            raise StockBelowCommitted(
                f"This variant has no stock at this location yet; on hand cannot become "
                f"{delta}. Set its level first, or add units with a positive delta.",
                on_hand=0,
                committed=0,
            )
        on_hand, reserved, allocated = current
        raise _below_committed(on_hand, reserved + allocated, on_hand + delta)
    adjustment = await _record(
        session,
        clock.now() if clock is not None else now,
        seller_id=seller_id,
        variant_id=variant_id,
        location_id=location_id,
        delta=delta,
        kind=kind,
        reason=reason,
        actor_id=actor_id,
        on_hand_after=after,
    )
    stock_changed(session, [variant_id])
    if (after > 0) != (after - delta > 0):  # units on hand appeared or ran out
        await presence_changed(session, [variant_id])
    view = await stock_view(
        session, now, seller_id=seller_id, variant_id=variant_id, location_id=location_id
    )
    return view, adjustment


def adjustments(seller_id: uuid.UUID) -> Select[Any]:
    """The seller's adjustment history, for paging (newest first)."""
    return select(StockAdjustment).where(StockAdjustment.seller_id == seller_id)
