"""The orders domain's scheduled jobs: unpaid checkouts expire when their stock holds
run out, and delivered orders complete once the dispute window has passed."""

from __future__ import annotations

from typing import Any

import structlog

from soko.orders import service
from soko.platform.jobs import JobContext, registry

log = structlog.get_logger("soko.orders")


@registry.schedule("* * * * *", name="orders.expire_unpaid")
async def expire_unpaid(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Every minute: checkouts not paid before their holds ran out expire, and their
    stock goes back on sale."""
    expired = await service.expire_unpaid(ctx.session, ctx.services)
    if expired:
        log.info("unpaid checkouts expired", count=expired)


@registry.schedule("17 * * * *", name="orders.complete_delivered")
async def complete_delivered(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Hourly: delivered orders past the dispute window without a dispute complete."""
    completed = await service.complete_delivered(ctx.session, ctx.services)
    if completed:
        log.info("delivered orders completed", count=completed)
