"""Items inventory knows about, and how many units of each a buyer may take now."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import BindParameter, Select, and_, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.inventory.models import (
    InventoryItem,
    Location,
    Reservation,
    ReservationStatus,
    StockLevel,
)
from soko.platform.db import dialect_insert

S = StockLevel
R = Reservation


async def register_item(
    session: AsyncSession,
    *,
    variant_id: uuid.UUID,
    seller_id: uuid.UUID,
    sku: str,
    now: dt.datetime,
) -> None:
    """Insert the item, or update its SKU; a variant never changes seller."""
    values = {"variant_id": variant_id, "seller_id": seller_id, "sku": sku, "created_at": now}
    insert_: Any = dialect_insert(session)
    statement = insert_(InventoryItem).values(values)
    statement = statement.on_conflict_do_update(
        index_elements=[InventoryItem.variant_id],
        set_={"sku": statement.excluded.sku},
        where=InventoryItem.seller_id == statement.excluded.seller_id,
    )
    await session.execute(statement)


def availability_by_variant(
    now: dt.datetime,
    variant_ids: Iterable[uuid.UUID] | BindParameter[Any] | Select[Any] | None = None,
) -> Select[uuid.UUID, int]:
    """``(variant_id, available)`` per variant that has stock at an active location.

    ``available`` is on_hand - reserved - allocated summed over those locations, with the
    units of holds that expired but are not released yet added back. ``now`` and
    ``variant_ids`` may be bind parameters (``variant_ids`` an expanding one) of a caller
    that builds its statement once; ``variant_ids`` may also be a select of one column
    of ids, which the database evaluates inside this statement."""
    ids = (
        variant_ids
        if variant_ids is None or isinstance(variant_ids, BindParameter | Select)
        else list(variant_ids)
    )
    expired = select(R.variant_id, R.location_id, func.sum(R.quantity).label("quantity")).where(
        R.status == ReservationStatus.held.value, R.expires_at <= now
    )
    if ids is not None:
        expired = expired.where(R.variant_id.in_(ids))
    expired_sub = expired.group_by(R.variant_id, R.location_id).subquery("expired_holds")
    statement = (
        select(
            S.variant_id.label("variant_id"),
            func.sum(
                S.on_hand - S.reserved - S.allocated + func.coalesce(expired_sub.c.quantity, 0)
            ).label("available"),
        )
        .join(Location, and_(Location.id == S.location_id, Location.active.is_(True)))
        .outerjoin(
            expired_sub,
            and_(
                expired_sub.c.variant_id == S.variant_id,
                expired_sub.c.location_id == S.location_id,
            ),
        )
        .group_by(S.variant_id)
    )
    if ids is not None:
        statement = statement.where(S.variant_id.in_(ids))
    return statement


async def available_for(
    session: AsyncSession, now: dt.datetime, variant_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, int]:
    ids = list(dict.fromkeys(variant_ids))
    if not ids:
        return {}
    result = await session.execute(availability_by_variant(now, ids))
    found = {variant_id: int(available) for variant_id, available in result}
    return {variant_id: max(0, found.get(variant_id, 0)) for variant_id in ids}
