"""Outbox dispatch throughput: jobs completed per second by one dispatcher.

Enqueues N jobs (in transactions of 100), then lets one dispatcher drain them and prints
jobs/s and the time to drain. Each job writes nothing but its own bookkeeping (claim,
processed marker, completion), so the figure is the outbox's own overhead.

    python -m bench outbox                       # SQLite in a temporary directory
    BENCH_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/soko_bench \\
        python -m bench outbox                   # an existing, empty PostgreSQL database
    BENCH_JOBS=20000 python -m bench outbox
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from soko.app import load_models
from soko.platform.clock import SystemClock
from soko.platform.config import Settings
from soko.platform.db import Base, Database, create_engine
from soko.platform.jobs import Dispatcher, JobContext, JobRegistry
from soko.platform.logging import configure_logging
from soko.platform.outbox import OutboxMessage, enqueue


async def main(_argv: list[str]) -> None:
    jobs = int(os.environ.get("BENCH_JOBS", "5000"))
    url = os.environ.get("BENCH_DATABASE_URL")
    workdir = Path(tempfile.mkdtemp(prefix="soko-bench-"))
    url = url or f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
    configure_logging(Settings(_env_file=None, log_level="WARNING", log_format="json"))  # type: ignore[call-arg]
    load_models()
    db = Database(create_engine(url))
    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)

    registry = JobRegistry()
    done = 0

    @registry.job("bench.noop")
    async def noop(ctx: JobContext, payload: dict[str, Any]) -> None:
        nonlocal done
        done += 1

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=workdir,
        database_url=url,
        secret_key="bench-secret-key-bench-secret-key-0123",
        outbox_batch_size=100,
        outbox_concurrency=int(os.environ.get("BENCH_CONCURRENCY", "8")),
        outbox_poll_seconds=0.01,
    )
    began = time.perf_counter()
    for start in range(0, jobs, 100):
        async with db.transaction() as session:
            for index in range(start, min(start + 100, jobs)):
                await enqueue(session, "bench.noop", {"n": index})
    enqueue_seconds = time.perf_counter() - began

    dispatcher = Dispatcher(
        db=db, settings=settings, clock=SystemClock(), registry=registry, services=None
    )
    began = time.perf_counter()
    await dispatcher.run_until_idle()
    drain_seconds = time.perf_counter() - began

    async with db.transaction() as session:
        finished = await session.scalar(
            select(func.count()).select_from(OutboxMessage).where(OutboxMessage.status == "done")
        )
    await db.dispose()
    backend = db.dialect
    print(f"backend            {backend}")
    print(f"jobs               {jobs}")
    print(f"enqueue            {jobs / enqueue_seconds:,.0f} jobs/s ({enqueue_seconds:.2f} s)")
    print(f"dispatch           {jobs / drain_seconds:,.0f} jobs/s ({drain_seconds:.2f} s)")
    print(f"invariant          handler ran {done} times, {finished} rows done, expected {jobs}")
    if done != jobs or finished != jobs:
        raise SystemExit("invariant broken: every job must run exactly once")
