"""Retention of outbound webhook deliveries and their log, for ``SOKO_RETENTION_DAYS``.

A delivery (``webhooks_deliveries``, one per event and endpoint) that has finished
(``succeeded``, or ``failed`` after its retry schedule of about three days) goes once it
finished more than the retention window ago, with its attempts (``webhooks_attempts``,
the delivery log an endpoint's owner reads). Within the window an owner or operator can
still read the log and send the event again (``redeliver``, ``redeliver-failed``); after
it, redelivery answers 404 like any unknown delivery. A pending delivery, or one sent
again meanwhile (pending anew), is never purged. Endpoints are kept until their owner
deletes them.

An event reaches an endpoint once: the delivery row is made by the event's own handler
(``webhooks.fan_out``), which has run for good long before the row goes, so purging it
never lets the event be delivered a second time.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

import structlog
from sqlalchemy import Table, delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.platform.jobs import JobContext, registry
from soko.platform.retention import continue_purge, days, delete_where_in
from soko.webhooks.models import DeliveryStatus, WebhookAttempt, WebhookDelivery

log = structlog.get_logger("soko.webhooks.retention")

PURGE_JOB = "webhooks.purge_deliveries"
BATCH = 500
FINISHED = (DeliveryStatus.succeeded.value, DeliveryStatus.failed.value)

_DELIVERIES = cast(Table, WebhookDelivery.__table__)
_ATTEMPTS = cast(Table, WebhookAttempt.__table__)


async def purge_finished_deliveries(
    session: AsyncSession, now: dt.datetime, *, keep: dt.timedelta, limit: int = BATCH
) -> tuple[int, int, bool]:
    """Delete up to ``limit`` deliveries finished before ``now - keep``, after their
    attempts. (deliveries, attempts, whether more may wait)."""
    cutoff = now - keep
    table = _DELIVERIES
    conditions = [table.c.status.in_(FINISHED), table.c.completed_at < cutoff]
    # Oldest first along the index of finishing times; the picked rows are locked on
    # PostgreSQL, so a redelivery waits and then finds them gone (404), or ran first and
    # they are not picked. SQLite has one writer: nothing changes meanwhile.
    picked = list(
        (
            await session.scalars(
                select(table.c.id)
                .where(*conditions)
                .order_by(table.c.completed_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        ).all()
    )
    if not picked:
        return 0, 0, False
    attempts = await delete_where_in(session, _ATTEMPTS.c.delivery_id, picked)
    deleted = await session.execute(
        delete(table).where(table.c.id.in_(picked), *conditions).returning(table.c.id)
    )
    return len(deleted.all()), attempts, len(picked) >= limit


@registry.schedule("50 * * * *", name=PURGE_JOB)
async def purge_finished_deliveries_job(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Hourly: forget deliveries finished longer than ``SOKO_RETENTION_DAYS`` ago."""
    deliveries, attempts, full = await purge_finished_deliveries(
        ctx.session, ctx.now(), keep=days(ctx.services.settings.retention_days)
    )
    if deliveries:
        log.info("webhook deliveries purged", deliveries=deliveries, attempts=attempts)
    await continue_purge(ctx, PURGE_JOB, payload, more=full)
