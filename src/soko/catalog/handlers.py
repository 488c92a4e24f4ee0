"""What the catalog does when other domains change: a product's ``stocked`` flag follows
inventory's units on hand (see ``soko.inventory.presence``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence

from sqlalchemy import exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.catalog.models import Product, Variant
from soko.inventory.public import has_units_on_hand, on_presence_changed

# Ids per statement: a location going inactive may name every variant a store has, and
# both drivers cap a statement's parameters (SQLite at 32,766).
IDS_PER_STATEMENT = 1000


def _chunks(ids: Sequence[uuid.UUID]) -> Iterator[Sequence[uuid.UUID]]:
    for start in range(0, len(ids), IDS_PER_STATEMENT):
        yield ids[start : start + IDS_PER_STATEMENT]


@on_presence_changed
async def follow_units_on_hand(session: AsyncSession, variant_ids: frozenset[uuid.UUID]) -> None:
    """Set the ``stocked`` flag of the products of ``variant_ids`` from their stock.

    The products are locked first, in id order (across chunks too), so writers of two
    variants of one product take turns and never wait for each other in a circle; at
    READ COMMITTED the update that follows reads the stock as committed by then, so the
    last writer leaves the flag right whatever the order. (A location's switch and a
    stock write there take turns on the location's row: see inventory's service.)"""
    product_ids: set[uuid.UUID] = set()
    for chunk in _chunks(sorted(variant_ids)):
        product_ids.update(
            await session.scalars(
                select(Variant.product_id).where(Variant.id.in_(chunk)).distinct()
            )
        )
    units = exists(
        select(Variant.id).where(Variant.product_id == Product.id, has_units_on_hand(Variant.id))
    )
    for chunk in _chunks(sorted(product_ids)):
        locked = (
            await session.scalars(
                select(Product.id)
                .where(Product.id.in_(chunk))
                .order_by(Product.id)
                .with_for_update()
            )
        ).all()
        await session.execute(
            update(Product)
            .where(Product.id.in_(locked), Product.stocked != units)
            .values(stocked=units)
            .execution_options(synchronize_session=False)
        )
