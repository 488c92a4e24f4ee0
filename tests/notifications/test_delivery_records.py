"""Delivery through providers: the delivery record, retries through the outbox's
backoff, suppression, the per-provider circuit breaker and rate limit; on SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import httpx2
import pytest
from sqlalchemy import select

from soko.notifications.channels import EXTENSION, ProviderServices
from soko.notifications.models import DeliveryStatus
from soko.notifications.public import read_sink, send_email, send_sms
from soko.platform.clock import ManualClock
from soko.platform.config import Settings
from soko.platform.outbox import OutboxMessage
from soko.platform.runtime import Runtime
from tests.conftest import make_settings
from tests.notifications.support import (
    ScriptedProviders,
    at_answer,
    deliveries,
    install,
    status_answer,
    suppressions,
    transaction,
)

PHONE = "+254712345678"
BODY = "Soko: order SK-1 is paid."


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return make_settings(
        tmp_path,
        database_url=database_url,
        public_url="https://soko.example",
        notifications_sms_provider="africastalking",
        africastalking_username="soko",
        africastalking_api_key="atsk_test",
        africastalking_api_base="https://at.test",
        notifications_breaker_failures=3,
        notifications_breaker_reset_seconds=60,
        outbox_max_attempts=3,
    )


@pytest.fixture(autouse=True)
def no_scheduled_jobs(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    async def fire_nothing() -> None:
        return None

    monkeypatch.setattr(runtime.dispatcher, "fire_due_schedules", fire_nothing)


@pytest.fixture
def providers(runtime: Runtime) -> ScriptedProviders:
    return install(runtime)


async def _send(runtime: Runtime, to: str = PHONE) -> None:
    async with transaction(runtime) as session:
        assert await send_sms(session, to=to, body=BODY, category="transactional.order")


async def _outbox(runtime: Runtime) -> list[OutboxMessage]:
    async with runtime.db.sessionmaker() as session:
        return list(await session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


async def test_a_record_is_queued_with_the_job_and_moved_by_it(
    runtime: Runtime, providers: ScriptedProviders, clock: ManualClock
) -> None:
    providers.answer(at_answer(message_id="ATXid_42"))
    await _send(runtime)
    [record] = await deliveries(runtime)
    assert (record.status, record.kind, record.attempts, record.provider) == (
        "queued",
        "sms",
        0,
        None,
    )
    assert PHONE not in repr(record.__dict__)  # only the blind index is stored
    assert await runtime.dispatcher.run_until_idle() == 1
    [record] = await deliveries(runtime)
    assert record.status == DeliveryStatus.sent
    assert (record.provider, record.provider_message_id) == ("africastalking", "ATXid_42")
    assert record.attempts == 1 and record.last_error is None
    assert record.sent_at == clock.now()
    [request] = providers.requests
    assert request.url == "https://at.test/version1/messaging"
    assert read_sink(runtime.settings.data_dir, "sms") == []  # the provider, not the sink


async def test_a_dedupe_key_writes_one_record(
    runtime: Runtime, providers: ScriptedProviders
) -> None:
    for _ in range(2):
        async with transaction(runtime) as session:
            await send_sms(session, to=PHONE, body=BODY, category="x.y", dedupe_key="k1")
    assert len(await deliveries(runtime)) == 1


async def test_transient_failures_retry_with_backoff_and_the_record_keeps_the_error(
    runtime: Runtime, providers: ScriptedProviders, clock: ManualClock
) -> None:
    providers.answer(status_answer(503), at_answer(message_id="ATXid_7"))
    await _send(runtime)
    assert await runtime.dispatcher.run_until_idle() == 1
    [row] = await _outbox(runtime)
    assert (row.status, row.attempts) == ("pending", 1)
    assert row.last_error is not None and "africastalking answered 503" in row.last_error
    [record] = await deliveries(runtime)
    assert record.status == "queued"  # the failed attempt's transaction rolled back

    assert await runtime.dispatcher.run_until_idle() == 0  # not due yet: backoff
    clock.advance(dt.timedelta(seconds=runtime.settings.outbox_backoff_max_seconds))
    assert await runtime.dispatcher.run_until_idle() == 1
    [record] = await deliveries(runtime)
    assert (record.status, record.attempts, record.provider_message_id) == ("sent", 2, "ATXid_7")
    assert record.last_error is not None and "503" in record.last_error
    assert len(providers.requests) == 2


async def test_a_provider_answering_too_slowly_is_given_up_on_in_time(
    runtime: Runtime,
) -> None:
    """The timeout bounds the whole call, not each read of it: the job's transaction
    (and the delivery's row) is not held while a provider takes its time."""
    runtime.settings.notifications_http_timeout_seconds = 0.2
    asked: list[httpx2.Request] = []

    async def dawdling(request: httpx2.Request) -> httpx2.Response:
        asked.append(request)
        await asyncio.sleep(60)
        return httpx2.Response(201, json={})

    services = ProviderServices(
        runtime.settings, runtime.clock, transport=httpx2.MockTransport(dawdling)
    )
    runtime.extensions[EXTENSION] = services
    runtime.on_stop(services.close)
    await _send(runtime)
    async with asyncio.timeout(30):
        assert await runtime.dispatcher.run_until_idle() == 1
    assert len(asked) == 1
    [row] = await _outbox(runtime)
    assert (row.status, row.attempts) == ("pending", 1)
    assert row.last_error is not None and "took longer than 0.2s" in row.last_error
    [record] = await deliveries(runtime)
    assert record.status == "queued"


async def test_the_last_attempt_records_failed_and_ends_the_job(
    runtime: Runtime, providers: ScriptedProviders, clock: ManualClock
) -> None:
    providers.answer(at_answer(status_code=405, status="InsufficientBalance"))
    await _send(runtime)
    for _ in range(runtime.settings.outbox_max_attempts):
        await runtime.dispatcher.run_until_idle()
        clock.advance(dt.timedelta(seconds=runtime.settings.outbox_backoff_max_seconds))
    [record] = await deliveries(runtime)
    assert (record.status, record.attempts) == ("failed", 3)
    assert record.last_error is not None and "InsufficientBalance" in record.last_error
    [row] = await _outbox(runtime)
    assert row.status == "done"  # no dead job: the record tells the story


async def test_a_rejected_number_is_suppressed_and_never_tried_again(
    runtime: Runtime, providers: ScriptedProviders
) -> None:
    providers.answer(at_answer(status_code=403, status="InvalidPhoneNumber"))
    await _send(runtime)
    assert await runtime.dispatcher.run_until_idle() == 1
    [record] = await deliveries(runtime)
    assert record.status == "undeliverable"
    [suppression] = await suppressions(runtime)
    assert suppression.kind == "sms" and suppression.address_index == record.recipient_index
    assert PHONE not in suppression.reason

    await _send(runtime)  # the same number again: skipped and recorded
    assert await runtime.dispatcher.run_until_idle() == 1
    assert len(providers.requests) == 1
    second = (await deliveries(runtime))[1]
    assert second.status == "undeliverable" and "suppressed" in (second.last_error or "")
    # Another number still goes out.
    providers.answer(at_answer())
    await _send(runtime, to="+254700000001")
    assert await runtime.dispatcher.run_until_idle() == 1
    assert (await deliveries(runtime))[2].status == "sent"


async def test_the_breaker_opens_after_failures_in_a_row_and_lets_a_trial_through(
    runtime: Runtime, providers: ScriptedProviders, clock: ManualClock
) -> None:
    providers.answer(status_answer(500))
    for _ in range(4):
        await _send(runtime)
    assert await runtime.dispatcher.run_until_idle() == 4
    # Three failures opened the breaker; the fourth message was not even tried.
    assert len(providers.requests) == 3
    errors = [row.last_error or "" for row in await _outbox(runtime)]
    assert sum("circuit open" in error for error in errors) == 1

    providers.answer(at_answer())
    clock.advance(dt.timedelta(seconds=61))  # past the reset time and every backoff
    assert await runtime.dispatcher.run_until_idle() == 4
    # One trial went first... then, the breaker closed, the others followed.
    assert len(providers.requests) >= 4
    statuses = {record.status for record in await deliveries(runtime)}
    assert statuses <= {"sent", "queued"}
    clock.advance(dt.timedelta(seconds=runtime.settings.outbox_backoff_max_seconds))
    await runtime.dispatcher.run_until_idle()
    assert {record.status for record in await deliveries(runtime)} == {"sent"}


async def test_the_provider_rate_limit_holds_messages_back(
    runtime: Runtime, providers: ScriptedProviders, clock: ManualClock, still_limiter_clock: float
) -> None:
    runtime.settings.notifications_provider_rate_limit = "1/hour"
    providers.answer(at_answer())
    await _send(runtime)
    await _send(runtime, to="+254700000002")
    assert await runtime.dispatcher.run_until_idle() == 2
    assert len(providers.requests) == 1
    rows = await _outbox(runtime)
    assert sorted(row.status for row in rows) == ["done", "pending"]
    assert any("rate limit" in (row.last_error or "") for row in rows)


async def test_email_through_sendgrid_keeps_its_message_id(
    runtime: Runtime, providers: ScriptedProviders
) -> None:
    runtime.settings.notifications_email_provider = "sendgrid"
    runtime.settings.sendgrid_api_key = runtime.settings.secret_key  # any non-empty secret
    providers.answer(lambda request: httpx2.Response(202, headers={"X-Message-Id": "sg-1"}))
    async with transaction(runtime) as session:
        await send_email(
            session, to="amina@example.co.ke", subject="Hi", text="Hello", category="x.y"
        )
    assert await runtime.dispatcher.run_until_idle() == 1
    [record] = await deliveries(runtime)
    assert (record.kind, record.provider, record.provider_message_id, record.status) == (
        "email",
        "sendgrid",
        "sg-1",
        "sent",
    )


async def test_the_file_sink_records_delivered(runtime: Runtime) -> None:
    runtime.settings.notifications_sms_provider = "file"
    await _send(runtime)
    assert await runtime.dispatcher.run_until_idle() == 1
    [record] = await deliveries(runtime)
    assert (record.provider, record.status) == ("file", "delivered")
    assert record.delivered_at is not None
    assert read_sink(runtime.settings.data_dir, "sms")[0]["body"] == BODY
