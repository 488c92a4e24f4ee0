"""The outbox API: rows written in the caller's transaction, and only then."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import event, select, text

from soko.platform.clock import ManualClock
from soko.platform.config import Settings
from soko.platform.jobs import JobContext
from soko.platform.outbox import (
    LAST_ERROR_MAX_LENGTH,
    SESSION_CLOCK_KEY,
    describe_failure,
    enqueue,
    publish,
    publish_all,
)
from tests.platform.jobs_support import Outbox


@pytest.fixture
async def outbox(
    database_url: str, settings: Settings, clock: ManualClock
) -> AsyncIterator[Outbox]:
    box = Outbox(database_url, settings, clock)
    try:
        yield box
    finally:
        await box.close()


async def test_enqueue_writes_a_pending_job_in_the_callers_transaction(
    outbox: Outbox, clock: ManualClock
) -> None:
    async with outbox.transaction() as session:
        session.info[SESSION_CLOCK_KEY] = clock
        message_id = await enqueue(session, "send_receipt", {"order_id": "o-1"}, max_attempts=4)
        assert session.info["outbox_written"] is True

    [row] = await outbox.messages()
    assert row.id == message_id
    assert (row.kind, row.name, row.status) == ("job", "send_receipt", "pending")
    assert row.payload == {"order_id": "o-1"}
    assert (row.attempts, row.max_attempts) == (0, 4)
    assert row.available_at == clock.now()
    assert row.created_at == clock.now()
    assert row.locked_by is None and row.dedupe_key is None


async def test_a_rolled_back_transaction_leaves_no_job(outbox: Outbox) -> None:
    ran: list[dict[str, Any]] = []

    @outbox.registry.job("send_receipt")
    async def send_receipt(ctx: JobContext, payload: dict[str, Any]) -> None:
        ran.append(payload)

    with pytest.raises(RuntimeError, match="payment declined"):
        async with outbox.transaction() as session:
            await session.execute(text("SELECT 1"))
            await enqueue(session, "send_receipt", {"order_id": "o-1"})
            raise RuntimeError("payment declined")

    assert await outbox.messages() == []
    assert await outbox.dispatcher().run_until_idle() == 0
    assert ran == []


async def test_a_dedupe_key_writes_one_message_and_keeps_the_transaction(
    outbox: Outbox, clock: ManualClock
) -> None:
    async with outbox.transaction() as session:
        first = await enqueue(session, "remind", {"booking_id": "b-1"}, dedupe_key="remind:b-1")
        again = await enqueue(session, "remind", {"booking_id": "b-1"}, dedupe_key="remind:b-1")
    async with outbox.transaction() as session:
        later = await enqueue(session, "remind", {"booking_id": "b-1"}, dedupe_key="remind:b-1")
        other = await enqueue(session, "remind", {"booking_id": "b-2"}, dedupe_key="remind:b-2")

    assert first is not None and other is not None
    assert again is None and later is None
    rows = await outbox.messages()
    assert sorted(row.dedupe_key or "" for row in rows) == ["remind:b-1", "remind:b-2"]


async def test_delay_and_available_at_hold_a_job_back(outbox: Outbox, clock: ManualClock) -> None:
    ran: list[str] = []

    @outbox.registry.job("expire_hold")
    async def expire_hold(ctx: JobContext, payload: dict[str, Any]) -> None:
        ran.append(payload["hold"])

    start = clock.now()
    async with outbox.transaction() as session:
        session.info[SESSION_CLOCK_KEY] = clock
        await enqueue(session, "expire_hold", {"hold": "in-ten-minutes"}, delay=600)
        await enqueue(
            session,
            "expire_hold",
            {"hold": "in-an-hour"},
            available_at=start + dt.timedelta(hours=1),
        )

    dispatcher = outbox.dispatcher()
    assert await dispatcher.run_until_idle() == 0
    clock.advance(dt.timedelta(minutes=10))
    assert await dispatcher.run_until_idle() == 1
    assert ran == ["in-ten-minutes"]
    clock.advance(dt.timedelta(minutes=50))
    await dispatcher.run_until_idle()
    assert ran == ["in-ten-minutes", "in-an-hour"]


async def test_enqueue_refuses_bad_arguments(outbox: Outbox) -> None:
    async with outbox.transaction() as session:
        with pytest.raises(ValueError, match="JSON"):
            await enqueue(session, "send_receipt", {"at": dt.datetime.now(dt.UTC)})
        with pytest.raises(ValueError, match="not both"):
            await enqueue(
                session, "send_receipt", {}, delay=1, available_at=dt.datetime.now(dt.UTC)
            )
        with pytest.raises(ValueError, match="timezone"):
            await enqueue(session, "send_receipt", {}, available_at=dt.datetime(2030, 1, 1))
        with pytest.raises(ValueError, match="job name"):
            await enqueue(session, "", {})
        with pytest.raises(ValueError, match="max_attempts"):
            await enqueue(session, "send_receipt", {}, max_attempts=0)
    assert await outbox.messages() == []


class OrderPaid(BaseModel):
    order_id: str
    amount_minor: int
    currency: str
    paid_at: dt.datetime


async def test_publish_writes_one_event_row_from_a_model(
    outbox: Outbox, clock: ManualClock
) -> None:
    event = OrderPaid(order_id="o-9", amount_minor=12_500, currency="KES", paid_at=clock.now())
    async with outbox.transaction() as session:
        event_id = await publish(session, "order.paid", event, now=clock.now())
        assert session.info["outbox_written"] is True

    [row] = await outbox.messages()
    assert row.id == event_id
    assert (row.kind, row.name, row.handler, row.status) == ("event", "order.paid", None, "pending")
    assert row.payload == {
        "order_id": "o-9",
        "amount_minor": 12_500,
        "currency": "KES",
        "paid_at": clock.now().isoformat().replace("+00:00", "Z"),
    }


async def test_publish_all_writes_every_event_in_one_statement(
    outbox: Outbox, clock: ManualClock
) -> None:
    events = [
        OrderPaid(order_id=f"o-{i}", amount_minor=100 * i, currency="KES", paid_at=clock.now())
        for i in range(3)
    ]
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not statement.startswith("BEGIN"):
            sent.append(statement)

    engine = outbox.db.engine.sync_engine
    async with outbox.transaction() as session:
        await session.execute(select(1))  # the transaction has begun before counting
        sent.clear()
        event.listen(engine, "before_cursor_execute", record)
        try:
            ids = await publish_all(session, "order.paid", events, now=clock.now())
        finally:
            event.remove(engine, "before_cursor_execute", record)
        assert session.info["outbox_written"] is True
        assert await publish_all(session, "order.paid", [], now=clock.now()) == []
    assert len(sent) == 1, sent

    rows = {row.id: row for row in await outbox.messages()}
    assert set(rows) == set(ids)
    for message_id, published in zip(ids, events, strict=True):
        row = rows[message_id]
        assert (row.kind, row.name, row.handler, row.status) == (
            "event",
            "order.paid",
            None,
            "pending",
        )
        assert row.payload == published.model_dump(mode="json")
        assert row.available_at == row.created_at == clock.now()


def test_failure_descriptions_hide_secrets_and_are_bounded() -> None:
    error = ConnectionError(
        "cannot reach postgresql://soko:hunter2@db.internal/soko with token=abc123 "
        "for jane.doe@example.com paying with 4111 1111 1111 1111"
    )
    described = describe_failure(error)
    assert described.startswith("ConnectionError: cannot reach postgresql://***@db.internal")
    for secret in ("hunter2", "abc123", "jane.doe", "4111"):
        assert secret not in described
    assert "token=***" in described

    long = describe_failure(ValueError("x" * 5000))
    assert len(long) == LAST_ERROR_MAX_LENGTH
    assert long.startswith("ValueError: xxx")
