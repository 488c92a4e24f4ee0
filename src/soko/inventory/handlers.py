"""Inventory's scheduled job: holds whose time ran out give their units back.

Reads already treat an expired hold as free, and a checkout releases the expired holds
of the variants it reserves; the job keeps the counters honest for everything else, so
``reserved`` on a stock level means live holds once a minute has passed.
"""

from __future__ import annotations

from typing import Any

import structlog

from soko.inventory.reservations import release_expired_holds
from soko.platform.jobs import JobContext, registry

RELEASE_EXPIRED_HOLDS = "inventory.release_expired_holds"

log = structlog.get_logger("soko.inventory")


@registry.schedule("* * * * *", name=RELEASE_EXPIRED_HOLDS)
async def release_expired(ctx: JobContext, payload: dict[str, Any]) -> None:
    freed = await release_expired_holds(ctx.session, ctx.now())
    if freed:
        log.info("expired holds released", units=freed)
