"""Two workers on one database: each event reaches each endpoint once, in the order of
publication, and never with two requests to one endpoint at the same time (on PostgreSQL
the endpoint's row lock is what serializes them)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import Awaitable, Callable

import pytest
from sqlalchemy import func, select, update

from soko.platform.jobs import Dispatcher
from soko.platform.outbox import OutboxMessage
from soko.platform.runtime import Runtime
from soko.webhooks.models import WebhookDelivery
from soko.webhooks.service import DELIVER_JOB, fan_out
from tests.cart.catalog_support import Shop
from tests.webhooks.conftest import Hooks, deliveries, order_payload, publish_event, run_jobs
from tests.webhooks.receiver import running_receiver

EVENTS_PER_STORE = 8


@pytest.mark.parametrize("allow_private_addresses", [True])
async def test_two_workers_keep_each_endpoints_order_and_send_once(
    runtime: Runtime, shop_hooks: Callable[[], Awaitable[tuple[Shop, Hooks]]]
) -> None:
    stores = [await shop_hooks() for _ in range(2)]
    with running_receiver(delay=0.02) as receiver:
        endpoints = []
        for index, (_, hooks) in enumerate(stores):
            url = f"http://127.0.0.1:{receiver.port}/store-{index}"
            endpoints.append(await hooks.create(url, "order.shipped"))
        published: dict[str, list[str]] = {f"/store-{i}": [] for i in range(2)}
        for number in range(EVENTS_PER_STORE):
            for index, (shop, _) in enumerate(stores):
                event_id = await publish_event(
                    runtime, "order.shipped", order_payload(shop.seller_id, number=f"{number}")
                )
                published[f"/store-{index}"].append(f"evt_{event_id.hex}")

        workers = [
            Dispatcher(
                db=runtime.db,
                settings=runtime.settings,
                clock=runtime.clock,
                registry=runtime.registry,
                services=runtime,
                worker_id=f"worker-{n}",
            )
            for n in range(2)
        ]
        for _ in range(20):
            await asyncio.gather(*(worker.run_until_idle() for worker in workers))
            states = [{d.status for d in await deliveries(runtime, e["id"])} for e in endpoints]
            if states == [{"succeeded"}, {"succeeded"}]:
                break
            # A queue's head may wait a moment for an earlier event's fan-out.
            runtime.clock.advance(dt.timedelta(seconds=1))  # type: ignore[attr-defined]

        received: dict[str, list[str]] = {path: [] for path in published}
        for request in receiver.requests:
            received[request.path].append(request.headers["webhook-id"])
            assert json.loads(request.body)["type"] == "order.shipped"
        assert received == published
        assert receiver.most_in_flight == {path: 1 for path in published}


async def test_fanning_out_one_event_twice_writes_one_delivery(
    runtime: Runtime, shop_hooks: Callable[[], Awaitable[tuple[Shop, Hooks]]]
) -> None:
    shop, hooks = await shop_hooks()
    endpoint = await hooks.create("https://hooks.example.com/in", "order.shipped")
    event_id = await publish_event(runtime, "order.shipped", order_payload(shop.seller_id))
    payload = order_payload(shop.seller_id)
    written = []
    for _ in range(2):
        async with runtime.db.transaction() as session:
            written.append(
                await fan_out(
                    session,
                    event_id=event_id,
                    event_type="order.shipped",
                    payload=payload,
                    now=runtime.clock.now(),
                )
            )

    # Two transactions at once, as two workers handling a redelivered event would.
    async def once() -> int:
        async with runtime.db.transaction() as session:
            return await fan_out(
                session,
                event_id=event_id,
                event_type="order.shipped",
                payload=payload,
                now=runtime.clock.now(),
            )

    written.extend(await asyncio.gather(once(), once()))
    assert written == [1, 0, 0, 0]
    async with runtime.db.transaction(read_only=True) as session:
        count = await session.scalar(
            select(func.count())
            .select_from(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == uuid.UUID(endpoint["id"]))
        )
    assert count == 1


@pytest.mark.parametrize("allow_private_addresses", [True])
async def test_a_later_event_waits_for_an_earlier_events_fan_out(
    runtime: Runtime, shop_hooks: Callable[[], Awaitable[tuple[Shop, Hooks]]]
) -> None:
    """The earlier event's fan-out is held back (as a retry would hold it): the later
    event is not sent before it, and waits with one follow-up job, not a busy loop."""
    shop, hooks = await shop_hooks()
    clock = runtime.clock
    with running_receiver() as receiver:
        await hooks.create(receiver.url, "order.shipped")
        earlier = await publish_event(runtime, "order.shipped", order_payload(shop.seller_id))
        later = await publish_event(runtime, "order.shipped", order_payload(shop.seller_id))
        retry_at = clock.now() + dt.timedelta(minutes=10)
        async with runtime.db.transaction() as session:
            await session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.id == earlier)
                .values(available_at=retry_at)
            )
        await run_jobs(runtime)
        assert receiver.requests == []
        async with runtime.db.transaction(read_only=True) as session:
            waiting = (
                await session.scalars(
                    select(OutboxMessage.available_at).where(
                        OutboxMessage.name == DELIVER_JOB,
                        OutboxMessage.status == "pending",
                    )
                )
            ).all()
        assert waiting == [retry_at]
        clock.advance(dt.timedelta(minutes=10))  # type: ignore[attr-defined]
        await run_jobs(runtime)
        assert [r.headers["webhook-id"] for r in receiver.requests] == [
            f"evt_{earlier.hex}",
            f"evt_{later.hex}",
        ]
