"""The delivery-record purge: records unchanged for the retention window go, whatever
their status; recent ones, and old ones a report changed lately, stay."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import select

from soko.notifications.models import Delivery, DeliveryStatus
from soko.notifications.retention import purge_deliveries
from soko.platform.clock import ManualClock
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime

DAY = dt.timedelta(days=1)
KEEP = dt.timedelta(days=30)


async def add_delivery(
    runtime: Runtime, status: DeliveryStatus, *, created: dt.datetime | None = None
) -> uuid.UUID:
    now = runtime.clock.now()
    delivery_id = uuid7()
    async with runtime.db.transaction() as session:
        session.add(
            Delivery(
                id=delivery_id,
                kind="sms",
                category="order",
                channel="sms",
                provider="file",
                status=status.value,
                provider_message_id=f"msg-{delivery_id.hex[:12]}",
                recipient_index="index-" + uuid.uuid4().hex,
                user_id=uuid.uuid4(),
                attempts=1,
                created_at=created or now,
                updated_at=now,
            )
        )
    return delivery_id


async def left(runtime: Runtime) -> set[uuid.UUID]:
    async with runtime.db.sessionmaker() as session:
        return set((await session.scalars(select(Delivery.id))).all())


async def test_records_unchanged_for_the_window_go(runtime: Runtime, clock: ManualClock) -> None:
    start = clock.now()
    old = {await add_delivery(runtime, status) for status in DeliveryStatus}
    clock.advance(KEEP - DAY)
    recent = await add_delivery(runtime, DeliveryStatus.sent)
    # Sent long ago, its delivery report came in yesterday.
    reported = await add_delivery(runtime, DeliveryStatus.delivered, created=start)
    clock.advance(2 * DAY)

    async with runtime.db.transaction() as session:
        assert await purge_deliveries(session, clock.now(), keep=KEEP) == (5, False)
    assert await left(runtime) == {recent, reported}
    assert old.isdisjoint(await left(runtime))


async def test_a_purge_takes_a_bounded_batch(runtime: Runtime, clock: ManualClock) -> None:
    for _ in range(3):
        await add_delivery(runtime, DeliveryStatus.delivered)
    clock.advance(KEEP + DAY)
    async with runtime.db.transaction() as session:
        assert await purge_deliveries(session, clock.now(), keep=KEEP, limit=2) == (2, True)
    async with runtime.db.transaction() as session:
        assert await purge_deliveries(session, clock.now(), keep=KEEP, limit=2) == (1, False)


async def test_the_delivery_purge_runs_from_the_dispatcher(
    runtime: Runtime, clock: ManualClock
) -> None:
    assert runtime.settings.retention_days == 30
    old = await add_delivery(runtime, DeliveryStatus.failed)
    clock.advance(KEEP - DAY)
    recent = await add_delivery(runtime, DeliveryStatus.undeliverable)
    clock.advance(2 * DAY)

    await runtime.dispatcher.run_until_idle()

    assert await left(runtime) == {recent}
    assert old not in await left(runtime)
