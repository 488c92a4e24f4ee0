"""Retention of payment providers' webhook events, for
``SOKO_PAYMENT_EVENTS_RETENTION_DAYS`` (90 days by default).

Every verified inbound webhook is stored (``payments_webhook_events``, unique on the
provider and its event id): the row de-duplicates the provider's retries, which go on
for a few days at most (three for Stripe and Paystack), and shows an administrator what
the provider reported about a payment. A handled event (``processed``, ``ignored``, or
``unmatched`` after an administrator had the window to look at it) goes once received
longer than the window ago; one still ``received`` (its processing job not done) is
never purged.

Kept on purpose, as records: payments, refunds, payouts and the ledger.
"""

from __future__ import annotations

import datetime as dt
from typing import cast

import structlog
from sqlalchemy import Table, or_
from sqlalchemy.ext.asyncio import AsyncSession

from soko.payments.payment_models import EventStatus, WebhookEvent
from soko.platform.retention import purge_each, purge_schedule

log = structlog.get_logger("soko.payments.retention")

PURGE_JOB = "payments.purge_webhook_events"
BATCH = 1000
HANDLED = (EventStatus.processed, EventStatus.ignored, EventStatus.unmatched)

_EVENTS = cast(Table, WebhookEvent.__table__)


@purge_schedule(
    "55 * * * *",
    PURGE_JOB,
    what="payment webhook events",
    keep_days="payment_events_retention_days",
)
async def purge_handled_events(
    session: AsyncSession, now: dt.datetime, *, keep: dt.timedelta, limit: int = BATCH
) -> tuple[int, bool]:
    """Delete up to ``limit`` events of each handled status received (and handled)
    before ``now - keep``. (deleted, whether more may wait)."""
    cutoff = now - keep
    table = _EVENTS
    return await purge_each(
        session,
        table,
        (
            [
                table.c.status == status.value,
                table.c.received_at < cutoff,
                or_(table.c.processed_at.is_(None), table.c.processed_at < cutoff),
            ]
            for status in HANDLED
        ),
        # The (status, received_at) index.
        order_by=[table.c.received_at],
        limit=limit,
    )
