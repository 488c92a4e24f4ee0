"""``Runtime.transaction`` and ``on_rollback``: a transaction outside any request, kept as
a request's is, and work done apart from a transaction undone when it does not commit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from structlog.testing import capture_logs

from soko.platform.ids import uuid7
from soko.platform.outbox import MessageKind, OutboxMessage
from soko.platform.runtime import Runtime, invalidate_after_commit, on_rollback


class Calls:
    def __init__(self) -> None:
        self.made: list[str] = []

    def recorder(self, name: str, *, fail: bool = False) -> Callable[[], Awaitable[None]]:
        async def callback() -> None:
            self.made.append(name)
            if fail:
                raise RuntimeError(f"{name} failed")

        return callback


async def outbox_ids(runtime: Runtime) -> list[object]:
    async with runtime.db.transaction(read_only=True) as session:
        return list(await session.scalars(select(OutboxMessage.id)))


def a_message(runtime: Runtime) -> OutboxMessage:
    now = runtime.clock.now()
    return OutboxMessage(
        id=uuid7(),
        kind=MessageKind.event.value,
        name="test.happened",
        payload={"n": 1},
        available_at=now,
        created_at=now,
    )


async def test_a_committed_transaction_invalidates_its_tags_and_forgets_its_undo(
    runtime: Runtime,
) -> None:
    await runtime.cache.set("answer", 42, ttl=60, tags=["things"])
    calls = Calls()
    async with runtime.transaction() as session:
        invalidate_after_commit(session, "things")
        on_rollback(session, calls.recorder("undo"))
        # Still cached while the transaction is open: a reader may not see it yet.
        assert await runtime.cache.get("answer") == 42
    assert await runtime.cache.get("answer") is None
    assert calls.made == []


async def test_an_error_rolls_back_then_undoes_what_was_done_apart(runtime: Runtime) -> None:
    await runtime.cache.set("answer", 42, ttl=60, tags=["things"])
    calls = Calls()
    with pytest.raises(LookupError):
        async with runtime.transaction() as session:
            session.add(a_message(runtime))
            await session.flush()
            invalidate_after_commit(session, "things")
            on_rollback(session, calls.recorder("first"))
            on_rollback(session, calls.recorder("second"))
            raise LookupError("no such thing")
    assert calls.made == ["first", "second"]
    assert await outbox_ids(runtime) == []
    assert await runtime.cache.get("answer") == 42  # nothing committed, nothing dropped


async def test_a_failed_commit_undoes_too(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = Calls()

    async def refuse(self: AsyncSession) -> None:
        raise ConnectionResetError("connection lost during COMMIT")

    with pytest.raises(ConnectionResetError):
        async with runtime.transaction() as session:
            on_rollback(session, calls.recorder("undo"))
            monkeypatch.setattr(AsyncSession, "commit", refuse)
    monkeypatch.undo()
    assert calls.made == ["undo"]


async def test_a_failing_undo_is_logged_and_the_next_still_runs(runtime: Runtime) -> None:
    calls = Calls()
    with capture_logs() as logs, pytest.raises(LookupError):
        async with runtime.transaction() as session:
            on_rollback(session, calls.recorder("broken", fail=True))
            on_rollback(session, calls.recorder("fine"))
            raise LookupError("no such thing")
    assert calls.made == ["broken", "fine"]
    assert [log["log_level"] for log in logs if "undoing" in log["event"]] == ["error"]


async def test_writes_of_a_committed_transaction_stay(runtime: Runtime) -> None:
    message = a_message(runtime)
    async with runtime.transaction() as session:
        session.add(message)
    assert await outbox_ids(runtime) == [message.id]
