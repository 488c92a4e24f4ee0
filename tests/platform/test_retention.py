"""The outbox purge: done and dead messages past their window go with the markers only
they carried; pending and running messages, and markers they may look up, stay."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import func, select, update

from soko.platform import retention
from soko.platform.clock import ManualClock
from soko.platform.config import Settings
from soko.platform.ids import uuid7
from soko.platform.jobs import JobContext, registry
from soko.platform.outbox import (
    MessageKind,
    MessageStatus,
    OutboxMessage,
    ProcessedMessage,
    add_message,
    enqueue,
    publish,
)
from soko.platform.retention import OUTBOX_PURGE_JOB, purge_outbox
from soko.platform.runtime import Runtime
from tests.platform.jobs_support import Outbox

DONE_FOR = dt.timedelta(days=7)
DEAD_FOR = dt.timedelta(days=30)
DAY = dt.timedelta(days=1)

# Every purge job of the build, each on its own schedule.
PURGE_JOBS = (
    OUTBOX_PURGE_JOB,
    "identity.purge_expired",
    "cart.purge_closed",
    "inventory.purge_ended_reservations",
    "notifications.purge_deliveries",
    "webhooks.purge_deliveries",
    "payments.purge_webhook_events",
)


@pytest.fixture
async def outbox(
    database_url: str, settings: Settings, clock: ManualClock
) -> AsyncIterator[Outbox]:
    box = Outbox(database_url, settings, clock)
    try:
        yield box
    finally:
        await box.close()


async def purge(outbox: Outbox, *, limit: int = 500) -> retention.OutboxPurged:
    async with outbox.transaction() as session:
        return await purge_outbox(
            session,
            outbox.clock.now(),
            done_for=DONE_FOR,
            dead_for=DEAD_FOR,
            jobs=outbox.registry,
            limit=limit,
        )


async def enqueue_job(outbox: Outbox, name: str, **kw: Any) -> uuid.UUID:
    async with outbox.transaction() as session:
        message_id = await enqueue(session, name, {}, now=outbox.clock.now(), **kw)
    assert message_id is not None
    return message_id


async def ids(outbox: Outbox) -> set[uuid.UUID]:
    return {message.id for message in await outbox.messages()}


def test_every_purge_job_runs_on_a_schedule() -> None:
    for name in PURGE_JOBS:
        assert name in registry.schedules, name
        assert name in registry.jobs, name
    crons = [registry.schedules[name].cron for name in PURGE_JOBS]
    assert len(set(crons)) == len(crons)  # spread over the hour, not all at once


async def test_done_jobs_go_with_their_markers_after_the_window(
    outbox: Outbox, clock: ManualClock
) -> None:
    name = f"tidy_{uuid.uuid4().hex[:8]}"
    failing = f"broken_{uuid.uuid4().hex[:8]}"

    @outbox.registry.job(name)
    async def tidy(ctx: JobContext, payload: dict[str, Any]) -> None:
        pass

    @outbox.registry.job(failing, max_attempts=1)
    async def broken(ctx: JobContext, payload: dict[str, Any]) -> None:
        raise RuntimeError("no")

    old = await enqueue_job(outbox, name)
    dead = await enqueue_job(outbox, failing)
    dispatcher = outbox.dispatcher()
    await dispatcher.run_until_idle()
    clock.advance(DAY * 6)
    recent = await enqueue_job(outbox, name)
    await dispatcher.run_until_idle()
    later = await enqueue_job(outbox, name, delay=DAY * 30)  # pending, created long ago
    assert {(h, m) for h, m in await outbox.markers()} == {(name, old), (name, recent)}

    clock.advance(DAY * 2)  # "old" finished 8 days ago, "recent" 2
    assert (await purge(outbox)).messages == 1
    assert await ids(outbox) == {dead, recent, later}
    assert await outbox.markers() == [(name, recent)]

    clock.advance(DAY * 25)  # "dead" finished 33 days ago, "recent" 27
    purged = await purge(outbox)
    assert (purged.messages, purged.markers) == (2, 1)
    assert await ids(outbox) == {later}
    assert await outbox.markers() == []


async def test_pending_and_running_messages_and_their_markers_stay(
    outbox: Outbox, clock: ManualClock
) -> None:
    name = f"mail_{uuid.uuid4().hex[:8]}"

    @outbox.registry.job(name)
    async def mail(ctx: JobContext, payload: dict[str, Any]) -> None:
        pass

    again = await enqueue_job(outbox, name)
    running = await enqueue_job(outbox, name)
    await outbox.dispatcher().run_until_idle()
    # One done message delivered a second time (its marker makes that a no-op), one
    # claimed by a worker that died long ago (its lease ran out).
    await outbox.redeliver(again)
    async with outbox.transaction() as session:
        await session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id == running)
            .values(status="running", locked_by="gone", locked_until=clock.now())
        )
    clock.advance(DAY * 60)

    assert (await purge(outbox)).messages == 0
    assert await ids(outbox) == {again, running}
    assert sorted(await outbox.markers()) == sorted([(name, again), (name, running)])


async def test_an_event_goes_with_its_deliveries_and_their_markers(
    outbox: Outbox, clock: ManualClock
) -> None:
    event = f"order.paid.{uuid.uuid4().hex[:8]}"
    single = f"order.shipped.{uuid.uuid4().hex[:8]}"

    @outbox.registry.on(event, name="notify_buyer")
    async def notify_buyer(ctx: JobContext, payload: dict[str, Any]) -> None:
        pass

    @outbox.registry.on(event, name="notify_seller")
    async def notify_seller(ctx: JobContext, payload: dict[str, Any]) -> None:
        pass

    @outbox.registry.on(single, name="track")
    async def track(ctx: JobContext, payload: dict[str, Any]) -> None:
        pass

    async with outbox.transaction() as session:
        fanned = await publish(session, event, {}, now=clock.now())
        in_place = await publish(session, single, {}, now=clock.now())
    await outbox.dispatcher().run_until_idle()
    assert len(await outbox.messages()) == 4  # two events, two deliveries
    assert sorted(await outbox.markers()) == sorted(
        [("notify_buyer", fanned), ("notify_seller", fanned), ("track", in_place)]
    )

    clock.advance(DONE_FOR + DAY)
    purged = await purge(outbox)
    assert (purged.messages, purged.markers) == (4, 3)
    assert await outbox.messages() == []
    assert await outbox.markers() == []


async def test_a_marker_a_pending_delivery_may_look_up_stays(
    outbox: Outbox, clock: ManualClock
) -> None:
    event = f"order.cancelled.{uuid.uuid4().hex[:8]}"
    calls = {"refund": 0}

    @outbox.registry.on(event, name="notify")
    async def notify(ctx: JobContext, payload: dict[str, Any]) -> None:
        pass

    @outbox.registry.on(event, name="refund")
    async def refund(ctx: JobContext, payload: dict[str, Any]) -> None:
        calls["refund"] += 1
        raise RuntimeError("the provider is down")

    async with outbox.transaction() as session:
        published = await publish(session, event, {}, now=clock.now())
    await outbox.dispatcher().run_until_idle()
    # The refund's delivery waits for its retry; a marker naming it (as a run that
    # committed before a duplicate delivery would leave) must outlive the event's row.
    async with outbox.transaction() as session:
        session.add(
            ProcessedMessage(
                id=uuid7(), handler="refund", message_id=published, processed_at=clock.now()
            )
        )
        await session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.handler == "refund")
            .values(available_at=clock.now() + DAY * 365)
        )
    clock.advance(DONE_FOR + DAY)

    purged = await purge(outbox)
    assert (purged.messages, purged.markers) == (2, 1)  # the event and notify's delivery
    [waiting] = await outbox.messages()
    assert (waiting.handler, waiting.status) == ("refund", MessageStatus.pending.value)
    assert await outbox.markers() == [("refund", published)]
    assert calls["refund"] == 1


async def test_the_latest_run_of_a_schedule_stays_however_old(
    outbox: Outbox, clock: ManualClock
) -> None:
    name = f"monthly_{uuid.uuid4().hex[:8]}"

    @outbox.registry.schedule("0 0 1 * *", name=name)
    async def monthly(ctx: JobContext, payload: dict[str, Any]) -> None:
        pass

    assert clock.now() == dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    await outbox.dispatcher().run_until_idle()
    [january] = await ids(outbox)
    clock.advance(DAY * 20)
    # Gone, a worker starting now would run January's due time a second time.
    assert (await purge(outbox)).messages == 0
    assert await ids(outbox) == {january}
    assert await outbox.dispatcher().run_until_idle() == 0

    clock.advance(DAY * 12)  # February's due time has come: January's may go
    assert (await purge(outbox)).messages == 1
    assert await outbox.markers() == []


async def test_a_purge_takes_a_bounded_batch(outbox: Outbox, clock: ManualClock) -> None:
    name = f"batch_{uuid.uuid4().hex[:8]}"

    @outbox.registry.job(name)
    async def job(ctx: JobContext, payload: dict[str, Any]) -> None:
        pass

    for _ in range(5):
        await enqueue_job(outbox, name)
    await outbox.dispatcher().run_until_idle()
    clock.advance(DONE_FOR + DAY)

    first = await purge(outbox, limit=3)
    assert (first.messages, first.markers, first.full) == (3, 3, True)
    second = await purge(outbox, limit=3)
    assert (second.messages, second.markers, second.full) == (2, 2, False)
    assert await outbox.messages() == []


# -- the scheduled job --------------------------------------------------------------------------


async def finished_message(runtime: Runtime, status: MessageStatus, at: dt.datetime) -> uuid.UUID:
    """A job message that finished at ``at``, with its marker when it is done."""
    name = f"retention_probe_{uuid.uuid4().hex[:8]}"
    async with runtime.db.transaction() as session:
        message_id = await add_message(
            session,
            kind=MessageKind.job,
            name=name,
            payload={},
            available_at=at,
            created_at=at,
        )
        assert message_id is not None
        await session.flush()
        await session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id == message_id)
            .values(status=status.value, attempts=1, completed_at=at)
        )
        if status is MessageStatus.done:
            session.add(
                ProcessedMessage(id=uuid7(), handler=name, message_id=message_id, processed_at=at)
            )
    return message_id


async def count_of(runtime: Runtime, *where: Any) -> int:
    async with runtime.db.sessionmaker() as session:
        return int(
            await session.scalar(select(func.count()).select_from(OutboxMessage).where(*where)) or 0
        )


async def markers_of(runtime: Runtime, message_ids: set[uuid.UUID]) -> int:
    async with runtime.db.sessionmaker() as session:
        return int(
            await session.scalar(
                select(func.count())
                .select_from(ProcessedMessage)
                .where(ProcessedMessage.message_id.in_(message_ids))
            )
            or 0
        )


async def test_the_outbox_purge_runs_from_the_dispatcher(
    runtime: Runtime, clock: ManualClock
) -> None:
    settings = runtime.settings
    assert (settings.outbox_retention_days, settings.retention_days) == (7, 30)
    start = clock.now()
    old_done = await finished_message(runtime, MessageStatus.done, start)
    old_dead = await finished_message(runtime, MessageStatus.dead, start)
    clock.advance(DAY * 10)
    fresh_done = await finished_message(runtime, MessageStatus.done, clock.now())

    await runtime.dispatcher.run_until_idle()

    assert await count_of(runtime, OutboxMessage.id == old_done) == 0
    assert await markers_of(runtime, {old_done}) == 0
    # Dead messages are kept for SOKO_RETENTION_DAYS; the fresh one is within its week.
    assert await count_of(runtime, OutboxMessage.id.in_([old_dead, fresh_done])) == 2
    assert await markers_of(runtime, {fresh_done}) == 1
    # The schedules' own messages are outbox messages too, done and kept for a week.
    assert await count_of(runtime, OutboxMessage.name == OUTBOX_PURGE_JOB) == 1

    clock.advance(DAY * 25)
    await runtime.dispatcher.run_until_idle()
    assert await count_of(runtime, OutboxMessage.id.in_([old_dead, fresh_done])) == 0
    assert await markers_of(runtime, {fresh_done}) == 0


async def test_a_full_batch_asks_for_another_run_at_once(
    runtime: Runtime, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "OUTBOX_BATCH", 2)
    made = {await finished_message(runtime, MessageStatus.done, clock.now()) for _ in range(5)}
    clock.advance(DAY * 8)

    await runtime.dispatcher.run_until_idle()

    assert await count_of(runtime, OutboxMessage.id.in_(made)) == 0
    assert await markers_of(runtime, made) == 0
    # The scheduled run and its follow-ups, one transaction each: 2 + 2 + 1.
    assert await count_of(runtime, OutboxMessage.name == OUTBOX_PURGE_JOB) == 3
