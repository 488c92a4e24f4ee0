"""Webhook deliveries per second by one worker, against a local receiver.

Registers ``BENCH_ENDPOINTS`` store endpoints (one per store) pointing at a receiver in
a process of its own (raw HTTP/1.1 on keep-alive connections, answering 204 at once),
publishes ``BENCH_EVENTS`` ``order.paid`` events spread over the stores, then lets one
dispatcher (one worker, ``BENCH_CONCURRENCY`` handlers at a time) fan them out and
deliver them, running its loop as ``soko worker`` does until the receiver has every
event. It prints deliveries per second for the whole drain, the worker's CPU, and the
median and p99 of one attempt as the delivery log measured it.

Each delivery is a signed POST through the address guard (resolve, vet, pinned
connection), made inside its job's transaction, with its log line and the next job
written in that same transaction. Deliveries of one endpoint go one at a time (the
ordering guarantee), so more endpoints let the worker overlap more requests.

    python -m bench webhook_delivery             # SQLite in a temporary directory
    BENCH_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/soko_bench \\
        python -m bench webhook_delivery         # a PostgreSQL database (emptied)
    BENCH_EVENTS=5000 BENCH_ENDPOINTS=16 python -m bench webhook_delivery
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time
import uuid
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from soko.app import load_handlers, load_models
from soko.platform.config import Settings
from soko.platform.db import Base
from soko.platform.logging import configure_logging
from soko.platform.outbox import OutboxMessage, publish
from soko.platform.runtime import Runtime
from soko.platform.schema import create_current_schema
from soko.webhooks.models import WebhookAttempt, WebhookDelivery
from soko.webhooks.service import DELIVER_JOB, FAN_OUT_SUBSCRIBER, Scope, create_endpoint

ANSWER = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"


def _serve(port_out: Any, count: Synchronized[int]) -> None:
    """The receiver process: parse each request just enough, answer 204, count."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                await reader.readexactly(length)
                with count.get_lock():
                    count.value += 1
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port_out.put(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(main())


async def main(_argv: list[str]) -> None:
    events = int(os.environ.get("BENCH_EVENTS", "2000"))
    endpoints = int(os.environ.get("BENCH_ENDPOINTS", "8"))
    concurrency = int(os.environ.get("BENCH_CONCURRENCY", "8"))
    url = os.environ.get("BENCH_DATABASE_URL")
    workdir = Path(tempfile.mkdtemp(prefix="soko-bench-"))
    url = url or f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
    configure_logging(Settings(_env_file=None, log_level="WARNING", log_format="json"))  # type: ignore[call-arg]
    load_models()
    load_handlers()

    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    received = context.Value("q", 0)
    receiver = context.Process(target=_serve, args=(ports, received), daemon=True)
    receiver.start()
    port = ports.get(timeout=30)

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=workdir,
        database_url=url,
        secret_key="bench-secret-key-bench-secret-key-0123",
        log_level="WARNING",
        log_format="json",
        outbox_batch_size=100,
        outbox_concurrency=concurrency,
        outbox_poll_seconds=0.05,
        # The receiver is on loopback: the bench, like the tests, relaxes the guard
        # (the guard's resolve-and-vet still runs for every new connection).
        webhooks_allow_private_addresses=True,
    )
    runtime = Runtime(settings)
    async with runtime.db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(create_current_schema)
    try:
        sellers = [uuid.uuid4() for _ in range(endpoints)]
        async with runtime.db.transaction() as session:
            for seller_id in sellers:
                await create_endpoint(
                    session,
                    runtime,
                    Scope(seller_id=seller_id, user_id=uuid.uuid4()),
                    url=f"http://127.0.0.1:{port}/hooks",
                    event_types=["order.paid"],
                )
        for start in range(0, events, 100):
            async with runtime.db.transaction() as session:
                for index in range(start, min(start + 100, events)):
                    await publish(
                        session,
                        "order.paid",
                        {
                            "order_id": str(uuid.uuid4()),
                            "group_id": str(uuid.uuid4()),
                            "number": f"SK-{index:06d}",
                            "buyer_id": str(uuid.uuid4()),
                            "seller_id": str(sellers[index % endpoints]),
                            "from_status": "pending_payment",
                            "to_status": "paid",
                            "actor_id": None,
                            "actor_kind": "system",
                            "at": "2030-01-01T00:00:00+00:00",
                            "currency": "KES",
                        },
                    )

        began = time.perf_counter()
        cpu_began = time.process_time()
        # The dispatcher's own loop, as `soko worker` runs it, until every event is in.
        worker = asyncio.create_task(runtime.dispatcher.run())
        deadline = began + float(os.environ.get("BENCH_TIMEOUT", "600"))
        while received.value < events and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        seconds = time.perf_counter() - began
        cpu = time.process_time() - cpu_began
        await runtime.dispatcher.stop(5)
        await worker

        async with runtime.db.transaction(read_only=True) as session:
            succeeded = await session.scalar(
                select(func.count())
                .select_from(WebhookDelivery)
                .where(WebhookDelivery.status == "succeeded")
            )
            durations = sorted((await session.scalars(select(WebhookAttempt.duration_ms))).all())
            attempts = len(durations)
            jobs = dict(
                (
                    await session.execute(
                        select(OutboxMessage.name, func.count())
                        .where(OutboxMessage.name.like("webhooks.%"))
                        .group_by(OutboxMessage.name)
                    )
                ).all()
            )
            fan_outs = await session.scalar(
                select(func.count())
                .select_from(OutboxMessage)
                .where(OutboxMessage.handler == FAN_OUT_SUBSCRIBER)
            )
    finally:
        await runtime.stop()
        receiver.terminate()
        receiver.join(timeout=10)

    p99 = durations[min(len(durations) - 1, int(len(durations) * 0.99))] if durations else 0
    print(f"backend            {runtime.db.dialect}")
    print(f"events             {events} over {endpoints} endpoints, concurrency {concurrency}")
    print(f"drain              {seconds:.2f} s (fan-out and delivery, one worker)")
    print(f"deliveries         {succeeded / seconds:,.0f}/s per worker")
    print(f"outbox messages    {fan_outs} fan-outs, {jobs.get(DELIVER_JOB, 0)} delivery jobs")
    per_delivery = 1000 * cpu / max(attempts, 1)
    print(f"worker CPU         {cpu / seconds:.2f} cores ({per_delivery:.2f} ms a delivery)")
    print(
        f"attempt            p50 {statistics.median(durations) if durations else 0:.0f} ms, "
        f"p99 {p99} ms"
    )
    print(
        f"invariant          {succeeded} delivered, {attempts} attempts, receiver counted "
        f"{received.value}, expected {events}"
    )
    if succeeded != events or attempts != events or received.value != events:
        raise SystemExit("invariant broken: every event must reach its endpoint exactly once")
