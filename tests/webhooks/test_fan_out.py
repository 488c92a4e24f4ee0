"""An event is fanned out to webhooks only while some endpoint is enabled: a marketplace
without endpoints pays no job per event, and one added later gets the events published
after it."""

from __future__ import annotations

import uuid

import httpx2
import pytest
from sqlalchemy import select

from soko.platform.outbox import OutboxMessage
from soko.platform.runtime import Runtime
from soko.webhooks.service import FAN_OUT_SUBSCRIBER
from tests.cart.catalog_support import Market
from tests.webhooks.conftest import (
    Hooks,
    deliveries,
    ok,
    order_payload,
    publish_event,
    run_jobs,
)
from tests.webhooks.receiver import Receiver


async def fan_outs(runtime: Runtime, event_id: uuid.UUID) -> list[str]:
    """The statuses of the webhooks fan-out deliveries of ``event_id``."""
    async with runtime.db.transaction(read_only=True) as session:
        rows = await session.scalars(
            select(OutboxMessage.status).where(
                OutboxMessage.event_id == event_id, OutboxMessage.handler == FAN_OUT_SUBSCRIBER
            )
        )
        return list(rows.all())


@pytest.mark.parametrize("allow_private_addresses", [True])  # the receiver is local
async def test_events_are_fanned_out_only_while_an_endpoint_is_enabled(
    client: httpx2.AsyncClient, runtime: Runtime, market: Market, receiver: Receiver
) -> None:
    shop = await market.open_shop()
    hooks = Hooks(client, shop.headers)

    before = await publish_event(runtime, "order.placed", order_payload(shop.seller_id))
    await run_jobs(runtime)
    assert await fan_outs(runtime, before) == []

    endpoint = await hooks.create(receiver.url, "order.placed")
    during = await publish_event(runtime, "order.placed", order_payload(shop.seller_id))
    await run_jobs(runtime)
    assert await fan_outs(runtime, during) == ["done"]
    assert [row.event_id for row in await deliveries(runtime, endpoint["id"])] == [during]

    ok(await hooks.patch(f"/{endpoint['id']}", {"enabled": False}))
    after = await publish_event(runtime, "order.placed", order_payload(shop.seller_id))
    await run_jobs(runtime)
    assert await fan_outs(runtime, after) == []
    assert [row.event_id for row in await deliveries(runtime, endpoint["id"])] == [during]
