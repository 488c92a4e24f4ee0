"""What the webhooks domain does on other domains' events: turn each into deliveries for
the endpoints that may see it, then send them (the ``webhooks.deliver`` job)."""

from __future__ import annotations

from typing import Any

from soko.platform.jobs import JobContext, registry
from soko.webhooks.delivery import deliver_next
from soko.webhooks.event_types import EVENT_TYPES
from soko.webhooks.service import DELIVER_JOB, FAN_OUT_SUBSCRIBER, any_endpoint_enabled, fan_out


async def fan_out_event(ctx: JobContext, payload: dict[str, Any]) -> None:
    """One delivery row per (event, endpoint), in this handler's transaction."""
    if ctx.event_id is None:  # only published events reach this subscriber
        return
    event_type = ctx.name.rsplit(":", 1)[0]
    await fan_out(
        ctx.session, event_id=ctx.event_id, event_type=event_type, payload=payload, now=ctx.now()
    )


# With no endpoint enabled (many marketplaces never add one), an event gets no fan-out
# delivery at all: one statement in the event's own fan-out instead of a job.
for _event_type in EVENT_TYPES:
    registry.on(_event_type, name=FAN_OUT_SUBSCRIBER, wanted=any_endpoint_enabled)(fan_out_event)

registry.job(DELIVER_JOB)(deliver_next)
