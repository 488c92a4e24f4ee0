"""What the catalog does when other domains change: a product's ``stocked`` flag follows
inventory's units on hand (see ``soko.inventory.presence``)."""

from __future__ import annotations

import uuid

from sqlalchemy import exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.catalog.models import Product, Variant
from soko.inventory.public import has_units_on_hand, on_presence_changed


@on_presence_changed
async def follow_units_on_hand(session: AsyncSession, variant_ids: frozenset[uuid.UUID]) -> None:
    """Set the ``stocked`` flag of the products of ``variant_ids`` from their stock.

    The products are locked first, in id order, so writers of two variants of one
    product take turns; at READ COMMITTED the update that follows reads the stock as
    committed by then, so the last writer leaves the flag right whatever the order."""
    locked = (
        await session.scalars(
            select(Product.id)
            .where(Product.id.in_(select(Variant.product_id).where(Variant.id.in_(variant_ids))))
            .order_by(Product.id)
            .with_for_update()
        )
    ).all()
    if not locked:
        return
    units = exists(
        select(Variant.id).where(Variant.product_id == Product.id, has_units_on_hand(Variant.id))
    )
    await session.execute(
        update(Product)
        .where(Product.id.in_(locked), Product.stocked != units)
        .values(stocked=units)
        .execution_options(synchronize_session=False)
    )
