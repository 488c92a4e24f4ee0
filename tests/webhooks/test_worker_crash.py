"""A worker killed while a receiver is still answering: the attempt is made again by
another worker, with the same ``webhook-id``, and nothing is lost."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from soko.platform.clock import ManualClock, SystemClock
from soko.platform.jobs import Dispatcher
from soko.platform.outbox import OutboxMessage
from soko.platform.runtime import Runtime
from soko.webhooks.service import DELIVER_JOB
from tests.cart.catalog_support import Shop
from tests.conftest import TEST_SECRET
from tests.webhooks.conftest import Hooks, attempts, deliveries, order_payload, publish_event
from tests.webhooks.receiver import running_receiver
from tests.webhooks.test_delivery import verified

REPO_ROOT = Path(__file__).resolve().parents[2]
# Bounds on waiting for another process; nothing here measures how long anything took.
START_TIMEOUT = 60.0
TAKEOVER_ATTEMPTS = 100


def _worker_environment(database_url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOKO_")}
    env.update(
        SOKO_ENV="test",
        SOKO_DATA_DIR=str(tmp_path / "worker-data"),
        # The test's key: the worker must decrypt the endpoint's secret.
        SOKO_SECRET_KEY=TEST_SECRET,
        SOKO_DATABASE_URL=database_url,
        SOKO_OUTBOX_POLL_SECONDS="0.05",
        SOKO_OUTBOX_LEASE_SECONDS="2",
        SOKO_WEBHOOKS_ALLOW_PRIVATE_ADDRESSES="true",
        SOKO_WEBHOOKS_TIMEOUT_SECONDS="60",
        SOKO_LOG_FORMAT="json",
        PYTHONPATH=str(REPO_ROOT),
    )
    return env


@pytest.mark.slow
@pytest.mark.parametrize("allow_private_addresses", [True])
async def test_a_worker_killed_mid_delivery_leads_to_a_redelivery_with_the_same_id(
    runtime: Runtime,
    database_url: str,
    tmp_path: Path,
    shop_hooks: Callable[[], Awaitable[tuple[Shop, Hooks]]],
) -> None:
    shop, hooks = await shop_hooks()
    hold = threading.Event()  # the receiver keeps the first request waiting
    with running_receiver(hold=hold) as receiver:
        endpoint = await hooks.create(receiver.url, "order.shipped")
        event_id = await publish_event(runtime, "order.shipped", order_payload(shop.seller_id))

        log = tmp_path / "worker.log"
        with log.open("wb") as output:
            worker = subprocess.Popen(
                [sys.executable, "-m", "tests.webhooks.crash_worker"],
                cwd=REPO_ROOT,
                env=_worker_environment(database_url, tmp_path),
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + START_TIMEOUT
            while not receiver.requests:
                if worker.poll() is not None or loop.time() > deadline:
                    pytest.fail(f"the worker never called:\n{log.read_text(errors='replace')}")
                await asyncio.sleep(0.05)
            # The request is at the receiver; the worker waits for the answer. Kill it.
            os.kill(worker.pid, signal.SIGKILL)
            assert worker.wait(timeout=START_TIMEOUT) == -signal.SIGKILL
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

        # Nothing of the attempt was recorded; the job is still the dead worker's.
        [delivery] = await deliveries(runtime, endpoint["id"])
        assert (delivery.status, delivery.attempts) == ("pending", 0)
        assert await attempts(runtime, endpoint["id"]) == []
        async with runtime.db.transaction(read_only=True) as session:
            jobs = (
                await session.scalars(
                    select(OutboxMessage).where(OutboxMessage.name == DELIVER_JOB)
                )
            ).all()
        assert [(job.status, f":{worker.pid}:" in (job.locked_by or "")) for job in jobs] == [
            ("running", True)
        ]

        # Another worker, its clock past the dead worker's lease, takes the job over.
        hold.set()
        rescuer = Dispatcher(
            db=runtime.db,
            settings=runtime.settings.model_copy(update={"outbox_lease_seconds": 2.0}),
            clock=ManualClock(SystemClock().now() + dt.timedelta(seconds=30)),
            registry=runtime.registry,
            services=runtime,
            worker_id="rescuer",
        )
        for _ in range(TAKEOVER_ATTEMPTS):
            await rescuer.run_until_idle()
            # PostgreSQL may take a moment to notice the killed connection's locks.
            if (await deliveries(runtime, endpoint["id"]))[0].status == "succeeded":
                break
            await asyncio.sleep(0.1)

    first, second = receiver.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == f"evt_{event_id.hex}"
    assert first.body == second.body
    assert verified(endpoint["secret"], first)["id"] == verified(endpoint["secret"], second)["id"]
    [delivery] = await deliveries(runtime, endpoint["id"])
    assert (delivery.status, delivery.attempts) == ("succeeded", 1)
    assert [
        (line.attempt, line.status_code) for line in await attempts(runtime, endpoint["id"])
    ] == [(1, 200)]
