"""Retention of carts: closed carts and their lines go after ``SOKO_RETENTION_DAYS``.

A cart is closed when it was checked out (``converted``), folded into its owner's cart
on sign-in (``merged``) or left untouched for ``SOKO_CART_EXPIRY_HOURS`` (``expired``);
none of these takes a change again, so once closed for the retention window it goes,
with its lines. An open cart is never purged, whatever its age (the expiry job closes
it first). What outlives a purged cart: checkout groups keep the id of the cart they
came from as a plain value (no foreign key), and repeating an explicit merge of a
purged anonymous cart answers 404 as for any unknown cart.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

import structlog
from sqlalchemy import Table, delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.cart.models import Cart, CartLine, CartStatus
from soko.platform.jobs import JobContext, registry
from soko.platform.retention import continue_purge, days, delete_where_in

log = structlog.get_logger("soko.cart.retention")

PURGE_JOB = "cart.purge_closed"
BATCH = 2_000
CLOSED = (CartStatus.converted, CartStatus.merged, CartStatus.expired)

_CARTS = cast(Table, Cart.__table__)
_LINES = cast(Table, CartLine.__table__)


async def purge_closed_carts(
    session: AsyncSession, now: dt.datetime, *, keep: dt.timedelta, limit: int = BATCH
) -> tuple[int, int, bool]:
    """Delete up to ``limit`` carts of each closed status last changed before
    ``now - keep``, lines first. (carts, lines, whether more may wait)."""
    cutoff = now - keep
    carts = lines = 0
    full = False
    for status in CLOSED:
        # The (status, updated_at) index the expiry job walks.
        conditions = [_CARTS.c.status == status.value, _CARTS.c.updated_at < cutoff]
        picked = list(
            (
                await session.scalars(
                    select(_CARTS.c.id)
                    .where(*conditions)
                    .order_by(_CARTS.c.updated_at)
                    .limit(limit)
                )
            ).all()
        )
        if not picked:
            continue
        # A closed cart takes no new line, so these are all its lines.
        lines += await delete_where_in(session, _LINES.c.cart_id, picked)
        deleted = await session.execute(
            delete(_CARTS).where(_CARTS.c.id.in_(picked), *conditions).returning(_CARTS.c.id)
        )
        carts += len(deleted.all())
        full = full or len(picked) >= limit
    return carts, lines, full


@registry.schedule("25 * * * *", name=PURGE_JOB)
async def purge_closed_carts_job(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Hourly: forget carts closed for longer than ``SOKO_RETENTION_DAYS``."""
    carts, lines, full = await purge_closed_carts(
        ctx.session, ctx.now(), keep=days(ctx.services.settings.retention_days)
    )
    if carts:
        log.info("closed carts purged", carts=carts, lines=lines)
    await continue_purge(ctx, PURGE_JOB, payload, more=full)
