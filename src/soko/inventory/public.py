"""What other domains may use of inventory: availability, reservations, and the item
registry. Functions return frozen values or primitives, never ORM rows.

The catalog registers each variant it creates (:func:`register_item`) and embeds
:func:`availability_by_variant` in its product queries; carts read
:func:`available_for`; checkout and orders move stock through :func:`reserve`,
:func:`commit_hold`, :func:`release_hold`, :func:`fulfil` and
:func:`rehold_if_available`, all keyed by a ``holder_ref`` (the checkout group id).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BindParameter, Select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.inventory import availability as _availability
from soko.inventory import reservations as _reservations
from soko.inventory.errors import OutOfStock
from soko.inventory.planning import ReservationRequest, Shortage
from soko.inventory.presence import PresenceListener, has_units_on_hand, on_presence_changed
from soko.inventory.tags import INVENTORY_TAG, stock_tag
from soko.platform.config import ReservationStrategy
from soko.platform.outbox import session_now
from soko.platform.runtime import Runtime

__all__ = [
    "INVENTORY_TAG",
    "Availability",
    "OutOfStock",
    "PresenceListener",
    "ReservationRequest",
    "ReservationStrategy",
    "Shortage",
    "availability_by_variant",
    "available_for",
    "commit_hold",
    "fulfil",
    "has_units_on_hand",
    "on_presence_changed",
    "register_item",
    "rehold_if_available",
    "release_hold",
    "reserve",
    "reserve_committed",
    "stock_tag",
]


@dataclass(frozen=True, slots=True)
class Availability:
    """How many units of a variant a buyer may take now, over all active locations."""

    variant_id: uuid.UUID
    available: int


async def register_item(
    session: AsyncSession,
    *,
    variant_id: uuid.UUID,
    seller_id: uuid.UUID,
    sku: str,
) -> None:
    """Tell inventory that ``variant_id`` exists and belongs to ``seller_id``.

    Called by the catalog when it creates a variant, and again when its SKU changes:
    idempotent (the SKU is updated; the owner of a registered variant never changes).
    Until a variant is registered its seller cannot stock it."""
    await _availability.register_item(
        session,
        variant_id=variant_id,
        seller_id=seller_id,
        sku=sku,
        now=session_now(session),
    )


async def available_for(
    session: AsyncSession, runtime: Runtime, variant_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, int]:
    """Units available now per variant, in one query; a variant without stock is 0.

    Available is on hand - reserved - allocated over the seller's active locations, where
    holds past their time count as free even before the release job has run."""
    return await _availability.available_for(session, runtime.clock.now(), variant_ids)


def availability_by_variant(
    now: dt.datetime,
    variant_ids: Iterable[uuid.UUID] | BindParameter[Any] | Select[Any] | None = None,
) -> Select[uuid.UUID, int]:
    """A read model to embed in another domain's query: columns ``variant_id`` and
    ``available``, one row per variant with stock at an active location (a variant
    without a row has none). ``available`` can be 0; filter ``available > 0`` for "in
    stock". Carry :data:`INVENTORY_TAG` on any cached read that uses it.

    With ``variant_ids`` it aggregates the stock of those variants only; without, of
    every variant, which suits a query that filters by other columns (a product page)
    and scans every stock row when the database cannot push a join's keys into the
    grouping. A caller building its statement once passes bind parameters: ``now`` a
    datetime one, ``variant_ids`` an expanding one. ``variant_ids`` may also be a select
    of one column of ids (the variants of a page of products, say): the database then
    finds the ids and their stock in one statement."""
    return _availability.availability_by_variant(now, variant_ids)


async def reserve(
    session: AsyncSession,
    runtime: Runtime,
    *,
    holder_ref: uuid.UUID,
    lines: Sequence[ReservationRequest],
    expires_at: dt.datetime,
    strategy: ReservationStrategy | None = None,
) -> None:
    """Hold every line's quantity for ``holder_ref`` until ``expires_at``, all or nothing.

    Raises :class:`OutOfStock` (409, ``shortages`` in the body) when a line cannot be
    served; nothing stays reserved then. Each line may be served by one or several of
    its seller's active locations; lines of one variant add up. ``strategy`` overrides
    ``Settings.reservation_strategy`` (for experiments and tests).

    Three statements whatever the number of lines and sellers (four when expired holds
    of these variants are released on the way); only a collision with a concurrent
    buyer under the optimistic strategy adds any. Call it last in the transaction, right
    before commit:
    the stock rows stay locked from the UPDATE to the commit, and a short lock makes a
    hot item sell faster."""
    await _reservations.reserve(
        session,
        runtime,
        holder_ref=holder_ref,
        lines=lines,
        expires_at=expires_at,
        strategy=strategy,
    )


async def reserve_committed(
    runtime: Runtime,
    *,
    holder_ref: uuid.UUID,
    lines: Sequence[ReservationRequest],
    expires_at: dt.datetime,
    strategy: ReservationStrategy | None = None,
) -> None:
    """:func:`reserve`, committed on its own before it returns: the stock rows are
    locked only while the hold is written, never while the caller's own transaction
    goes on. On PostgreSQL a variant stocked at one location is held in one statement,
    locked and committed inside the database.

    The caller owns what follows: if its own work is not committed, it gives the units
    back with :func:`release_hold` (``soko.platform.runtime.on_rollback``). Should that
    never happen (the process died), the hold runs out at ``expires_at`` like any other
    and the release job gives its units back."""
    await _reservations.reserve_committed(
        runtime, holder_ref=holder_ref, lines=lines, expires_at=expires_at, strategy=strategy
    )


async def commit_hold(session: AsyncSession, runtime: Runtime, holder_ref: uuid.UUID) -> None:
    """The holder paid: its held units move from reserved to allocated.

    Holds past their time that nobody released yet are committed too (the stock is
    still there). Only ``held`` reservations change, so a second call does nothing; a
    hold already released or expired stays so (see :func:`rehold_if_available`)."""
    await _reservations.commit_hold(session, runtime, holder_ref)


async def release_hold(
    session: AsyncSession,
    runtime: Runtime,
    holder_ref: uuid.UUID,
    *,
    reason: str,
    variant_ids: Iterable[uuid.UUID] | None = None,
) -> int:
    """Give the holder's units back to stock: held ones leave reserved, committed ones
    leave allocated. ``variant_ids`` limits it to those variants (one order of a
    checkout group cancelled). Returns the number of units given back; idempotent (a
    second call gives back 0)."""
    return await _reservations.release_hold(
        session, runtime, holder_ref, reason=reason, variant_ids=variant_ids
    )


async def release_holds(
    session: AsyncSession, runtime: Runtime, holder_refs: Iterable[uuid.UUID], *, reason: str
) -> int:
    """:func:`release_hold` for many holders in one pass, their stock rows locked in key
    order (a job expiring many checkouts). The units given back."""
    return await _reservations.release_holds(session, runtime, holder_refs, reason=reason)


async def fulfil(
    session: AsyncSession,
    runtime: Runtime,
    holder_ref: uuid.UUID,
    variant_ids: Iterable[uuid.UUID] | None = None,
) -> None:
    """The holder's committed units were shipped: they leave allocated and on hand, and
    each stock level gets a ``sale`` row in its adjustment history. ``variant_ids``
    limits it to those variants (one seller's order of the group). Idempotent."""
    await _reservations.fulfil(session, runtime, holder_ref, variant_ids)


async def rehold_if_available(
    session: AsyncSession,
    runtime: Runtime,
    holder_ref: uuid.UUID,
    expires_at: dt.datetime,
    *,
    variant_ids: Iterable[uuid.UUID] | None = None,
) -> bool:
    """Hold the holder's stock again until ``expires_at``, for a payment that arrived
    after its reservation ran out.

    Holds still in place are extended; holds that expired or were released are reserved
    again, all or nothing, if stock allows. Returns True when the holder's units are
    held (or committed) afterwards, False when stock no longer allows it (nothing
    changes then). Safe to call twice."""
    return await _reservations.rehold_if_available(
        session, runtime, holder_ref, expires_at, variant_ids=variant_ids
    )
