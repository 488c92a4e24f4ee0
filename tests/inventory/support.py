"""Stores with stock for the inventory tests, built through the service (no HTTP)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select

from soko.inventory import public, service
from soko.inventory.models import LocationKind, Reservation, StockLevel
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime

Key = tuple[uuid.UUID, uuid.UUID]


@dataclass(frozen=True)
class Store:
    """A seller with locations and registered variants."""

    seller_id: uuid.UUID
    location_ids: tuple[uuid.UUID, ...]
    variant_ids: tuple[uuid.UUID, ...]


async def make_store(
    runtime: Runtime,
    *,
    variants: int = 1,
    locations: int = 1,
    on_hand: int | Sequence[int] = 0,
    seller_id: uuid.UUID | None = None,
) -> Store:
    """A store whose every variant has ``on_hand`` units at each location (a sequence
    gives each location its own count)."""
    seller = seller_id or uuid7()
    counts = [on_hand] * locations if isinstance(on_hand, int) else list(on_hand)
    actor = uuid7()
    now = runtime.clock.now()
    async with runtime.db.transaction() as session:
        location_ids = [
            (
                await service.create_location(
                    session,
                    now,
                    seller_id=seller,
                    name=f"Depot {index}",
                    kind=LocationKind.warehouse,
                    address="",
                )
            ).id
            for index in range(locations)
        ]
        variant_ids = []
        for index in range(variants):
            variant_id = uuid7()
            await public.register_item(
                session, variant_id=variant_id, seller_id=seller, sku=f"SKU-{index}"
            )
            variant_ids.append(variant_id)
            for location_id, count in zip(location_ids, counts, strict=True):
                if count:
                    await service.set_stock(
                        session,
                        now,
                        seller_id=seller,
                        variant_id=variant_id,
                        location_id=location_id,
                        on_hand=count,
                        reason="opening count",
                        actor_id=actor,
                    )
    return Store(seller, tuple(location_ids), tuple(variant_ids))


async def levels(runtime: Runtime) -> dict[Key, tuple[int, int, int]]:
    """(on_hand, reserved, allocated) of every stock level."""
    async with runtime.db.transaction(read_only=True) as session:
        rows = await session.execute(
            select(
                StockLevel.variant_id,
                StockLevel.location_id,
                StockLevel.on_hand,
                StockLevel.reserved,
                StockLevel.allocated,
            )
        )
        return {(v, loc): (on_hand, res, alloc) for v, loc, on_hand, res, alloc in rows}


async def reservation_statuses(runtime: Runtime, holder_ref: uuid.UUID) -> list[tuple[str, int]]:
    async with runtime.db.transaction(read_only=True) as session:
        rows = await session.execute(
            select(Reservation.status, Reservation.quantity)
            .where(Reservation.holder_ref == holder_ref)
            .order_by(Reservation.id)
        )
        return [(status, quantity) for status, quantity in rows]


async def reserve(
    runtime: Runtime,
    lines: Sequence[tuple[uuid.UUID, int]],
    *,
    holder_ref: uuid.UUID | None = None,
    hold: dt.timedelta = dt.timedelta(minutes=15),
    strategy: public.ReservationStrategy | None = None,
) -> uuid.UUID:
    """Reserve in a transaction of its own; the holder ref."""
    holder = holder_ref or uuid7()
    async with runtime.db.transaction() as session:
        await public.reserve(
            session,
            runtime,
            holder_ref=holder,
            lines=[public.ReservationRequest(variant_id=v, quantity=q) for v, q in lines],
            expires_at=runtime.clock.now() + hold,
            strategy=strategy,
        )
    return holder


async def available(runtime: Runtime, variant_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, int]:
    async with runtime.db.transaction(read_only=True) as session:
        return await public.available_for(session, runtime, variant_ids)
