"""The provider-event purge: handled events go after the (longer) payment-events window;
an event still waiting for its processing job never does."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import select

from soko.payments.payment_models import EventStatus, WebhookEvent
from soko.payments.retention import purge_handled_events
from soko.platform.clock import ManualClock
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime

DAY = dt.timedelta(days=1)
KEEP = dt.timedelta(days=90)


async def add_event(
    runtime: Runtime, status: EventStatus, *, processed: dt.datetime | None = None
) -> uuid.UUID:
    now = runtime.clock.now()
    row_id = uuid7()
    async with runtime.db.transaction() as session:
        session.add(
            WebhookEvent(
                id=row_id,
                provider="sandbox",
                event_id=f"evt_{uuid.uuid4().hex}",
                event_type="payment.succeeded",
                raw_body=b"{}",
                headers={},
                status=status.value,
                received_at=now,
                processed_at=processed,
            )
        )
    return row_id


async def left(runtime: Runtime) -> set[uuid.UUID]:
    async with runtime.db.sessionmaker() as session:
        return set((await session.scalars(select(WebhookEvent.id))).all())


async def test_handled_events_go_after_the_window(runtime: Runtime, clock: ManualClock) -> None:
    now = clock.now()
    processed = await add_event(runtime, EventStatus.processed, processed=now)
    ignored = await add_event(runtime, EventStatus.ignored, processed=now)
    unmatched = await add_event(runtime, EventStatus.unmatched)
    waiting = await add_event(runtime, EventStatus.received)  # its job has not run
    late = await add_event(runtime, EventStatus.processed, processed=now + KEEP - DAY)
    clock.advance(KEEP - DAY)
    recent = await add_event(runtime, EventStatus.processed, processed=clock.now())
    clock.advance(2 * DAY)

    async with runtime.db.transaction() as session:
        assert await purge_handled_events(session, clock.now(), keep=KEEP) == (3, False)
    assert await left(runtime) == {waiting, late, recent}
    assert {processed, ignored, unmatched}.isdisjoint(await left(runtime))


async def test_a_purge_takes_a_bounded_batch(runtime: Runtime, clock: ManualClock) -> None:
    for _ in range(3):
        await add_event(runtime, EventStatus.ignored, processed=clock.now())
    clock.advance(KEEP + DAY)
    async with runtime.db.transaction() as session:
        assert await purge_handled_events(session, clock.now(), keep=KEEP, limit=2) == (2, True)
    async with runtime.db.transaction() as session:
        assert await purge_handled_events(session, clock.now(), keep=KEEP, limit=2) == (1, False)


async def test_the_event_purge_runs_from_the_dispatcher(
    runtime: Runtime, clock: ManualClock
) -> None:
    assert runtime.settings.payment_events_retention_days == 90
    old = await add_event(runtime, EventStatus.processed, processed=clock.now())
    clock.advance(dt.timedelta(days=31))
    # Past SOKO_RETENTION_DAYS, within the payment-events window: a provider retry of
    # it is still recognised.
    younger = await add_event(runtime, EventStatus.processed, processed=clock.now())
    clock.advance(KEEP - dt.timedelta(days=30))

    await runtime.dispatcher.run_until_idle()

    assert await left(runtime) == {younger}
    assert old not in await left(runtime)
