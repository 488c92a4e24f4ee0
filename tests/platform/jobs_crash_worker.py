"""A worker process for the crash test (``python -m tests.platform.jobs_crash_worker``).

It registers one job whose first attempt writes its effect row inside its transaction,
says so by creating a file, and then waits for a release file that the test never
creates: the process sits between claim and completion until the test kills it.
Settings come from ``SOKO_*`` environment variables like any Soko process.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Integer, MetaData, Table, Uuid, insert

from soko.platform.clock import SystemClock
from soko.platform.config import load_settings
from soko.platform.db import Database, create_engine
from soko.platform.jobs import Dispatcher, JobContext, JobRegistry

JOB_NAME = "crash_test.write_effect"

# Deliberately without a unique constraint: a second effect would show as a second row.
effects_metadata = MetaData()
crash_effects = Table(
    "jobs_crash_effects",
    effects_metadata,
    Column("message_id", Uuid, nullable=False),
    Column("attempt", Integer, nullable=False),
)

registry = JobRegistry()


@registry.job(JOB_NAME)
async def write_effect(ctx: JobContext, payload: dict[str, Any]) -> None:
    await ctx.session.execute(
        insert(crash_effects).values(message_id=ctx.message_id, attempt=ctx.attempt)
    )
    await ctx.session.flush()
    (Path(payload["signal_dir"]) / f"attempt-{ctx.attempt}-wrote-effect").touch()
    release = Path(payload["release_file"])
    while not release.exists():
        await asyncio.sleep(0.05)


async def main() -> None:
    settings = load_settings()
    db = Database(create_engine(settings.effective_database_url))
    dispatcher = Dispatcher(db=db, settings=settings, clock=SystemClock(), registry=registry)
    try:
        await dispatcher.run()
    finally:
        await db.dispose()


if __name__ == "__main__":
    asyncio.run(main())
