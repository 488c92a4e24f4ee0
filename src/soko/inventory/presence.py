"""Whether a variant has units on hand, and telling the domains that keep a copy of it.

The public listing's ``in_stock`` filter would otherwise test every product's stock in
turn, and a marketplace whose shelves are mostly empty would make each such page read
the whole catalog. The catalog keeps a flag per product instead ("some variant has units
on hand at an active location"), which its indexes can select on; the exact figure
(on hand minus held and allocated) is still checked on the rows the flag lets through.

The flag changes only when a stock level crosses zero on hand or a location goes
(in)active, never on a hold, so checkouts do not touch it. Inventory tells its listeners
in the writer's own transaction (ADR 0023): a listener sees the change before anyone
else does, and the flag is never behind a committed stock level.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable

from sqlalchemy import ColumnElement, and_, exists, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import QueryableAttribute

from soko.inventory.models import Location, StockLevel

PresenceListener = Callable[[AsyncSession, frozenset[uuid.UUID]], Awaitable[None]]

_listeners: list[PresenceListener] = []


def on_presence_changed(listener: PresenceListener) -> PresenceListener:
    """Register ``listener``, called with the ids of variants whose units on hand may
    have appeared or run out, inside the transaction that changed them. Registering the
    same function twice keeps one."""
    if listener not in _listeners:
        _listeners.append(listener)
    return listener


async def presence_changed(session: AsyncSession, variant_ids: Iterable[uuid.UUID]) -> None:
    ids = frozenset(variant_ids)
    if not ids:
        return
    for listener in _listeners:
        await listener(session, ids)


def has_units_on_hand(
    variant_id: ColumnElement[uuid.UUID] | QueryableAttribute[uuid.UUID],
) -> ColumnElement[bool]:
    """A condition to embed in another domain's query: the variant whose id is
    ``variant_id`` (a column of that query) has units on hand at an active location,
    whether or not they are held or sold. The figure the presence flag follows."""
    return exists(
        select(StockLevel.variant_id)
        .join(Location, and_(Location.id == StockLevel.location_id, Location.active.is_(True)))
        .where(StockLevel.variant_id == variant_id, StockLevel.on_hand > 0)
    )
