"""SMS and email through the outbox to the file sink, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import io
import json
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.notifications.messages import EMAIL_JOB, SMS_JOB
from soko.notifications.public import (
    MissingDataKeysError,
    read_sink,
    send_email,
    send_sms,
)
from soko.platform.clock import ManualClock
from soko.platform.logging import configure_logging
from soko.platform.outbox import OutboxMessage, ProcessedMessage
from soko.platform.runtime import Runtime

PHONE = "+254712345678"
CODE = "493817"
BODY = f"Your Soko code is {CODE}. It expires in 5 minutes."
ADDRESS = "Wanjiku.Kamau@example.co.ke"


@pytest.fixture(autouse=True)
def no_scheduled_jobs(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """The counts below are of the messages these tests send; the domains' cron jobs
    (releasing holds, expiring carts and orders...) would add theirs whenever the
    manual clock crosses a minute."""

    async def fire_nothing() -> None:
        return None

    monkeypatch.setattr(runtime.dispatcher, "fire_due_schedules", fire_nothing)


@asynccontextmanager
async def transaction(runtime: Runtime) -> AsyncIterator[AsyncSession]:
    """A transaction whose session carries the runtime's data keys, as the session
    factory's sessions do once it puts them in ``session.info``."""
    async with runtime.db.transaction() as session:
        session.info["data_keys"] = runtime.data_keys
        yield session


async def _outbox_rows(runtime: Runtime) -> list[OutboxMessage]:
    async with runtime.db.sessionmaker() as session:
        return list(await session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)))


def _sink_dir(runtime: Runtime) -> Path:
    return runtime.settings.data_dir / "messages"


async def test_a_committed_sms_reaches_the_sink_after_dispatch(
    runtime: Runtime, clock: ManualClock
) -> None:
    async with transaction(runtime) as session:
        await send_sms(session, to=PHONE, body=BODY, category="identity.sign_in_code")
    data_dir = runtime.settings.data_dir
    assert read_sink(data_dir, "sms") == []  # only the job delivers

    assert await runtime.dispatcher.run_until_idle() == 1
    [record] = read_sink(data_dir, "sms")
    assert record["to"] == PHONE and record["body"] == BODY
    assert record["category"] == "identity.sign_in_code"
    assert record["kind"] == "sms"
    assert dt.datetime.fromisoformat(record["created_at"]) == clock.now()
    assert read_sink(data_dir, "email") == []
    [row] = await _outbox_rows(runtime)
    assert (row.name, row.status) == (SMS_JOB, "done")
    assert row.payload["notification_id"] == record["id"]
    path = _sink_dir(runtime) / "sms.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def test_a_committed_email_reaches_the_sink_after_dispatch(runtime: Runtime) -> None:
    async with transaction(runtime) as session:
        await send_email(
            session,
            to=ADDRESS,
            subject="Reset your Soko password",
            text="Open https://soko.example/reset#t=abc to choose a new password.",
            html="<p><a href='https://soko.example/reset#t=abc'>Choose a new password</a></p>",
            category="identity.password_reset",
        )
        await send_email(
            session,
            to="buyer@example.com",
            subject="Welcome",
            text="Karibu!",
            category="identity.welcome",
        )
    assert await runtime.dispatcher.run_until_idle() == 2
    # Deliveries run concurrently: the file's order is not the sending order.
    records = read_sink(runtime.settings.data_dir, "email")
    first, second = sorted(records, key=lambda record: record["to"] != ADDRESS)
    assert first["to"] == ADDRESS  # as given: the local part's case is the mailbox's
    assert first["subject"] == "Reset your Soko password"
    assert first["text"].startswith("Open https://soko.example/reset#t=abc")
    assert first["html"].startswith("<p><a href=")
    assert first["category"] == "identity.password_reset"
    assert (second["to"], second["text"], second["html"]) == ("buyer@example.com", "Karibu!", None)
    assert first["id"] != second["id"]
    assert read_sink(runtime.settings.data_dir, "sms") == []
    assert {row.name for row in await _outbox_rows(runtime)} == {EMAIL_JOB}


async def test_nothing_leaves_when_the_transaction_rolls_back(runtime: Runtime) -> None:
    with pytest.raises(LookupError):
        async with transaction(runtime) as session:
            await send_sms(session, to=PHONE, body=BODY, category="identity.sign_in_code")
            await send_email(
                session, to=ADDRESS, subject="Hi", text="Hello", category="identity.welcome"
            )
            await session.flush()  # the rows existed inside the transaction
            assert len(list(await session.scalars(select(OutboxMessage.id)))) == 2
            raise LookupError("the sign-up failed after the message was queued")
    assert await _outbox_rows(runtime) == []
    assert await runtime.dispatcher.run_until_idle() == 0
    assert read_sink(runtime.settings.data_dir, "sms") == []
    assert read_sink(runtime.settings.data_dir, "email") == []


async def test_the_outbox_holds_no_recipient_or_text_in_clear(runtime: Runtime) -> None:
    subject = "Your reset code 771204"
    async with transaction(runtime) as session:
        await send_sms(session, to=PHONE, body=BODY, category="identity.sign_in_code")
        await send_email(
            session,
            to=ADDRESS,
            subject=subject,
            text="Mpendwa Wanjiku, use 771204.",
            html="<b>771204</b>",
            category="identity.password_reset",
        )
    cast = "CAST(payload AS TEXT)" if runtime.db.dialect == "postgresql" else "payload"
    async with runtime.db.sessionmaker() as session:
        rows = (await session.execute(text("SELECT * FROM outbox_messages"))).all()
        payloads = (await session.execute(text(f"SELECT {cast} FROM outbox_messages"))).all()
    assert len(rows) == 2
    dump = repr(rows) + repr(payloads)
    secrets = [PHONE, PHONE[1:], PHONE[-9:], CODE, "771204", "Wanjiku", "example.co.ke", subject]
    for secret in secrets:
        assert secret.lower() not in dump.lower(), secret
    # What is in clear is what an operator may see; the rest is one ciphertext.
    for row in await _outbox_rows(runtime):
        assert set(row.payload) == {"v", "notification_id", "category", "created_at", "sealed"}
        assert row.payload["sealed"].startswith(f"v1.{runtime.data_keys.keyring.active_key_id}.")
    # ...which the delivery opens.
    assert await runtime.dispatcher.run_until_idle() == 2
    assert read_sink(runtime.settings.data_dir, "sms")[0]["body"] == BODY


async def test_a_sealed_text_moved_to_another_message_does_not_open(
    runtime: Runtime, clock: ManualClock
) -> None:
    async with transaction(runtime) as session:
        await send_sms(session, to=PHONE, body=BODY, category="identity.sign_in_code")
        await send_sms(session, to="+255712000111", body="Hello", category="marketing.hello")
    first, second = await _outbox_rows(runtime)
    async with runtime.db.transaction() as session:
        forged = {**second.payload, "sealed": first.payload["sealed"]}
        await session.execute(
            update(OutboxMessage).where(OutboxMessage.id == second.id).values(payload=forged)
        )
        await session.execute(delete(OutboxMessage).where(OutboxMessage.id == first.id))
    assert await runtime.dispatcher.run_until_idle() == 1
    [row] = await _outbox_rows(runtime)
    assert (row.status, row.attempts) == ("pending", 1)
    assert row.last_error is not None and row.last_error.startswith("DecryptionError")
    assert CODE not in row.last_error and PHONE not in row.last_error
    assert read_sink(runtime.settings.data_dir, "sms") == []


async def test_a_delivery_that_failed_is_retried_into_one_line(
    runtime: Runtime, clock: ManualClock
) -> None:
    # The sink's directory cannot be created: a file stands where it should be.
    runtime.settings.data_dir.mkdir(parents=True, exist_ok=True)
    blocker = _sink_dir(runtime)
    blocker.write_text("not a directory")
    async with transaction(runtime) as session:
        await send_sms(session, to=PHONE, body=BODY, category="identity.sign_in_code")
    assert await runtime.dispatcher.run_until_idle() == 1
    [row] = await _outbox_rows(runtime)
    assert (row.status, row.attempts) == ("pending", 1)
    assert row.last_error is not None

    blocker.unlink()
    clock.advance(dt.timedelta(seconds=runtime.settings.outbox_backoff_max_seconds))
    assert await runtime.dispatcher.run_until_idle() == 1
    assert await runtime.dispatcher.run_until_idle() == 0
    [record] = read_sink(runtime.settings.data_dir, "sms")
    assert record["body"] == BODY
    [row] = await _outbox_rows(runtime)
    assert (row.status, row.attempts) == ("done", 2)


async def test_a_redelivery_after_a_crash_past_the_write_adds_no_line(
    runtime: Runtime, clock: ManualClock
) -> None:
    async with transaction(runtime) as session:
        await send_sms(session, to=PHONE, body=BODY, category="identity.sign_in_code")
        await send_email(session, to=ADDRESS, subject="Hi", text="Hello", category="x.hello")
    assert await runtime.dispatcher.run_until_idle() == 2
    # A worker wrote the lines and died before its transaction committed: the rows are
    # still claimed with a lease that has run out, and no "processed" marker exists.
    async with runtime.db.transaction() as session:
        await session.execute(delete(ProcessedMessage))
        await session.execute(
            update(OutboxMessage).values(
                status="running",
                locked_by="a-dead-worker",
                locked_until=clock.now() - dt.timedelta(seconds=1),
                completed_at=None,
            )
        )
    assert await runtime.dispatcher.run_until_idle() == 2
    async with runtime.db.sessionmaker() as session:
        markers = list(await session.scalars(select(ProcessedMessage.handler)))
    assert sorted(markers) == [EMAIL_JOB, SMS_JOB]  # the handlers ran again...
    assert len(read_sink(runtime.settings.data_dir, "sms")) == 1  # ...and wrote nothing
    assert len(read_sink(runtime.settings.data_dir, "email")) == 1
    assert {row.status for row in await _outbox_rows(runtime)} == {"done"}


async def test_a_dedupe_key_sends_once(runtime: Runtime) -> None:
    for _ in range(2):
        async with transaction(runtime) as session:
            await send_sms(
                session,
                to=PHONE,
                body=BODY,
                category="identity.sign_in_code",
                dedupe_key="challenge:0190f1c2",
            )
    # The same key for email is another message: keys are per kind.
    async with transaction(runtime) as session:
        await send_email(
            session,
            to=ADDRESS,
            subject="Hi",
            text="Hello",
            category="x.hello",
            dedupe_key="challenge:0190f1c2",
        )
    assert await runtime.dispatcher.run_until_idle() == 2
    assert len(read_sink(runtime.settings.data_dir, "sms")) == 1
    assert len(read_sink(runtime.settings.data_dir, "email")) == 1


async def test_a_session_without_data_keys_is_refused(runtime: Runtime) -> None:
    async with runtime.db.transaction() as session:
        session.info.pop("data_keys", None)
        with pytest.raises(MissingDataKeysError):
            await send_sms(session, to=PHONE, body=BODY, category="identity.sign_in_code")
        with pytest.raises(MissingDataKeysError):
            await send_email(session, to=ADDRESS, subject="Hi", text="x", category="x.hello")
    assert await _outbox_rows(runtime) == []


@pytest.mark.parametrize(
    ("kind", "arguments"),
    [
        ("sms", {"to": "0712345678"}),
        ("sms", {"to": "+254 712 345 678"}),
        ("sms", {"body": "   "}),
        ("sms", {"body": "x" * 1601}),
        ("sms", {"category": "Sign In"}),
        ("sms", {"category": ""}),
        ("sms", {"dedupe_key": ""}),
        ("sms", {"dedupe_key": "k" * 300}),
        ("email", {"to": "not-an-address"}),
        ("email", {"to": "a@example.com, b@example.com"}),
        ("email", {"subject": "Hi\r\nBcc: everyone@example.com"}),
        ("email", {"subject": " "}),
        ("email", {"text": ""}),
    ],
)
async def test_malformed_messages_are_refused(
    runtime: Runtime, kind: str, arguments: dict[str, Any]
) -> None:
    async with transaction(runtime) as session:
        if kind == "sms":
            values: dict[str, Any] = {"to": PHONE, "body": BODY, "category": "x.y"}
            with pytest.raises(ValueError):
                await send_sms(session, **{**values, **arguments})
        else:
            values = {"to": ADDRESS, "subject": "Hi", "text": "Hello", "category": "x.y"}
            with pytest.raises(ValueError):
                await send_email(session, **{**values, **arguments})
    assert await _outbox_rows(runtime) == []


async def test_the_log_line_names_the_message_without_its_text(
    runtime: Runtime, tmp_path: Path
) -> None:
    stream = io.StringIO()
    configure_logging(runtime.settings, stream=stream)
    async with transaction(runtime) as session:
        await send_sms(session, to=PHONE, body=BODY, category="identity.sign_in_code")
        await send_email(session, to=ADDRESS, subject="Code", text=BODY, category="x.code")
    assert await runtime.dispatcher.run_until_idle() == 2
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    written = {line["event"]: line for line in lines if "development sink" in line["event"]}
    sms = written["sms written to the development sink"]
    email = written["email written to the development sink"]
    assert sms["notification_id"] == read_sink(runtime.settings.data_dir, "sms")[0]["id"]
    assert sms["phone"] == "***678" and sms["category"] == "identity.sign_in_code"
    assert email["email"] == "***@example.co.ke"
    output = stream.getvalue()
    assert CODE not in output and PHONE not in output and "Wanjiku" not in output
