"""Retention of store invitations: an invitation that ended (accepted, declined,
revoked, or expired while pending) goes ``SOKO_RETENTION_DAYS`` after it ended, with the
encrypted address of someone who may never have had an account. A store's members and
its status history are kept; an open invitation stays until it ends."""

from __future__ import annotations

import datetime as dt
from typing import cast

import structlog
from sqlalchemy import Table, or_
from sqlalchemy.ext.asyncio import AsyncSession

from soko.platform.retention import purge_batch, purge_schedule
from soko.sellers.models import InvitationStatus, SellerInvitation

log = structlog.get_logger("soko.sellers.retention")

PURGE_JOB = "sellers.purge_invitations"
BATCH = 1000

_INVITATIONS = cast(Table, SellerInvitation.__table__)


@purge_schedule("40 * * * *", PURGE_JOB, what="ended store invitations")
async def purge_invitations(
    session: AsyncSession, now: dt.datetime, *, keep: dt.timedelta, limit: int = BATCH
) -> tuple[int, bool]:
    """Delete up to ``limit`` invitations that ended before ``now - keep`` (decided
    then, or pending and expired then); (deleted, whether more may wait)."""
    cutoff = now - keep
    table = _INVITATIONS
    rows = await purge_batch(
        session,
        table,
        [
            # Every invitation expires seven days after it was sent, so one that ended
            # before the cutoff was sent before it too: the created_at range reads an index.
            table.c.created_at < cutoff,
            or_(
                table.c.decided_at < cutoff,
                (table.c.status == InvitationStatus.pending.value) & (table.c.expires_at < cutoff),
            ),
        ],
        order_by=[table.c.created_at],
        limit=limit,
    )
    return len(rows), len(rows) >= limit
