"""Notification delivery throughput: messages delivered per second by one worker.

Queues N emails and N SMS through ``soko.notifications.public`` (transactions of 50 of
each, every message with its delivery record), then lets one dispatcher (one worker) deliver
them through the real provider channels to local receivers: an aiosmtpd SMTP server for
email (``SOKO_NOTIFICATIONS_EMAIL_PROVIDER=smtp``) and a small HTTP server that answers
like Africa's Talking for SMS (``africastalking``). Prints messages delivered per
second, and checks that every message arrived once and every delivery record is
``sent``.

    python -m bench notifications                  # SQLite in a temporary directory
    python -m bench.notifications                  # the same, run directly
    BENCH_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/soko_bench \\
        python -m bench notifications              # an existing PostgreSQL database (emptied)
    BENCH_MESSAGES=2000 BENCH_CONCURRENCY=16 python -m bench notifications
    BENCH_KINDS=sms python -m bench notifications  # only SMS (or only email)
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
import time
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import func, select

from soko.app import load_handlers, load_models
from soko.notifications.models import Delivery
from soko.notifications.public import send_email, send_sms
from soko.platform.config import Settings
from soko.platform.db import Base
from soko.platform.logging import configure_logging
from soko.platform.runtime import Runtime
from soko.platform.schema import create_current_schema


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class MailCounter:
    def __init__(self) -> None:
        self.received = 0

    async def handle_DATA(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        self.received += 1
        return "250 OK"


class SmsReceiver:
    """Answers ``POST /version1/messaging`` like Africa's Talking, on keep-alive HTTP/1.1."""

    def __init__(self) -> None:
        self.received = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                self.received += 1
                body = json.dumps(
                    {
                        "SMSMessageData": {
                            "Message": "Sent to 1/1",
                            "Recipients": [
                                {
                                    "statusCode": 101,
                                    "number": "+254700000000",
                                    "status": "Success",
                                    "cost": "KES 0.8000",
                                    "messageId": f"ATXid_{self.received}",
                                }
                            ],
                        }
                    }
                ).encode()
                writer.write(
                    b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def main(_argv: list[str]) -> None:
    count = int(os.environ.get("BENCH_MESSAGES", "1000"))
    kinds = set(os.environ.get("BENCH_KINDS", "email,sms").split(","))
    concurrency = int(os.environ.get("BENCH_CONCURRENCY", "8"))
    url = os.environ.get("BENCH_DATABASE_URL")
    workdir = Path(tempfile.mkdtemp(prefix="soko-bench-"))
    url = url or f"sqlite+aiosqlite:///{workdir / 'bench.db'}"

    mail = MailCounter()
    smtp_port = _free_port()
    # A fixed name: aiosmtpd would look its own up (getfqdn) on every connection.
    controller = Controller(
        mail, hostname="127.0.0.1", port=smtp_port, server_hostname="bench.invalid"
    )
    controller.start()
    sms = SmsReceiver()
    server = await asyncio.start_server(sms.handle, "127.0.0.1", 0)
    sms_port = server.sockets[0].getsockname()[1]

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        env="test",
        data_dir=workdir,
        database_url=url,
        secret_key="bench-secret-key-bench-secret-key-0123",
        log_level="WARNING",
        log_format="json",
        outbox_batch_size=100,
        outbox_concurrency=concurrency,
        outbox_poll_seconds=0.01,
        notifications_email_provider="smtp",
        smtp_host="127.0.0.1",
        smtp_port=smtp_port,
        smtp_security="none",
        notifications_sms_provider="africastalking",
        africastalking_username="bench",
        africastalking_api_key="bench-key",
        africastalking_api_base=f"http://127.0.0.1:{sms_port}",
        notifications_provider_rate_limit="1000000/second",
    )
    configure_logging(settings)
    load_models()
    load_handlers()
    runtime = Runtime(settings)
    async with runtime.db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(create_current_schema)

    async def fire_nothing() -> None:  # the domains' cron jobs are not what is measured
        return None

    runtime.dispatcher.fire_due_schedules = fire_nothing  # type: ignore[method-assign]
    try:
        began = time.perf_counter()
        for start in range(0, count, 50):
            async with runtime.db.transaction() as session:
                for n in range(start, min(start + 50, count)):
                    if "email" in kinds:
                        await send_email(
                            session,
                            to=f"buyer{n}@example.com",
                            subject=f"Order SK-{n} is paid",
                            text="Habari, we received your payment.",
                            html="<p>Habari, we received your payment.</p>",
                            category="bench.email",
                        )
                    if "sms" in kinds:
                        await send_sms(
                            session,
                            to=f"+2547{n:08d}",
                            body=f"Soko: payment for order SK-{n} received.",
                            category="bench.sms",
                        )
        queue_seconds = time.perf_counter() - began

        began = time.perf_counter()
        await runtime.dispatcher.run_until_idle()
        drain_seconds = time.perf_counter() - began

        async with runtime.db.sessionmaker() as session:
            statuses: dict[str, int] = dict(
                (
                    await session.execute(
                        select(Delivery.status, func.count()).group_by(Delivery.status)
                    )
                ).all()  # type: ignore[arg-type]
            )
    finally:
        await runtime.stop()
        controller.stop()
        server.close()
        await server.wait_closed()

    emails = count if "email" in kinds else 0
    texts = count if "sms" in kinds else 0
    total = emails + texts
    print(f"backend            {runtime.db.dialect}")
    print(f"worker concurrency {concurrency}")
    print(f"messages           {emails} email + {texts} SMS")
    print(f"queue              {total / queue_seconds:,.0f} messages/s ({queue_seconds:.2f} s)")
    print(f"deliver            {total / drain_seconds:,.0f} messages/s ({drain_seconds:.2f} s)")
    print(f"received           {mail.received} emails (SMTP), {sms.received} SMS (HTTP)")
    print(f"delivery records   {statuses}")
    if mail.received != emails or sms.received != texts or statuses != {"sent": total}:
        raise SystemExit("invariant broken: every message must arrive once and be recorded sent")


if __name__ == "__main__":  # python -m bench.notifications, before bench/__main__ lists it
    import sys

    asyncio.run(main(sys.argv[1:]))
