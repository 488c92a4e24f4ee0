"""Payment webhooks end to end: signed deliveries with duplicates mixed in, received,
stored once, confirmed with the provider and settled by the outbox dispatcher.

Loads a database of its own (``soko_bench_webhooks``, dropped and created again) with a
store, one single-unit variant per buyer, and ``BENCH_PAYMENTS`` buyers (inserted through
the models, see :func:`bench.checkout.load`). Each buyer then checks out and starts a
payment through the API of an in-process app (setup, not measured), with a *bench
provider*: a provider kept in memory whose ``fetch`` answers from memory and whose
webhooks carry a real HMAC-SHA256 signature over the raw body, checked in constant time
like the real adapters do. Provider time is therefore zero: the figures are Soko's own
cost per event (verify, store, queue, then in the job: find, confirm, settle, pay the
group, post the capture, publish).

The measured run: every payment succeeds at the provider, and its webhook is posted,
plus ``BENCH_DUPLICATE_RATIO`` (30%) of them posted again (exact resends), shuffled,
by ``BENCH_WEBHOOK_CONNECTIONS`` (16) concurrent clients through the ASGI app while the
runtime's dispatcher runs in the same process (the embedded shape: one process serves
the webhooks and runs the jobs). It reports the webhooks answered per second (intake)
and the **events processed per second end to end**: distinct events from the first
request sent until the last one is ``processed`` by the dispatcher. Then it checks:
every payment ``succeeded`` and its group ``paid``, each captured exactly once in the
ledger, every duplicate answered ``duplicate: true`` and stored once, no outbox message
dead, and the ledger balanced (with the time ``verify_ledger`` took).

    .venv/bin/python -m bench payment_webhooks

Settings: ``BENCH_PAYMENTS`` (500), ``BENCH_DUPLICATE_RATIO`` (0.3),
``BENCH_WEBHOOK_CONNECTIONS`` (16), ``BENCH_OUTBOX_CONCURRENCY`` (8),
``BENCH_DATABASE_URL`` (default
``postgresql+asyncpg://postgres@127.0.0.1:5432/soko_bench_webhooks``, dropped and created
when its name starts with ``soko_bench``), ``BENCH_KEEP_DATABASE=1``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import os
import random
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.checkout import PRICE_MINOR, Store, load

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/soko_bench_webhooks"
PROVIDER = "bench"
SIGNATURE_HEADER = "x-bench-signature"


class BenchProvider:
    """A provider in memory: ``start`` records the charge, ``fetch`` answers what the
    bench made happen, webhooks are signed with HMAC-SHA256 over the raw body."""

    name = PROVIDER
    refunds_are_idempotent = True  # the bench never refunds

    def __init__(self, secret: bytes) -> None:
        from soko.payments.providers.base import PaymentState

        self.secret = secret
        self.charges: dict[str, PaymentState] = {}
        self.fetches = 0

    async def start(self, payment: Any) -> Any:
        from soko.payments.providers.base import (
            NextActionKind,
            PaymentState,
            ProviderStatus,
            StartedPayment,
        )

        self.charges[payment.reference] = PaymentState(
            provider_payment_id=f"bp_{payment.reference}",
            reference=payment.reference,
            status=ProviderStatus.pending,
            amount_minor=payment.amount_minor,
            currency=payment.currency,
        )
        return StartedPayment(
            provider_payment_id=f"bp_{payment.reference}",
            next_action=NextActionKind.redirect,
            url=f"https://bench.invalid/pay/{payment.reference}",
        )

    def verify_webhook(self, headers: Mapping[str, str], raw_body: bytes, now: dt.datetime) -> Any:
        from soko.payments.providers.base import (
            InboundEvent,
            ProviderStatus,
            WebhookRejectedError,
        )

        expected = hmac.new(self.secret, raw_body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, headers.get(SIGNATURE_HEADER, "")):
            raise WebhookRejectedError("bad signature")
        try:
            data = json.loads(raw_body)
            return InboundEvent(
                provider=self.name,
                event_id=str(data["id"]),
                event_type=str(data["type"]),
                reference=data.get("reference"),
                provider_payment_id=data.get("charge"),
                status=ProviderStatus(data["status"]),
                amount_minor=int(data["amount"]),
                currency=str(data["currency"]),
            )
        except (ValueError, KeyError, TypeError):
            raise WebhookRejectedError("unparseable") from None

    async def fetch(self, provider_payment_id: str, reference: str) -> Any:
        from soko.payments.providers.base import ProviderError

        self.fetches += 1
        state = self.charges.get(reference)
        if state is None:
            raise ProviderError(self.name, "no such charge", retryable=False)
        return state

    async def refund(self, refund: Any) -> Any:
        from soko.payments.providers.base import RefundResult, RefundStatus

        return RefundResult(f"br_{refund.reference}", RefundStatus.succeeded)

    def readiness(self) -> Mapping[str, object]:
        return {"status": "up", "circuit": "closed"}

    def succeed(self, reference: str) -> None:
        from soko.payments.providers.base import PaymentState, ProviderStatus

        old = self.charges[reference]
        self.charges[reference] = PaymentState(
            provider_payment_id=old.provider_payment_id,
            reference=reference,
            status=ProviderStatus.succeeded,
            amount_minor=old.amount_minor,
            currency=old.currency,
        )

    def webhook(self, reference: str) -> tuple[bytes, dict[str, str]]:
        charge = self.charges[reference]
        body = json.dumps(
            {
                "id": f"evt_{uuid.uuid4().hex}",
                "type": "charge.succeeded",
                "reference": reference,
                "charge": charge.provider_payment_id,
                "status": "succeeded",
                "amount": charge.amount_minor,
                "currency": charge.currency,
            }
        ).encode()
        signature = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        return body, {SIGNATURE_HEADER: signature, "content-type": "application/json"}


@dataclass
class Config:
    payments: int = 500
    duplicate_ratio: float = 0.3
    connections: int = 16
    outbox_concurrency: int = 8
    url: str = DEFAULT_DATABASE_URL
    keep: bool = False

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ.get
        return cls(
            payments=int(env("BENCH_PAYMENTS", "500")),
            duplicate_ratio=float(env("BENCH_DUPLICATE_RATIO", "0.3")),
            connections=int(env("BENCH_WEBHOOK_CONNECTIONS", "16")),
            outbox_concurrency=int(env("BENCH_OUTBOX_CONCURRENCY", "8")),
            url=env("BENCH_DATABASE_URL") or DEFAULT_DATABASE_URL,
            keep=env("BENCH_KEEP_DATABASE") == "1",
        )


@dataclass
class Outcome:
    invariants_held: bool
    events_per_second: float
    webhooks_per_second: float
    checks: list[tuple[str, bool, str]] = field(default_factory=list)


async def main(_argv: list[str]) -> None:
    outcome = await run(Config.from_env())
    if not outcome.invariants_held:
        raise SystemExit("payment webhooks benchmark: an invariant failed")


async def _prepare(client: Any, store: Store, workers: int) -> list[str]:
    """Each buyer checks out one unit and starts a payment with the bench provider; the
    payments' references, in buyer order."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(store.buyers)):
        queue.put_nowait(index)
    references: dict[int, str] = {}

    async def worker() -> None:
        while not queue.empty():
            index = queue.get_nowait()
            buyer = store.buyers[index]
            auth = {"Authorization": f"Bearer {buyer.token}"}
            cart = (await client.post("/api/v1/carts", headers=auth)).json()["cart"]["id"]
            added = await client.post(
                f"/api/v1/carts/{cart}/items",
                # One unit of its own variant each: the benchmark measures webhooks, not
                # the queue for one hot stock row (bench/checkout.py measures that).
                json={"variant_id": str(store.spread[index]), "quantity": 1},
                headers=auth,
            )
            added.raise_for_status()
            group = await client.post(
                "/api/v1/checkout",
                json={"cart_id": cart},
                headers={**auth, "Idempotency-Key": uuid.uuid4().hex},
            )
            group.raise_for_status()
            paid = await client.post(
                f"/api/v1/checkout/{group.json()['id']}/payments",
                json={"provider": PROVIDER},
                headers={**auth, "Idempotency-Key": uuid.uuid4().hex},
            )
            paid.raise_for_status()
            references[index] = paid.json()["id"]

    await asyncio.gather(*(worker() for _ in range(workers)))
    return [references[index] for index in range(len(store.buyers))]


async def _processed(runtime: Any) -> tuple[int, int]:
    """(events processed, payments jobs not finished)."""
    from sqlalchemy import func, select

    from soko.payments.payment_models import WebhookEvent
    from soko.platform.outbox import OutboxMessage

    async with runtime.db.transaction(read_only=True) as session:
        done = await session.scalar(
            select(func.count()).select_from(WebhookEvent).where(WebhookEvent.status != "received")
        )
        open_jobs = await session.scalar(
            select(func.count())
            .select_from(OutboxMessage)
            .where(
                OutboxMessage.name == "payments.process_event",
                OutboxMessage.status.in_(("pending", "running")),
            )
        )
    return int(done or 0), int(open_jobs or 0)


def _job_times() -> str:
    """Mean time of one attempt per handler, from the dispatcher's own histogram."""
    from prometheus_client import REGISTRY

    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for metric in REGISTRY.collect():
        if metric.name != "soko_job_duration_seconds":
            continue
        for sample in metric.samples:
            name = sample.labels.get("name", "")
            if sample.name.endswith("_sum"):
                sums[name] = sample.value
            elif sample.name.endswith("_count"):
                counts[name] = sample.value
    shown = sorted(counts, key=lambda name: -sums.get(name, 0.0))[:4]
    return ", ".join(
        f"{name} {1000 * sums[name] / counts[name]:.0f} ms x {counts[name]:.0f}"
        for name in shown
        if counts[name]
    )


async def _outbox_work(runtime: Any, since: dt.datetime) -> str:
    """What the dispatcher handled in the window, by job or event:subscriber: an event's
    cost includes everything its settlement set off (order.paid to every subscriber...)."""
    from sqlalchemy import func, select

    from soko.platform.outbox import OutboxMessage

    async with runtime.db.transaction(read_only=True) as session:
        rows = (
            await session.execute(
                select(OutboxMessage.name, OutboxMessage.handler, func.count())
                .where(OutboxMessage.created_at >= since)
                .group_by(OutboxMessage.name, OutboxMessage.handler)
                .order_by(func.count().desc())
            )
        ).all()
    total = sum(count for _, _, count in rows)
    parts = ", ".join(
        f"{name}{':' + handler if handler else ''} {count}" for name, handler, count in rows
    )
    return f"{total} messages written in the window: {parts}"


async def _check(runtime: Any, references: list[str], answers: dict[str, int]) -> list[Any]:
    from sqlalchemy import func, select

    from soko.orders.models import CheckoutGroup
    from soko.payments import ledger
    from soko.payments.ledger_models import LedgerTransaction
    from soko.payments.payment_models import Payment, WebhookEvent
    from soko.platform.outbox import OutboxMessage

    n = len(references)
    checks: list[tuple[str, bool, str]] = []
    async with runtime.db.transaction(read_only=True) as session:
        succeeded = await session.scalar(
            select(func.count()).select_from(Payment).where(Payment.status == "succeeded")
        )
        checks.append(("every payment succeeded", succeeded == n, f"{succeeded} of {n}"))
        paid = await session.scalar(
            select(func.count()).select_from(CheckoutGroup).where(CheckoutGroup.status == "paid")
        )
        checks.append(("every group paid", paid == n, f"{paid} of {n}"))
        captures = (
            await session.execute(
                select(LedgerTransaction.reference, func.count())
                .where(LedgerTransaction.kind == "capture")
                .group_by(LedgerTransaction.reference)
            )
        ).all()
        once = len(captures) == n and all(count == 1 for _, count in captures)
        checks.append(("each payment captured once", once, f"{len(captures)} captures"))
        stored = await session.scalar(select(func.count()).select_from(WebhookEvent))
        checks.append(("each event stored once", stored == n, f"{stored} stored for {n} events"))
        dead = await session.scalar(
            select(func.count()).select_from(OutboxMessage).where(OutboxMessage.status == "dead")
        )
        checks.append(("no job dead", dead == 0, f"{dead} dead"))
        check = await ledger.verify_ledger(session)
        checks.append(
            (
                "ledger balanced",
                check.balanced,
                f"{check.entries} entries checked in {check.seconds * 1000:.1f} ms",
            )
        )
    duplicates_ok = answers.get("new", 0) == n and answers.get("other", 0) == 0
    checks.append(
        (
            "duplicates answered duplicate",
            duplicates_ok,
            f"{answers.get('new', 0)} new, {answers.get('duplicate', 0)} duplicate, "
            f"{answers.get('other', 0)} other answers",
        )
    )
    return checks


async def run(config: Config) -> Outcome:
    import httpx2

    from soko.app import create_app, load_handlers
    from soko.platform.config import Settings
    from soko.platform.runtime import Runtime

    url, n = config.url, config.payments
    if not url.startswith("postgresql"):
        raise SystemExit("the payment webhooks benchmark runs on PostgreSQL (BENCH_DATABASE_URL)")
    workdir = Path(tempfile.mkdtemp(prefix="soko-bench-webhooks-"))
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=workdir, database_url=url, secret_key=loadgen.SECRET_KEY,
        access_token_ttl_seconds=86400, ratelimit_enabled=False, log_level="WARNING",
        outbox_concurrency=config.outbox_concurrency, outbox_poll_seconds=0.05,
        outbox_batch_size=50,
        # Enough connections for every client and every job at once: the benchmark
        # measures the work, not a queue for the pool.
        database_pool_size=config.connections + config.outbox_concurrency + 4,
    )  # fmt: skip
    print(
        f"setup         PostgreSQL database {loadgen.database_name(url)}, one process "
        f"(webhooks and dispatcher), {os.cpu_count()} cores; {n} payments, "
        f"{config.duplicate_ratio:.0%} duplicates, {config.connections} clients, "
        f"outbox concurrency {config.outbox_concurrency}; {loadgen.load_average()}"
    )
    await loadgen.recreate_database(url)
    started = time.perf_counter()
    store = await load(url, settings, buyers=n, units=n)
    load_handlers()
    runtime = Runtime(settings)
    provider = BenchProvider(secret=hashlib.sha256(b"bench webhooks").digest())
    runtime.extensions["payments.providers"] = {PROVIDER: provider}
    app = create_app(runtime=runtime)
    outcome = Outcome(False, 0.0, 0.0)
    try:
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://bench") as client:
            references = await _prepare(client, store, workers=8)
            print(
                f"loaded        {n} checkouts with a pending payment of "
                f"{PRICE_MINOR} KES each in {time.perf_counter() - started:.1f} s"
            )
            await runtime.dispatcher.run_until_idle()  # the setup's own jobs and events
            deliveries: list[tuple[bytes, dict[str, str]]] = []
            for reference in references:
                provider.succeed(reference)
                deliveries.append(provider.webhook(reference))
            rng = random.Random(5)
            duplicates = rng.sample(deliveries, int(n * config.duplicate_ratio))
            mixed = deliveries + duplicates
            rng.shuffle(mixed)
            answers: dict[str, int] = {}
            queue: asyncio.Queue[tuple[bytes, dict[str, str]]] = asyncio.Queue()
            for delivery in mixed:
                queue.put_nowait(delivery)

            async def sender() -> None:
                while not queue.empty():
                    body, headers = queue.get_nowait()
                    answer = await client.post(
                        f"/api/v1/payments/webhooks/{PROVIDER}", content=body, headers=headers
                    )
                    kind = "other"
                    if answer.status_code == 200:
                        kind = "duplicate" if answer.json()["duplicate"] else "new"
                    answers[kind] = answers.get(kind, 0) + 1

            await runtime.start(run_dispatcher=True)
            window_start = dt.datetime.now(dt.UTC)
            cpu_began = time.process_time()
            began = time.perf_counter()
            await asyncio.gather(*(sender() for _ in range(config.connections)))
            received = time.perf_counter() - began
            while True:
                done, open_jobs = await _processed(runtime)
                if done >= n and open_jobs == 0:
                    break
                if time.perf_counter() - began > 600:
                    print("timeout       events still unprocessed after 600 s")
                    break
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - began
            cpu = time.process_time() - cpu_began
            await runtime.dispatcher.stop(5)
            outcome.webhooks_per_second = len(mixed) / received
            outcome.events_per_second = n / elapsed
            print(
                f"intake        {len(mixed)} webhooks ({len(duplicates)} duplicates) answered "
                f"in {received:.2f} s: {outcome.webhooks_per_second:.0f}/s"
            )
            print(
                f"end to end    {n} events received -> processed in {elapsed:.2f} s: "
                f"{outcome.events_per_second:.0f} events/s "
                f"({provider.fetches} provider confirmations)"
            )
            print(
                f"cpu           this process used {cpu:.1f} s of CPU ({cpu / elapsed:.2f} of a "
                f"core): {1000 * cpu / n:.1f} ms per event, intake and everything it set off "
                f"(PostgreSQL's own CPU not counted); {loadgen.load_average()}"
            )
            print(f"outbox        {await _outbox_work(runtime, window_start)}")
            print(f"job time      {_job_times()}")
            outcome.checks = await _check(runtime, references, answers)
    finally:
        await runtime.stop()
        if not config.keep:
            await loadgen.drop_database(url)
    for name, passed, detail in outcome.checks:
        print(f"{'ok' if passed else 'FAILED':13} {name}: {detail}")
    outcome.invariants_held = bool(outcome.checks) and all(p for _, p, _ in outcome.checks)
    return outcome
