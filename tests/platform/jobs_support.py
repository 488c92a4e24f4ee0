"""Test support for the outbox and dispatcher tests: a database, a clock, a registry."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.platform.clock import ManualClock
from soko.platform.config import Settings
from soko.platform.db import Database, create_engine
from soko.platform.jobs import Dispatcher, JobRegistry
from soko.platform.outbox import OutboxMessage, ProcessedMessage


class Outbox:
    """One test's view of the outbox: its database, clock, settings and registry."""

    def __init__(self, url: str, settings: Settings, clock: ManualClock) -> None:
        self.db = Database(create_engine(url))
        self.settings = settings
        self.clock = clock
        self.registry = JobRegistry()
        self._dispatchers: list[Dispatcher] = []

    def dispatcher(self, *, settings: Settings | None = None, **overrides: Any) -> Dispatcher:
        values: dict[str, Any] = {
            "db": self.db,
            "settings": settings or self.settings,
            "clock": self.clock,
            "registry": self.registry,
        }
        values.update(overrides)
        dispatcher = Dispatcher(**values)
        self._dispatchers.append(dispatcher)
        return dispatcher

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        async with self.db.transaction() as session:
            yield session

    async def messages(self) -> list[OutboxMessage]:
        async with self.db.sessionmaker() as session:
            rows = await session.scalars(select(OutboxMessage).order_by(OutboxMessage.id))
            return list(rows)

    async def message(self, message_id: uuid.UUID) -> OutboxMessage:
        async with self.db.sessionmaker() as session:
            row = await session.get(OutboxMessage, message_id)
            assert row is not None
            return row

    async def markers(self) -> list[tuple[str, uuid.UUID]]:
        async with self.db.sessionmaker() as session:
            rows = await session.execute(
                select(ProcessedMessage.handler, ProcessedMessage.message_id)
            )
            return [(row.handler, row.message_id) for row in rows]

    async def redeliver(self, message_id: uuid.UUID) -> None:
        """Put a finished message back to pending, as a duplicate delivery would."""
        async with self.db.transaction() as session:
            await session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.id == message_id)
                .values(status="pending", available_at=self.clock.now(), completed_at=None)
            )

    async def close(self) -> None:
        for dispatcher in self._dispatchers:
            if not dispatcher.stopping:
                await dispatcher.stop(0)
        await self.db.dispose()
