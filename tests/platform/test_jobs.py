"""The dispatcher: jobs, event fan-out, retries, schedules, leases and shutdown."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from soko.platform.clock import ManualClock
from soko.platform.config import Settings
from soko.platform.db import create_engine
from soko.platform.jobs import JobContext, JobRegistry, Schedule
from soko.platform.outbox import OutboxMessage, enqueue, publish
from tests.conftest import make_settings
from tests.platform.jobs_support import Outbox

# Generous bound for waits on another task; tests never assert how long anything took.
WAIT = 30


@pytest.fixture
async def outbox(
    database_url: str, settings: Settings, clock: ManualClock
) -> AsyncIterator[Outbox]:
    box = Outbox(database_url, settings, clock)
    try:
        yield box
    finally:
        await box.close()


async def _enqueue(outbox: Outbox, name: str, payload: dict[str, Any], **kw: Any) -> uuid.UUID:
    async with outbox.transaction() as session:
        message_id = await enqueue(session, name, payload, now=outbox.clock.now(), **kw)
    assert message_id is not None
    return message_id


async def _publish(outbox: Outbox, event: str, payload: dict[str, Any]) -> uuid.UUID:
    async with outbox.transaction() as session:
        return await publish(session, event, payload, now=outbox.clock.now())


def _metric(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def _unique(prefix: str) -> str:
    # Metrics are process-wide: a name of its own keeps each test's counts apart.
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def test_a_job_runs_once_with_its_context(outbox: Outbox, clock: ManualClock) -> None:
    name = _unique("send_receipt")
    seen: list[JobContext] = []
    services = object()

    @outbox.registry.job(name)
    async def send_receipt(ctx: JobContext, payload: dict[str, Any]) -> None:
        assert payload == {"order_id": "o-1"}
        seen.append(ctx)

    message_id = await _enqueue(outbox, name, {"order_id": "o-1"})
    dispatcher = outbox.dispatcher(services=services)
    assert await dispatcher.run_until_idle() == 1
    assert await dispatcher.run_until_idle() == 0

    [ctx] = seen
    assert (ctx.message_id, ctx.attempt, ctx.name, ctx.event_id) == (message_id, 1, name, None)
    assert ctx.services is services and ctx.clock is clock and ctx.now() == clock.now()
    row = await outbox.message(message_id)
    assert (row.status, row.attempts, row.completed_at) == ("done", 1, clock.now())
    assert row.locked_by is None and row.locked_until is None
    assert await outbox.markers() == [(name, message_id)]
    assert _metric("soko_jobs_total", name=name, outcome="done") == 1
    assert _metric("soko_job_duration_seconds_count", name=name) == 1


async def test_handler_writes_commit_with_the_job_and_follow_ups_run(outbox: Outbox) -> None:
    ran: list[str] = []

    @outbox.registry.job("capture_payment")
    async def capture_payment(ctx: JobContext, payload: dict[str, Any]) -> None:
        ran.append("capture")
        await enqueue(ctx.session, "send_receipt", {"payment_id": payload["payment_id"]})

    @outbox.registry.job("send_receipt")
    async def send_receipt(ctx: JobContext, payload: dict[str, Any]) -> None:
        ran.append(f"receipt {payload['payment_id']}")

    await _enqueue(outbox, "capture_payment", {"payment_id": "p-1"})
    assert await outbox.dispatcher().run_until_idle() == 2
    assert ran == ["capture", "receipt p-1"]
    follow_up = [row for row in await outbox.messages() if row.name == "send_receipt"]
    # The follow-up took the dispatcher's clock through the handler's session.
    assert follow_up[0].created_at == outbox.clock.now()


async def test_an_event_fans_out_to_each_subscriber_retried_on_its_own(
    outbox: Outbox, clock: ManualClock
) -> None:
    calls: Counter[str] = Counter()
    event_ids: set[uuid.UUID | None] = set()

    @outbox.registry.on("order.paid", name="notify_buyer")
    async def notify_buyer(ctx: JobContext, payload: dict[str, Any]) -> None:
        calls["notify_buyer"] += 1
        event_ids.add(ctx.event_id)

    @outbox.registry.on("order.paid", name="notify_seller")
    async def notify_seller(ctx: JobContext, payload: dict[str, Any]) -> None:
        calls["notify_seller"] += 1
        event_ids.add(ctx.event_id)
        if calls["notify_seller"] == 1:
            raise ConnectionError("SMS gateway down")

    @outbox.registry.on("order.paid")
    async def award_points(ctx: JobContext, payload: dict[str, Any]) -> None:
        calls["award_points"] += 1
        assert payload == {"order_id": "o-7"}

    @outbox.registry.on("order.cancelled")
    async def restock(ctx: JobContext, payload: dict[str, Any]) -> None:
        calls["restock"] += 1

    event_id = await _publish(outbox, "order.paid", {"order_id": "o-7"})
    dispatcher = outbox.dispatcher()
    await dispatcher.run_until_idle()

    assert calls == {"notify_buyer": 1, "notify_seller": 1, "award_points": 1}
    assert event_ids == {event_id}
    rows = {row.handler: row for row in await outbox.messages()}
    assert rows[None].status == "done"  # the published event itself
    assert rows["notify_buyer"].status == "done"
    assert rows["award_points"].status == "done"
    seller = rows["notify_seller"]
    assert (seller.status, seller.attempts, seller.event_id) == ("pending", 1, event_id)
    assert seller.last_error == "ConnectionError: SMS gateway down"

    clock.advance(dt.timedelta(seconds=settings_backoff_ceiling(outbox.settings, 1)))
    await dispatcher.run_until_idle()
    assert calls == {"notify_buyer": 1, "notify_seller": 2, "award_points": 1}
    seller = await outbox.message(seller.id)
    assert (seller.status, seller.attempts) == ("done", 2)
    assert sorted(await outbox.markers()) == sorted(
        [("award_points", event_id), ("notify_buyer", event_id), ("notify_seller", event_id)]
    )


async def test_an_event_without_subscribers_is_simply_done(outbox: Outbox) -> None:
    event_id = await _publish(outbox, "review.posted", {"review_id": "r-1"})
    assert await outbox.dispatcher().run_until_idle() == 1
    [row] = await outbox.messages()
    assert (row.id, row.status) == (event_id, "done")


async def test_a_subscriber_that_does_not_want_the_event_gets_no_delivery(
    outbox: Outbox,
) -> None:
    calls: Counter[str] = Counter()
    asked: list[str] = []
    wants = {"order.shipped": True, "order.delivered": False}

    async def wanted(connection: AsyncConnection, event: str) -> bool:
        asked.append(event)
        # Asked inside the fan-out's transaction: its connection reads the database.
        assert await connection.scalar(text("SELECT 1")) == 1
        return wants[event]

    for event in wants:

        @outbox.registry.on(event, name="mirror", wanted=wanted)
        async def mirror(ctx: JobContext, payload: dict[str, Any]) -> None:
            calls[ctx.name] += 1

        @outbox.registry.on(event, name="audit_trail")
        async def audit_trail(ctx: JobContext, payload: dict[str, Any]) -> None:
            calls[ctx.name] += 1

    shipped = await _publish(outbox, "order.shipped", {"order_id": "o-1"})
    delivered = await _publish(outbox, "order.delivered", {"order_id": "o-1"})
    await outbox.dispatcher().run_until_idle()

    assert sorted(asked) == ["order.delivered", "order.shipped"]
    assert calls == {
        "order.shipped:mirror": 1,
        "order.shipped:audit_trail": 1,
        "order.delivered:audit_trail": 1,
    }
    deliveries = {(row.event_id, row.handler) for row in await outbox.messages() if row.handler}
    # order.delivered had one subscriber left: it ran in the event's own message.
    assert deliveries == {(shipped, "mirror"), (shipped, "audit_trail")}
    assert ("audit_trail", delivered) in await outbox.markers()
    assert {row.status for row in await outbox.messages()} == {"done"}


async def test_an_event_only_one_subscriber_wants_runs_in_its_own_message(
    outbox: Outbox,
) -> None:
    seen: list[JobContext] = []

    async def never(connection: AsyncConnection, event: str) -> bool:
        return False

    @outbox.registry.on("order.paid", name="notify_buyer")
    async def notify_buyer(ctx: JobContext, payload: dict[str, Any]) -> None:
        assert payload == {"order_id": "o-9"}
        seen.append(ctx)

    @outbox.registry.on("order.paid", name="mirror", wanted=never)
    async def mirror(ctx: JobContext, payload: dict[str, Any]) -> None:
        raise AssertionError("not wanted")

    done_before = _metric("soko_jobs_total", name="order.paid:notify_buyer", outcome="done")
    event_id = await _publish(outbox, "order.paid", {"order_id": "o-9"})
    assert await outbox.dispatcher().run_until_idle() == 1  # one message claimed, no more

    [ctx] = seen
    assert (ctx.message_id, ctx.event_id, ctx.name, ctx.attempt) == (
        event_id,
        event_id,
        "order.paid:notify_buyer",
        1,
    )
    [row] = await outbox.messages()
    assert (row.id, row.handler, row.status, row.attempts) == (event_id, None, "done", 1)
    # The marker a delivery would have left: a delivery of this event to this subscriber,
    # should one ever be written, would complete without a second run.
    assert await outbox.markers() == [("notify_buyer", event_id)]
    after = _metric("soko_jobs_total", name="order.paid:notify_buyer", outcome="done")
    assert after == done_before + 1


async def test_a_subscriber_run_in_place_fails_under_its_own_limit_and_is_asked_again(
    outbox: Outbox, clock: ManualClock
) -> None:
    event = _unique("stock.counted")
    calls: Counter[str] = Counter()
    mirror_wanted, failing = False, True

    async def wanted(connection: AsyncConnection, name: str) -> bool:
        return mirror_wanted

    @outbox.registry.on(event, name="recount", max_attempts=2)
    async def recount(ctx: JobContext, payload: dict[str, Any]) -> None:
        calls["recount"] += 1
        if failing:
            raise ConnectionError("scale offline")

    @outbox.registry.on(event, name="mirror", wanted=wanted)
    async def mirror(ctx: JobContext, payload: dict[str, Any]) -> None:
        calls["mirror"] += 1

    first = await _publish(outbox, event, {"sku": "s-1"})
    dispatcher = outbox.dispatcher()
    await dispatcher.run_until_idle()
    row = await outbox.message(first)
    assert (row.status, row.attempts, row.last_error) == (
        "pending",
        1,
        "ConnectionError: scale offline",
    )
    clock.advance(dt.timedelta(seconds=settings_backoff_ceiling(outbox.settings, 1)))
    await dispatcher.run_until_idle()
    # The subscriber's limit (2), not the outbox's default, decides when to give up.
    row = await outbox.message(first)
    assert (row.status, row.attempts) == ("dead", 2)
    assert _metric("soko_jobs_total", name=f"{event}:recount", outcome="dead") == 1
    assert calls == {"recount": 2}

    # A retry asks again who wants the event: now two do, and each gets a delivery.
    second = await _publish(outbox, event, {"sku": "s-2"})
    await dispatcher.run_until_idle()
    assert (await outbox.message(second)).attempts == 1  # failed in place once
    mirror_wanted, failing = True, False
    clock.advance(dt.timedelta(seconds=settings_backoff_ceiling(outbox.settings, 1)))
    await dispatcher.run_until_idle()
    assert calls == {"recount": 4, "mirror": 1}
    rows = [row for row in await outbox.messages() if row.event_id == second]
    assert sorted((row.handler, row.status) for row in rows) == [
        ("mirror", "done"),
        ("recount", "done"),
    ]
    assert (await outbox.message(second)).status == "done"


async def test_a_failing_wanted_check_retries_the_fan_out(outbox: Outbox) -> None:
    failures = [ConnectionError("database went away")]

    async def wanted(connection: AsyncConnection, event: str) -> bool:
        if failures:
            raise failures.pop()
        return True

    @outbox.registry.on("order.refunded", name="mirror", wanted=wanted)
    async def mirror(ctx: JobContext, payload: dict[str, Any]) -> None:
        return None

    event_id = await _publish(outbox, "order.refunded", {"order_id": "o-2"})
    await outbox.dispatcher().run_until_idle()
    event = await outbox.message(event_id)
    assert (event.status, event.attempts) == ("pending", 1)
    assert event.last_error == "ConnectionError: database went away"
    assert [row.handler for row in await outbox.messages() if row.handler] == []


def settings_backoff_ceiling(settings: Settings, attempt: int) -> float:
    return min(
        settings.outbox_backoff_max_seconds,
        settings.outbox_backoff_base_seconds * 2 ** (attempt - 1),
    )


async def test_a_failing_job_backs_off_then_succeeds(outbox: Outbox, clock: ManualClock) -> None:
    name = _unique("sync_inventory")
    attempts: list[int] = []

    @outbox.registry.job(name)
    async def sync_inventory(ctx: JobContext, payload: dict[str, Any]) -> None:
        attempts.append(ctx.attempt)
        await ctx.session.execute(text("SELECT 1"))
        if ctx.attempt < 3:
            raise TimeoutError(f"warehouse API timed out (password=s3cret, try {ctx.attempt})")

    message_id = await _enqueue(outbox, name, {"sku": "A-1"})
    dispatcher = outbox.dispatcher()
    base = outbox.settings.outbox_backoff_base_seconds

    for attempt, ceiling in ((1, base), (2, base * 2)):
        failed_at = clock.now()
        assert await dispatcher.run_until_idle() == 1
        row = await outbox.message(message_id)
        assert (row.status, row.attempts) == ("pending", attempt)
        # Exponential backoff with jitter in the upper half of the doubling window.
        wait = (row.available_at - failed_at).total_seconds()
        assert ceiling / 2 <= wait <= ceiling
        assert row.last_error is not None and "s3cret" not in row.last_error
        assert row.last_error.startswith("TimeoutError: warehouse API timed out (password=***")
        # Not due yet: nothing runs.
        clock.advance(dt.timedelta(seconds=wait / 2))
        assert await dispatcher.run_until_idle() == 0
        clock.set(row.available_at)

    assert await dispatcher.run_until_idle() == 1
    row = await outbox.message(message_id)
    assert (row.status, row.attempts, row.last_error) == ("done", 3, None)
    assert attempts == [1, 2, 3]
    assert _metric("soko_jobs_total", name=name, outcome="retry") == 2
    assert _metric("soko_jobs_total", name=name, outcome="done") == 1


async def test_backoff_is_capped(outbox: Outbox) -> None:
    settings = outbox.settings.model_copy(
        update={"outbox_backoff_base_seconds": 2.0, "outbox_backoff_max_seconds": 60.0}
    )
    dispatcher = outbox.dispatcher(settings=settings)
    for attempt in (1, 5, 6, 50, 100):
        delay = dispatcher.backoff(attempt).total_seconds()
        ceiling = min(60.0, 2.0 * 2 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling


async def test_a_job_is_dead_after_its_maximum_attempts(outbox: Outbox, clock: ManualClock) -> None:
    name = _unique("charge_card")
    calls: list[int] = []
    settings = outbox.settings.model_copy(update={"outbox_max_attempts": 3})

    @outbox.registry.job(name)
    async def charge_card(ctx: JobContext, payload: dict[str, Any]) -> None:
        calls.append(ctx.attempt)
        raise RuntimeError("card issuer unavailable")

    message_id = await _enqueue(outbox, name, {"payment_id": "p-1"})
    dispatcher = outbox.dispatcher(settings=settings)
    for _ in range(6):
        await dispatcher.run_until_idle()
        clock.advance(dt.timedelta(seconds=settings.outbox_backoff_max_seconds))

    assert calls == [1, 2, 3]
    row = await outbox.message(message_id)
    assert (row.status, row.attempts) == ("dead", 3)
    assert row.completed_at is not None and row.locked_by is None
    assert row.last_error == "RuntimeError: card issuer unavailable"
    assert await outbox.markers() == []
    assert _metric("soko_jobs_total", name=name, outcome="retry") == 2
    assert _metric("soko_jobs_total", name=name, outcome="dead") == 1


async def test_max_attempts_from_the_message_then_the_registration(
    outbox: Outbox, clock: ManualClock
) -> None:
    calls: Counter[str] = Counter()

    @outbox.registry.job("flaky", max_attempts=2)
    async def flaky(ctx: JobContext, payload: dict[str, Any]) -> None:
        calls[payload["which"]] += 1
        raise RuntimeError("always fails")

    registered = await _enqueue(outbox, "flaky", {"which": "registered"})
    on_message = await _enqueue(outbox, "flaky", {"which": "message"}, max_attempts=1)
    unknown = await _enqueue(outbox, "no_such_job", {}, max_attempts=1)
    dispatcher = outbox.dispatcher()
    for _ in range(4):
        await dispatcher.run_until_idle()
        clock.advance(dt.timedelta(hours=2))

    assert calls == {"registered": 2, "message": 1}
    for message_id, attempts in ((registered, 2), (on_message, 1), (unknown, 1)):
        row = await outbox.message(message_id)
        assert (row.status, row.attempts) == ("dead", attempts)
    assert (await outbox.message(unknown)).last_error == (
        "UnknownHandlerError: no handler is registered for 'no_such_job'"
    )


async def test_the_processed_marker_prevents_a_second_effect(outbox: Outbox) -> None:
    effects: Counter[str] = Counter()

    @outbox.registry.job("release_payout")
    async def release_payout(ctx: JobContext, payload: dict[str, Any]) -> None:
        effects["payout"] += 1

    @outbox.registry.on("booking.completed", name="release_escrow")
    async def release_escrow(ctx: JobContext, payload: dict[str, Any]) -> None:
        effects["escrow"] += 1

    @outbox.registry.on("booking.completed", name="thank_guest")
    async def thank_guest(ctx: JobContext, payload: dict[str, Any]) -> None:
        effects["thanks"] += 1

    @outbox.registry.on("booking.cancelled", name="refund_guest")
    async def refund_guest(ctx: JobContext, payload: dict[str, Any]) -> None:
        effects["refund"] += 1

    job_id = await _enqueue(outbox, "release_payout", {"payout_id": "po-1"})
    await _publish(outbox, "booking.completed", {"booking_id": "b-1"})
    # One subscriber: its run is the event's own message (no delivery is written).
    cancelled = await _publish(outbox, "booking.cancelled", {"booking_id": "b-2"})
    dispatcher = outbox.dispatcher()
    await dispatcher.run_until_idle()
    assert effects == {"payout": 1, "escrow": 1, "thanks": 1, "refund": 1}

    # The same messages delivered again: the markers stop a second effect.
    delivery = next(row for row in await outbox.messages() if row.handler == "release_escrow")
    for message_id in (job_id, delivery.id, cancelled):
        await outbox.redeliver(message_id)
    assert await dispatcher.run_until_idle() == 3
    assert effects == {"payout": 1, "escrow": 1, "thanks": 1, "refund": 1}
    for message_id in (job_id, delivery.id, cancelled):
        row = await outbox.message(message_id)
        assert (row.status, row.attempts) == ("done", 2)
    assert len(await outbox.markers()) == 4


async def test_a_schedule_fires_once_per_due_time_across_dispatchers(
    outbox: Outbox, clock: ManualClock
) -> None:
    fired: list[str] = []

    @outbox.registry.schedule("*/5 * * * *", name="expire_carts")
    async def expire_carts(ctx: JobContext, payload: dict[str, Any]) -> None:
        fired.append(payload["scheduled_for"])

    first, second = outbox.dispatcher(), outbox.dispatcher()
    clock.set(dt.datetime(2030, 1, 1, 0, 0, 30, tzinfo=dt.UTC))
    await asyncio.gather(first.run_until_idle(), second.run_until_idle())
    await asyncio.gather(first.run_until_idle(), second.run_until_idle())
    assert fired == ["2030-01-01T00:00:00+00:00"]

    clock.advance(dt.timedelta(minutes=3))  # 00:03:30, nothing new is due
    await asyncio.gather(first.run_until_idle(), second.run_until_idle())
    assert len(fired) == 1

    clock.advance(dt.timedelta(minutes=2))  # 00:05:30
    await asyncio.gather(first.run_until_idle(), second.run_until_idle())
    # A third worker that starts later does not fire a due time that already fired.
    await outbox.dispatcher().run_until_idle()
    assert fired == ["2030-01-01T00:00:00+00:00", "2030-01-01T00:05:00+00:00"]
    keys = sorted(row.dedupe_key or "" for row in await outbox.messages())
    assert keys == [
        "schedule:expire_carts:2030-01-01T00:00:00+00:00",
        "schedule:expire_carts:2030-01-01T00:05:00+00:00",
    ]


async def test_a_poll_before_the_next_due_time_skips_the_cron_arithmetic(
    outbox: Outbox, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every poll used to ask croniter for each schedule's latest due time; once a
    schedule fired, the dispatcher knows when it is next due and asks only then."""
    fired: list[str] = []

    @outbox.registry.schedule("*/5 * * * *", name="expire_carts")
    async def expire_carts(ctx: JobContext, payload: dict[str, Any]) -> None:
        fired.append(payload["scheduled_for"])

    asked: list[dt.datetime] = []
    latest_due = Schedule.latest_due

    def counting(self: Schedule, now: dt.datetime) -> dt.datetime:
        asked.append(now)
        return latest_due(self, now)

    monkeypatch.setattr(Schedule, "latest_due", counting)
    dispatcher = outbox.dispatcher()
    clock.set(dt.datetime(2030, 1, 1, 0, 0, 30, tzinfo=dt.UTC))
    await dispatcher.fire_due_schedules()
    assert len(asked) == 1
    for _ in range(5):
        clock.advance(dt.timedelta(seconds=50))  # up to 00:04:40
        await dispatcher.fire_due_schedules()
    assert len(asked) == 1

    clock.advance(dt.timedelta(seconds=30))  # 00:05:10
    await dispatcher.fire_due_schedules()
    assert len(asked) == 2
    clock.advance(dt.timedelta(minutes=4))  # 00:09:10, before 00:10
    await dispatcher.fire_due_schedules()
    assert len(asked) == 2
    await dispatcher.run_until_idle()
    assert sorted(fired) == ["2030-01-01T00:00:00+00:00", "2030-01-01T00:05:00+00:00"]


async def test_an_expired_lease_lets_another_dispatcher_take_over(
    outbox: Outbox, clock: ManualClock
) -> None:
    effects: list[int] = []

    @outbox.registry.job("send_invoice")
    async def send_invoice(ctx: JobContext, payload: dict[str, Any]) -> None:
        effects.append(ctx.attempt)

    message_id = await _enqueue(outbox, "send_invoice", {"invoice_id": "i-1"})
    stalled = outbox.dispatcher(worker_id="stalled-worker")
    [claimed] = await stalled.claim(10)
    row = await outbox.message(message_id)
    assert (row.status, row.locked_by, row.attempts) == ("running", "stalled-worker", 1)
    lease = dt.timedelta(seconds=outbox.settings.outbox_lease_seconds)
    assert row.locked_until == clock.now() + lease

    rescuer = outbox.dispatcher(worker_id="rescuer")
    assert await rescuer.run_until_idle() == 0  # the lease still holds
    clock.advance(lease + dt.timedelta(seconds=1))
    assert await rescuer.run_until_idle() == 1
    assert effects == [2]
    row = await outbox.message(message_id)
    assert (row.status, row.attempts) == ("done", 2)

    # The stalled worker wakes up and finds the message is no longer its own.
    await stalled.handle(claimed)
    assert effects == [2]
    assert (await outbox.message(message_id)).status == "done"


async def test_a_fan_out_whose_lease_was_taken_over_writes_nothing(
    outbox: Outbox, clock: ManualClock
) -> None:
    @outbox.registry.on("order.paid", name="notify_buyer")
    async def notify_buyer(ctx: JobContext, payload: dict[str, Any]) -> None:
        return None

    @outbox.registry.on("order.paid", name="award_points", max_attempts=3)
    async def award_points(ctx: JobContext, payload: dict[str, Any]) -> None:
        return None

    event_id = await _publish(outbox, "order.paid", {"order_id": "o-9"})
    stalled = outbox.dispatcher(worker_id="stalled-worker")
    [claimed] = await stalled.claim(10)
    clock.advance(dt.timedelta(seconds=outbox.settings.outbox_lease_seconds + 1))
    rescuer = outbox.dispatcher(worker_id="rescuer")
    [taken] = await rescuer.claim(10)

    # The stalled worker's fan-out finds the event is no longer its own: no delivery is
    # written and the event stays the rescuer's.
    await stalled.handle(claimed)
    [row] = await outbox.messages()
    assert (row.id, row.status, row.locked_by, row.attempts) == (
        event_id, "running", "rescuer", 2,
    )  # fmt: skip

    await rescuer.handle(taken)
    rows = {row.handler: row for row in await outbox.messages()}
    assert rows[None].status == "done"
    assert rows[None].locked_by is None and rows[None].completed_at == clock.now()
    deliveries = {name: rows[name] for name in ("notify_buyer", "award_points")}
    for name, delivery in deliveries.items():
        assert (delivery.kind, delivery.name, delivery.event_id) == (
            "event",
            "order.paid",
            event_id,
        )
        assert (delivery.status, delivery.attempts) == ("pending", 0)
        assert delivery.payload == {"order_id": "o-9"}
        assert delivery.dedupe_key == f"event:{event_id}:{name}"
        assert delivery.available_at == delivery.created_at == clock.now()
    assert deliveries["notify_buyer"].max_attempts is None
    assert deliveries["award_points"].max_attempts == 3

    # A second fan-out of the same event (a redelivery) writes no second delivery.
    await outbox.redeliver(event_id)
    await rescuer.run_until_idle()
    assert sorted(str(row.handler) for row in await outbox.messages()) == [
        "None", "award_points", "notify_buyer",
    ]  # fmt: skip


async def test_stop_releases_claimed_jobs_after_the_grace(outbox: Outbox, backend: str) -> None:
    started = asyncio.Event()
    never = asyncio.Event()
    effects: list[str] = []

    @outbox.registry.job("generate_report")
    async def generate_report(ctx: JobContext, payload: dict[str, Any]) -> None:
        await enqueue(ctx.session, "email_report", {})
        started.set()
        await never.wait()
        effects.append("report")

    message_id = await _enqueue(outbox, "generate_report", {})
    dispatcher = outbox.dispatcher(worker_id="stopping-worker")
    running = asyncio.create_task(dispatcher.run())
    await asyncio.wait_for(started.wait(), WAIT)
    if backend == "postgresql":
        # (SQLite: the handler's transaction holds the write lock every session takes.)
        assert (await outbox.message(message_id)).status == "running"

    await asyncio.wait_for(dispatcher.stop(grace=0), WAIT)
    await asyncio.wait_for(running, WAIT)

    [row] = await outbox.messages()  # the handler's follow-up rolled back with it
    assert (row.id, row.status, row.locked_by, row.locked_until) == (
        message_id,
        "pending",
        None,
        None,
    )
    assert row.attempts == 0  # an interrupted attempt is not held against the job

    never.set()
    assert await outbox.dispatcher().run_until_idle() == 2
    assert effects == ["report"]
    assert (await outbox.message(message_id)).status == "done"


async def test_stop_lets_a_running_job_finish_within_the_grace(outbox: Outbox) -> None:
    started = asyncio.Event()
    proceed = asyncio.Event()

    @outbox.registry.job("close_payout_batch")
    async def close_payout_batch(ctx: JobContext, payload: dict[str, Any]) -> None:
        started.set()
        await proceed.wait()

    message_id = await _enqueue(outbox, "close_payout_batch", {})
    dispatcher = outbox.dispatcher()
    running = asyncio.create_task(dispatcher.run())
    await asyncio.wait_for(started.wait(), WAIT)
    stopping = asyncio.create_task(dispatcher.stop(grace=WAIT))
    await asyncio.sleep(0)
    assert not stopping.done()
    proceed.set()
    await asyncio.wait_for(stopping, WAIT)
    await asyncio.wait_for(running, WAIT)
    row = await outbox.message(message_id)
    assert (row.status, row.attempts) == ("done", 1)


async def test_run_picks_up_work_when_woken(outbox: Outbox) -> None:
    handled = asyncio.Event()

    @outbox.registry.job("index_listing")
    async def index_listing(ctx: JobContext, payload: dict[str, Any]) -> None:
        handled.set()

    # A poll interval far longer than the wait below: only wake() can explain the run.
    settings = outbox.settings.model_copy(update={"outbox_poll_seconds": 60.0})
    dispatcher = outbox.dispatcher(settings=settings)
    running = asyncio.create_task(dispatcher.run())
    await asyncio.sleep(0.05)  # let the first (empty) poll happen
    await _enqueue(outbox, "index_listing", {"listing_id": "l-1"})
    dispatcher.wake()
    await asyncio.wait_for(handled.wait(), WAIT)
    await dispatcher.stop(grace=WAIT)
    await running


async def test_concurrent_dispatchers_handle_each_message_exactly_once(
    outbox: Outbox, database_url: str
) -> None:
    handled: Counter[str] = Counter()
    by_worker: dict[str, set[str]] = {"left": set(), "right": set()}

    async def record(ctx: JobContext, payload: dict[str, Any]) -> None:
        handled[payload["n"]] += 1
        await asyncio.sleep(0)

    outbox.registry.job("count")(record)
    async with outbox.transaction() as session:
        for n in range(60):
            await enqueue(session, "count", {"n": str(n)}, now=outbox.clock.now())

    settings = outbox.settings.model_copy(update={"outbox_batch_size": 7, "outbox_concurrency": 4})
    # Two engines: two workers as separate as two processes' connection pools.
    other = Outbox(database_url, settings, outbox.clock)
    other.registry = outbox.registry
    try:
        left = outbox.dispatcher(settings=settings, worker_id="left")
        right = other.dispatcher(settings=settings, worker_id="right")

        async def drain(dispatcher: Any, worker: str) -> None:
            while batch := await dispatcher.claim(settings.outbox_batch_size):
                by_worker[worker].update(str(message.id) for message in batch)
                await asyncio.gather(*(dispatcher.handle(message) for message in batch))

        await asyncio.gather(drain(left, "left"), drain(right, "right"))
    finally:
        await other.close()

    assert by_worker["left"].isdisjoint(by_worker["right"])
    assert len(by_worker["left"] | by_worker["right"]) == 60
    assert handled == {str(n): 1 for n in range(60)}
    assert {row.status for row in await outbox.messages()} == {"done"}


async def test_registry_refuses_bad_registrations() -> None:
    jobs = JobRegistry()

    @jobs.job("once")
    async def once(ctx: JobContext, payload: dict[str, Any]) -> None:
        return None

    with pytest.raises(ValueError, match="already registered"):
        jobs.job("once")(once)
    with pytest.raises(TypeError, match="async"):
        jobs.job("sync")(lambda ctx, payload: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="cron"):
        jobs.schedule("every tuesday", name="weekly")
    jobs.on("order.paid", name="notify")(once)
    with pytest.raises(ValueError, match="already has a subscriber"):
        jobs.on("order.paid", name="notify")(once)
    with pytest.raises(ValueError, match="max_attempts"):
        jobs.job("zero", max_attempts=0)


@pytest.mark.postgresql
async def test_postgres_claims_skip_rows_locked_by_another_worker(
    postgres_test_url: str, tmp_path: Path, clock: ManualClock
) -> None:
    settings = make_settings(tmp_path, database_url=postgres_test_url)
    outbox = Outbox(postgres_test_url, settings, clock)
    try:
        first = await _enqueue(outbox, "count", {"n": "1"})
        second = await _enqueue(outbox, "count", {"n": "2"})
        engine = create_engine(postgres_test_url)
        try:
            async with engine.connect() as holder, holder.begin():
                # Another worker's transaction holds the first message's row.
                await holder.execute(
                    select(OutboxMessage.id).where(OutboxMessage.id == first).with_for_update()
                )
                claimed = await asyncio.wait_for(outbox.dispatcher().claim(10), WAIT)
                assert [message.id for message in claimed] == [second]
        finally:
            await engine.dispose()
    finally:
        async with outbox.transaction() as session:
            await session.execute(text("DELETE FROM outbox_messages"))
        await outbox.close()


async def test_a_claim_takes_expired_leases_first_then_the_oldest_due_up_to_its_limit(
    outbox: Outbox, clock: ManualClock
) -> None:
    start = clock.now()
    due = [
        await _enqueue(outbox, "count", {"n": str(n)}, available_at=start - dt.timedelta(minutes=n))
        for n in (1, 5, 3, 4, 2)
    ]  # oldest first: due[1], due[3], due[2], due[4], due[0]
    later = await _enqueue(outbox, "count", {"n": "later"}, delay=3600)
    first = await outbox.dispatcher().claim(2)
    assert sorted(message.id for message in first) == sorted([due[1], due[3]])

    # The first worker died: its lease runs out while the rest waits.
    clock.advance(dt.timedelta(seconds=outbox.settings.outbox_lease_seconds + 1))
    rescuer = outbox.dispatcher()
    second = {message.id: message.attempts for message in await rescuer.claim(3)}
    assert second == {due[1]: 2, due[3]: 2, due[2]: 1}
    third = await rescuer.claim(10)
    assert sorted(message.id for message in third) == sorted([due[4], due[0]])  # not `later`
    assert await rescuer.claim(10) == []
    assert (await outbox.message(later)).status == "pending"


def _largest_row_count(plan: dict[str, Any]) -> int:
    """The most rows any node of an ``EXPLAIN (ANALYZE, FORMAT JSON)`` plan produced."""
    rows = int(plan["Actual Rows"] * plan["Actual Loops"])
    return max([rows, *(_largest_row_count(child) for child in plan.get("Plans", []))])


@pytest.mark.postgresql
async def test_postgres_claims_read_no_more_of_a_backlog_than_they_take(
    postgres_test_url: str, tmp_path: Path, clock: ManualClock
) -> None:
    """A claim's cost must not grow with the backlog it drains: it reads the due messages
    in index order and stops at its limit, rather than reading every due message and
    sorting them (draining a backlog of n messages then read about n * n / (2 * limit) rows)."""
    from soko.platform.jobs import _claim_statement

    settings = make_settings(tmp_path, database_url=postgres_test_url)
    outbox = Outbox(postgres_test_url, settings, clock)
    now = clock.now()
    try:
        async with outbox.transaction() as session:
            await session.execute(
                text(
                    "INSERT INTO outbox_messages (id, kind, name, payload, status, attempts,"
                    " available_at, created_at) SELECT gen_random_uuid(), 'job', 'count',"
                    " '{}', 'pending', 0, CAST(:now AS timestamptz) - make_interval(secs => n),"
                    " :now FROM generate_series(1, 5000) AS n"
                ),
                {"now": now},
            )
            await session.execute(text("ANALYZE outbox_messages"))
        async with outbox.db.engine.connect() as connection:
            compiled = _claim_statement().compile(dialect=connection.dialect)
            lease_until = now + dt.timedelta(minutes=1)
            parameters = compiled.construct_params(
                {"now": now, "limit": 5, "worker": "w", "lease_until": lease_until}
            )
            assert compiled.positiontup is not None
            explained = await connection.exec_driver_sql(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + compiled.string,
                tuple(parameters[name] for name in compiled.positiontup),
            )
            [[document]] = explained.all()
            await connection.rollback()  # EXPLAIN ANALYZE ran the claim: take it back
        plan = (document if isinstance(document, list) else json.loads(document))[0]["Plan"]
        assert plan["Actual Rows"] == 5
        assert _largest_row_count(plan) <= 10, plan
    finally:
        async with outbox.transaction() as session:
            await session.execute(text("DELETE FROM outbox_messages"))
        await outbox.close()


async def test_cache_tags_a_job_marks_are_invalidated_once_it_commits(outbox: Outbox) -> None:
    from types import SimpleNamespace

    from soko.platform.cache import MemoryCache
    from soko.platform.runtime import invalidate_after_commit

    cache = MemoryCache()
    await cache.set("availability:v-1", 5, ttl=60, tags=["stock:v-1"])

    @outbox.registry.job("release_holds")
    async def release_holds(ctx: JobContext, payload: dict[str, Any]) -> None:
        invalidate_after_commit(ctx.session, "stock:v-1")
        assert await cache.get("availability:v-1") == 5  # not before the commit

    await _enqueue(outbox, "release_holds", {})
    dispatcher = outbox.dispatcher(services=SimpleNamespace(cache=cache))
    assert await dispatcher.run_until_idle() == 1
    assert await cache.get("availability:v-1") is None


async def test_a_busy_process_runs_fewer_jobs_at_once(outbox: Outbox) -> None:
    settings = outbox.settings.model_copy(
        update={"outbox_concurrency": 6, "outbox_busy_concurrency": 2}
    )
    serving = False
    dispatcher = outbox.dispatcher(settings=settings, busy=lambda: serving)
    assert dispatcher.concurrency_now() == 6
    serving = True
    assert dispatcher.concurrency_now() == 2
    assert outbox.dispatcher(settings=settings).concurrency_now() == 6  # a worker


async def test_while_requests_are_served_new_jobs_start_one_at_a_time(
    outbox: Outbox, backend: str
) -> None:
    """A backlog does not crowd requests out of the API process's event loop: while the
    process serves requests its dispatcher starts jobs only up to
    ``outbox_busy_concurrency``; once idle, up to ``outbox_concurrency``."""
    if backend == "sqlite":
        pytest.skip("on SQLite each job's transaction holds the one write lock: one at a time")
    running = 0
    most = 0
    release = asyncio.Event()

    @outbox.registry.job("slow")
    async def slow(ctx: JobContext, payload: dict[str, Any]) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await release.wait()
        finally:
            running -= 1

    for n in range(6):
        await _enqueue(outbox, "slow", {"n": n})
    settings = outbox.settings.model_copy(
        update={"outbox_concurrency": 4, "outbox_busy_concurrency": 1, "outbox_poll_seconds": 0.05}
    )
    serving = True
    dispatcher = outbox.dispatcher(settings=settings, busy=lambda: serving)
    loop = asyncio.create_task(dispatcher.run())
    try:
        async with asyncio.timeout(WAIT):
            while running < 1:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # several polls: none may start a second job
        assert (running, most) == (1, 1)

        serving = False
        dispatcher.wake()
        async with asyncio.timeout(WAIT):
            while running < 4:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert most == 4
        release.set()
        async with asyncio.timeout(WAIT):
            while {row.status for row in await outbox.messages()} != {"done"}:
                await asyncio.sleep(0.05)
    finally:
        release.set()
        await asyncio.wait_for(dispatcher.stop(grace=WAIT), WAIT)
        await asyncio.wait_for(loop, WAIT)
