"""The embedded file sink on its own: one line per notification, whatever the writers."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import stat
from pathlib import Path

import pytest

from soko.notifications import channels
from soko.notifications.channels import FileSink, sink_record
from soko.notifications.messages import Email, Sms
from soko.notifications.public import read_sink
from soko.platform.ids import uuid7

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def _sms(body: str = "Your Soko code is 123456", to: str = "+254712345678") -> Sms:
    return Sms(id=uuid7(), created_at=NOW, category="identity.sign_in_code", to=to, body=body)


async def test_concurrent_writers_and_duplicates_leave_one_whole_line_each(
    tmp_path: Path,
) -> None:
    # Several sinks (as in several workers) over one directory, every message delivered
    # three times at once, bodies large enough that unguarded writes would tear.
    sinks = [FileSink.in_data_dir(tmp_path) for _ in range(4)]
    messages = [_sms(body=f"{n:04d} " + "x" * 20_000) for n in range(60)]
    deliveries = [
        sinks[(n + copy) % len(sinks)].deliver(message)
        for copy in range(3)
        for n, message in enumerate(messages)
    ]
    await asyncio.gather(*deliveries)

    raw_lines = (tmp_path / "messages" / "sms.jsonl").read_bytes().splitlines()
    assert len(raw_lines) == len(messages)
    records = [json.loads(line) for line in raw_lines]
    assert sorted(r["id"] for r in records) == sorted(str(m.id) for m in messages)
    by_id = {str(m.id): m for m in messages}
    assert all(r["body"] == by_id[r["id"]].body for r in records)


async def test_a_duplicate_is_found_across_read_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiny reads put chunk boundaries inside every id marker at some offset.
    monkeypatch.setattr(channels, "_READ_CHUNK", 7)
    sink = FileSink.in_data_dir(tmp_path)
    messages = [_sms(body="é" * n) for n in range(1, 12)]
    for message in messages:
        await sink.deliver(message)
    for message in reversed(messages):
        await sink.deliver(message)
    assert [r["id"] for r in read_sink(tmp_path, "sms")] == [str(m.id) for m in messages]


async def test_a_text_quoting_another_id_does_not_hide_that_message(tmp_path: Path) -> None:
    sink = FileSink.in_data_dir(tmp_path)
    later = _sms()
    await sink.deliver(_sms(body=f'\n{{"id":"{later.id}"'))
    await sink.deliver(later)
    assert [r["id"] for r in read_sink(tmp_path, "sms")][1] == str(later.id)


async def test_a_line_torn_by_a_crash_is_ended_and_skipped_by_readers(tmp_path: Path) -> None:
    sink = FileSink.in_data_dir(tmp_path)
    first = _sms()
    await sink.deliver(first)
    path = sink.path_for(first.kind)
    with path.open("ab") as handle:
        handle.write(b'{"id":"0190f1c2-torn","kind":"sms","bo')
    second = _sms(body="second")
    await sink.deliver(second)
    assert [r["id"] for r in read_sink(tmp_path, "sms")] == [str(first.id), str(second.id)]


async def test_email_records_and_file_permissions(tmp_path: Path) -> None:
    sink = FileSink.in_data_dir(tmp_path)
    (tmp_path / "messages").mkdir(mode=0o755)
    path = tmp_path / "messages" / "email.jsonl"
    path.touch(mode=0o644)
    path.chmod(0o644)
    email = Email(
        id=uuid7(),
        created_at=NOW,
        category="identity.verify_email",
        to="amina@example.com",
        subject="Confirm your email",
        text="Confirm: https://soko.example/v#abc",
        html=None,
    )
    await sink.deliver(email)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # tightened, as it holds secrets
    [record] = read_sink(tmp_path, "email")
    assert record == sink_record(email)
    assert list(record) == ["id", "kind", "created_at", "category", "to", "subject", "text", "html"]
    assert record["created_at"] == "2030-01-01T00:00:00+00:00"


def test_reading_a_sink_that_was_never_written(tmp_path: Path) -> None:
    assert read_sink(tmp_path, "sms") == []
    assert read_sink(tmp_path, "email") == []
