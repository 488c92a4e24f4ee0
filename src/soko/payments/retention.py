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
from typing import Any, cast

import structlog
from sqlalchemy import Table, or_
from sqlalchemy.ext.asyncio import AsyncSession

from soko.payments.payment_models import EventStatus, WebhookEvent
from soko.platform.jobs import JobContext, registry
from soko.platform.retention import continue_purge, days, purge_batch

log = structlog.get_logger("soko.payments.retention")

PURGE_JOB = "payments.purge_webhook_events"
BATCH = 1000
HANDLED = (EventStatus.processed, EventStatus.ignored, EventStatus.unmatched)

_EVENTS = cast(Table, WebhookEvent.__table__)


async def purge_handled_events(
    session: AsyncSession, now: dt.datetime, *, keep: dt.timedelta, limit: int = BATCH
) -> tuple[int, bool]:
    """Delete up to ``limit`` events of each handled status received (and handled)
    before ``now - keep``. (deleted, whether more may wait)."""
    cutoff = now - keep
    table = _EVENTS
    deleted = 0
    full = False
    for status in HANDLED:
        rows = await purge_batch(
            session,
            table,
            [
                table.c.status == status.value,
                table.c.received_at < cutoff,
                or_(table.c.processed_at.is_(None), table.c.processed_at < cutoff),
            ],
            # The (status, received_at) index.
            order_by=[table.c.received_at],
            limit=limit,
        )
        deleted += len(rows)
        full = full or len(rows) >= limit
    return deleted, full


@registry.schedule("55 * * * *", name=PURGE_JOB)
async def purge_handled_events_job(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Hourly: forget handled provider events older than the retention window."""
    deleted, full = await purge_handled_events(
        ctx.session, ctx.now(), keep=days(ctx.services.settings.payment_events_retention_days)
    )
    if deleted:
        log.info("payment webhook events purged", count=deleted)
    await continue_purge(ctx, PURGE_JOB, payload, more=full)
