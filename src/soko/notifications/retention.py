"""Retention of delivery records: what happened to each email and SMS, for
``SOKO_RETENTION_DAYS``.

A record (``notifications_deliveries``) holds the recipient's blind index and the
provider's message id, so that delivery reports find it and a bounce suppresses the
address. Reports come within hours, a few days at most (an SMS to a phone that stays
off), so a record unchanged for the retention window has nothing left to learn: it goes
whatever its status, a ``queued`` one included (its job ended long ago: jobs retry for
hours, and a dead job's outbox row is itself kept no longer).

Kept on purpose: suppressions (``notifications_suppressions``), so a bounced address
stays suppressed, and each user's inbox, preferences and locale, which are theirs.
"""

from __future__ import annotations

import datetime as dt
from typing import cast

import structlog
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncSession

from soko.notifications.models import Delivery, DeliveryStatus
from soko.platform.retention import purge_each, purge_schedule

log = structlog.get_logger("soko.notifications.retention")

PURGE_JOB = "notifications.purge_deliveries"
BATCH = 1000

_DELIVERIES = cast(Table, Delivery.__table__)


@purge_schedule("45 * * * *", PURGE_JOB, what="delivery records")
async def purge_deliveries(
    session: AsyncSession, now: dt.datetime, *, keep: dt.timedelta, limit: int = BATCH
) -> tuple[int, bool]:
    """Delete up to ``limit`` records of each status created and last changed before
    ``now - keep``. (deleted, whether more may wait)."""
    cutoff = now - keep
    table = _DELIVERIES
    return await purge_each(
        session,
        table,
        (
            [
                table.c.status == status.value,
                table.c.created_at < cutoff,
                table.c.updated_at < cutoff,
            ]
            for status in DeliveryStatus
        ),
        # The (status, created_at) index.
        order_by=[table.c.created_at],
        limit=limit,
    )
