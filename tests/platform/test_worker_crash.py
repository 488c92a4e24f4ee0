"""A worker killed between claim and completion: its job runs again, its effect once."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from soko.platform.clock import ManualClock, SystemClock
from soko.platform.config import Settings
from soko.platform.db import Database, create_engine
from soko.platform.jobs import Dispatcher
from soko.platform.outbox import OutboxMessage, enqueue
from tests.platform import jobs_crash_worker
from tests.platform.jobs_crash_worker import JOB_NAME, crash_effects, effects_metadata

REPO_ROOT = Path(__file__).resolve().parents[2]
# Bounds on waiting for another process; nothing here measures how long anything took.
START_TIMEOUT = 60.0
TAKEOVER_ATTEMPTS = 100


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(create_engine(database_url))
    async with database.engine.begin() as conn:
        await conn.run_sync(effects_metadata.create_all)
    try:
        yield database
    finally:
        async with database.engine.begin() as conn:
            await conn.run_sync(effects_metadata.drop_all)
        await database.dispose()


def _worker_environment(database_url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOKO_")}
    env.update(
        SOKO_ENV="test",
        SOKO_DATA_DIR=str(tmp_path / "worker-data"),
        SOKO_SECRET_KEY="crash-test-secret-key-long-enough-0123456789",
        SOKO_DATABASE_URL=database_url,
        SOKO_OUTBOX_DISPATCH="worker",
        SOKO_OUTBOX_POLL_SECONDS="0.05",
        SOKO_OUTBOX_LEASE_SECONDS="2",
        SOKO_LOG_FORMAT="json",
        PYTHONPATH=str(REPO_ROOT),
    )
    return env


async def _wait_for_file(path: Path, worker: subprocess.Popen[bytes], log: Path) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while not path.exists():
        if worker.poll() is not None:
            pytest.fail(f"the worker exited early:\n{log.read_text(errors='replace')}")
        if loop.time() > deadline:
            pytest.fail(f"the worker never ran the job:\n{log.read_text(errors='replace')}")
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_a_killed_workers_job_runs_again_with_its_effect_once(
    db: Database, database_url: str, settings: Settings, tmp_path: Path
) -> None:
    signal_dir = tmp_path / "signals"
    signal_dir.mkdir()
    release_file = tmp_path / "release"
    async with db.transaction() as session:
        message_id = await enqueue(
            session,
            JOB_NAME,
            {"signal_dir": str(signal_dir), "release_file": str(release_file)},
            now=SystemClock().now(),
        )

    log = tmp_path / "worker.log"
    with log.open("wb") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "tests.platform.jobs_crash_worker"],
            cwd=REPO_ROOT,
            env=_worker_environment(database_url, tmp_path),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        await _wait_for_file(signal_dir / "attempt-1-wrote-effect", worker, log)
        # The first attempt has written its effect and is blocked before completing.
        os.kill(worker.pid, signal.SIGKILL)
        assert worker.wait(timeout=START_TIMEOUT) == -signal.SIGKILL
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()

    async with db.sessionmaker() as session:
        row = await session.get(OutboxMessage, message_id)
        assert row is not None
        assert (row.status, row.attempts) == ("running", 1)
        dead_worker = row.locked_by
        assert dead_worker is not None and f":{worker.pid}:" in dead_worker
        assert await session.scalar(select(func.count()).select_from(crash_effects)) == 0

    # A second worker, its clock past the dead worker's lease, takes the job over.
    release_file.touch()
    rescuer_clock = ManualClock(SystemClock().now() + dt.timedelta(minutes=5))
    rescuer = Dispatcher(
        db=db,
        settings=settings.model_copy(update={"outbox_lease_seconds": 2.0}),
        clock=rescuer_clock,
        registry=jobs_crash_worker.registry,
        worker_id="rescuer",
    )
    for _ in range(TAKEOVER_ATTEMPTS):
        # PostgreSQL may take a moment to notice the killed connection and drop its lock.
        if await rescuer.run_until_idle():
            break
        await asyncio.sleep(0.1)

    async with db.sessionmaker() as session:
        row = await session.get(OutboxMessage, message_id)
        assert row is not None
        assert (row.status, row.attempts, row.locked_by) == ("done", 2, None)
        effects = (await session.execute(select(crash_effects))).all()
        assert [(effect.message_id, effect.attempt) for effect in effects] == [(message_id, 2)]
    assert (signal_dir / "attempt-2-wrote-effect").exists()
