"""The webhook-delivery purge: finished deliveries go with their attempts after the
window; pending ones, and finished ones sent again, stay."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import func, select, update

from soko.platform.clock import ManualClock
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime
from soko.webhooks.models import (
    AttemptTrigger,
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from soko.webhooks.retention import purge_finished_deliveries

DAY = dt.timedelta(days=1)
KEEP = dt.timedelta(days=30)


async def add_endpoint(runtime: Runtime) -> uuid.UUID:
    now = runtime.clock.now()
    endpoint_id = uuid7()
    async with runtime.db.transaction() as session:
        session.add(
            WebhookEndpoint(
                id=endpoint_id,
                url="https://erp.example.com/hooks",
                event_types=["order.paid"],
                secret_ciphertext="not-a-real-secret",
                created_by=uuid.uuid4(),
                created_at=now,
                updated_at=now,
            )
        )
    return endpoint_id


async def add_delivery(
    runtime: Runtime, endpoint_id: uuid.UUID, status: DeliveryStatus, *, attempts: int = 2
) -> uuid.UUID:
    now = runtime.clock.now()
    delivery_id = uuid7()
    event_id = uuid7()
    async with runtime.db.transaction() as session:
        session.add(
            WebhookDelivery(
                id=delivery_id,
                endpoint_id=endpoint_id,
                event_id=event_id,
                event_type="order.paid",
                event_created_at=now,
                data={"order_id": str(uuid.uuid4())},
                status=status.value,
                attempts=attempts,
                next_attempt_at=now,
                created_at=now,
                completed_at=None if status is DeliveryStatus.pending else now,
            )
        )
        await session.flush()
        session.add_all(
            WebhookAttempt(
                id=uuid7(),
                delivery_id=delivery_id,
                endpoint_id=endpoint_id,
                event_id=event_id,
                event_type="order.paid",
                attempt=number + 1,
                cause=AttemptTrigger.scheduled.value,
                status_code=500,
                succeeded=False,
                duration_ms=12,
                at=now,
            )
            for number in range(attempts)
        )
    return delivery_id


async def count(runtime: Runtime, model: Any, *where: Any) -> int:
    async with runtime.db.sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def left(runtime: Runtime) -> set[uuid.UUID]:
    async with runtime.db.sessionmaker() as session:
        return set((await session.scalars(select(WebhookDelivery.id))).all())


async def test_finished_deliveries_go_with_their_attempts_after_the_window(
    runtime: Runtime, clock: ManualClock
) -> None:
    endpoint = await add_endpoint(runtime)
    succeeded = await add_delivery(runtime, endpoint, DeliveryStatus.succeeded, attempts=1)
    failed = await add_delivery(runtime, endpoint, DeliveryStatus.failed, attempts=10)
    pending = await add_delivery(runtime, endpoint, DeliveryStatus.pending)
    again = await add_delivery(runtime, endpoint, DeliveryStatus.failed)
    clock.advance(KEEP - DAY)
    recent = await add_delivery(runtime, endpoint, DeliveryStatus.succeeded)
    # An operator sends an old failed one again: pending anew, with its log.
    async with runtime.db.transaction() as session:
        await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == again)
            .values(status=DeliveryStatus.pending.value, completed_at=None)
        )
    clock.advance(2 * DAY)

    async with runtime.db.transaction() as session:
        assert await purge_finished_deliveries(session, clock.now(), keep=KEEP) == (2, 11, False)
    assert await left(runtime) == {pending, again, recent}
    assert (
        await count(runtime, WebhookAttempt, WebhookAttempt.delivery_id.in_([succeeded, failed]))
        == 0
    )
    assert await count(runtime, WebhookAttempt) == 6
    assert await count(runtime, WebhookEndpoint) == 1


async def test_a_purge_takes_a_bounded_batch(runtime: Runtime, clock: ManualClock) -> None:
    endpoint = await add_endpoint(runtime)
    for _ in range(3):
        await add_delivery(runtime, endpoint, DeliveryStatus.succeeded, attempts=1)
    clock.advance(KEEP + DAY)
    async with runtime.db.transaction() as session:
        assert await purge_finished_deliveries(session, clock.now(), keep=KEEP, limit=2) == (
            2,
            2,
            True,
        )
    async with runtime.db.transaction() as session:
        assert await purge_finished_deliveries(session, clock.now(), keep=KEEP, limit=2) == (
            1,
            1,
            False,
        )


async def test_the_delivery_purge_runs_from_the_dispatcher(
    runtime: Runtime, clock: ManualClock
) -> None:
    assert runtime.settings.retention_days == 30
    endpoint = await add_endpoint(runtime)
    old = await add_delivery(runtime, endpoint, DeliveryStatus.failed)
    clock.advance(KEEP - DAY)
    recent = await add_delivery(runtime, endpoint, DeliveryStatus.succeeded)
    clock.advance(2 * DAY)

    await runtime.dispatcher.run_until_idle()

    assert await left(runtime) == {recent}
    assert await count(runtime, WebhookAttempt, WebhookAttempt.delivery_id == old) == 0
