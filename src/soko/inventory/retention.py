"""Retention of stock reservations: ended ones go after ``SOKO_RETENTION_DAYS``.

A reservation that is ``held`` counts in ``reserved`` and one that is ``committed`` (paid,
not shipped) counts in ``allocated``: both are in use and never purged. The others have
ended and changed the stock levels for good: ``released``, ``expired``, ``fulfilled``
(shipped) and ``renewed`` (held again under a new row). They go once ended for the
retention window.

Nothing refers to a reservation's id; reservations are found by their holder (the
checkout group). The one reader of ended reservations is a late payment
(``rehold_if_available``), which holds the stock of an ``expired`` or ``released``
reservation again when the money for its group arrives after the hold ran out. Payments
are settled within hours (the provider's webhook, or reconciliation after
``SOKO_PAYMENT_RECONCILE_AFTER_MINUTES``), far inside the window; a payment later still
would find no stock to hold again, as when the stock was sold meanwhile.
"""

from __future__ import annotations

import datetime as dt
from typing import cast

import structlog
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncSession

from soko.inventory.models import Reservation, ReservationStatus
from soko.platform.retention import purge_each, purge_schedule

log = structlog.get_logger("soko.inventory.retention")

PURGE_JOB = "inventory.purge_ended_reservations"
BATCH = 1000
ENDED = (
    ReservationStatus.released,
    ReservationStatus.expired,
    ReservationStatus.fulfilled,
    ReservationStatus.renewed,
)

_RESERVATIONS = cast(Table, Reservation.__table__)


@purge_schedule("35 * * * *", PURGE_JOB, what="ended reservations")
async def purge_ended_reservations(
    session: AsyncSession, now: dt.datetime, *, keep: dt.timedelta, limit: int = BATCH
) -> tuple[int, bool]:
    """Delete up to ``limit`` reservations of each ended status that ended before
    ``now - keep``. (deleted, whether more may wait)."""
    cutoff = now - keep
    table = _RESERVATIONS
    # Read along the (status, expires_at) index; the end time decides. Held again
    # (renewed) keeps the time it first ended.
    return await purge_each(
        session,
        table,
        (
            [
                table.c.status == status.value,
                table.c.expires_at < cutoff,
                table.c.ended_at < cutoff,
            ]
            for status in ENDED
        ),
        order_by=[table.c.expires_at],
        limit=limit,
    )
