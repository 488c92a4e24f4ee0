"""The sandbox provider's webhooks: how they are signed, queued and delivered.

A decision on the sandbox page (or a refund) queues one outbox job
``payments.sandbox_deliver`` per delivery: the event itself, any extra copies of it
(duplicates carry the *same* event id, as a real provider's retries do, so Soko can
recognise them) and, when asked, a stale ``charge.pending`` event sent after the outcome
(its own event id) to exercise out-of-order handling. Each job POSTs the event's body,
byte for byte as queued, to ``SOKO_SANDBOX_WEBHOOK_URL`` (default: Soko's own inbound
route, ``<public_url>/api/v1/payments/webhooks/sandbox``) and fails on anything but a
2xx, so the outbox retries it with backoff.

Signature: header ``sandbox-signature: t=<unix seconds>,v1=<hex>`` where ``<hex>`` is
HMAC-SHA256 of ``"<t>." + raw body`` under ``SOKO_SANDBOX_WEBHOOK_SECRET`` or, when that
is empty, a key derived from ``SOKO_SECRET_KEY`` with HKDF-SHA256 (info
``b"soko sandbox webhooks"``). The body is signed when it is sent, not when it was
queued, so a delivery retried an hour later still falls within the receiver's
five-minute tolerance.

SQLite: a job's transaction holds the database's single write lock while its handler
runs, and the delivery's receiver is usually this very database (Soko's inbound route
stores the event). Posting from inside the handler would wait for a lock the handler
itself holds, so on SQLite the handler hands the POST to a background task of the
process that runs once the job has committed; a failed POST queues the next attempt
itself, with the dispatcher's backoff, up to ``SOKO_OUTBOX_MAX_ATTEMPTS``. The sandbox's
own writes from inside a caller's transaction (a start from a request, a refund from a
job) are deferred the same way (see :class:`SandboxState`). On PostgreSQL none of this
applies and everything runs inline.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import httpx2
import structlog
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from soko.payments.providers.signatures import sign_timestamped
from soko.platform.config import Settings
from soko.platform.crypto import hkdf_sha256
from soko.platform.jobs import JobContext, registry
from soko.platform.outbox import enqueue

if TYPE_CHECKING:
    from soko.platform.runtime import Runtime

log = structlog.get_logger("soko.payments.sandbox")

DELIVER_JOB = "payments.sandbox_deliver"
SIGNATURE_HEADER = "sandbox-signature"
SIGNATURE_TOLERANCE_SECONDS = 300
WEBHOOK_KEY_INFO = b"soko sandbox webhooks"
WEBHOOK_PATH = "/api/v1/payments/webhooks/sandbox"
#: ``runtime.extensions`` key: an httpx2 transport every delivery goes through (tests
#: put an ``ASGITransport`` over the app here, or a ``MockTransport``).
TRANSPORT_EXTENSION = "payments.sandbox_transport"
STATE_EXTENSION = "payments.sandbox"
MAX_DUPLICATES = 10
MAX_DELAY_SECONDS = 3600.0
# Extra copies and the stale event follow the original a second apart, as a provider's
# redeliveries would, and in a fixed order.
FOLLOW_UP_SPACING_SECONDS = 1.0


class SandboxEventType(StrEnum):
    charge_pending = "charge.pending"
    charge_succeeded = "charge.succeeded"
    charge_failed = "charge.failed"
    charge_abandoned = "charge.abandoned"
    refund_succeeded = "refund.succeeded"


class SandboxDeliveryError(Exception):
    """The webhook's receiver did not answer with a 2xx."""


# -- signing -------------------------------------------------------------------------------


def webhook_key(settings: Settings) -> bytes:
    """The key sandbox webhooks are signed with (see the module docstring)."""
    configured = settings.sandbox_webhook_secret.get_secret_value()
    if configured:
        return configured.encode("utf-8")
    return hkdf_sha256(
        settings.secret_key.get_secret_value().encode("utf-8"), info=WEBHOOK_KEY_INFO
    )


def signature_header(key: bytes, raw_body: bytes, timestamp: int) -> str:
    """The ``sandbox-signature`` value for ``raw_body`` sent at ``timestamp``."""
    return sign_timestamped(key, raw_body, timestamp)


def webhook_url(settings: Settings) -> str:
    return settings.sandbox_webhook_url or settings.public_url.rstrip("/") + WEBHOOK_PATH


# -- events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChargeFacts:
    """What an event says about a charge."""

    charge_id: uuid.UUID
    reference: str
    status: str
    amount_minor: int
    currency: str


@dataclass(frozen=True, slots=True)
class DeliveryPlan:
    """How the outcome chosen on the page is delivered."""

    delay_seconds: float
    duplicates: int = 0
    stale_pending: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.delay_seconds <= MAX_DELAY_SECONDS:
            raise ValueError(f"the delay must be between 0 and {MAX_DELAY_SECONDS:g} seconds")
        if not 0 <= self.duplicates <= MAX_DUPLICATES:
            raise ValueError(f"duplicates must be between 0 and {MAX_DUPLICATES}")


def new_event_id() -> str:
    return f"evt_{secrets.token_hex(16)}"


def event_body(
    event_type: SandboxEventType,
    facts: ChargeFacts,
    *,
    created: dt.datetime,
    event_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The JSON text of one event, exactly as it will be sent (and signed)."""
    data: dict[str, Any] = {
        "charge_id": str(facts.charge_id),
        "reference": facts.reference,
        "status": facts.status,
        "amount_minor": facts.amount_minor,
        "currency": facts.currency,
    }
    data.update(extra or {})
    event = {
        "id": event_id or new_event_id(),
        "type": event_type.value,
        "created": int(created.timestamp()),
        "data": data,
    }
    return json.dumps(event, separators=(",", ":"))


def _event_type_of(status: str) -> SandboxEventType:
    return SandboxEventType(f"charge.{status}")


@dataclass(frozen=True, slots=True)
class QueuedDelivery:
    event_id: str
    event_type: str
    due_at: dt.datetime


async def _queue(
    session: AsyncSession, body: str, *, due_at: dt.datetime, now: dt.datetime
) -> QueuedDelivery:
    await enqueue(session, DELIVER_JOB, {"body": body, "attempt": 1}, available_at=due_at, now=now)
    parsed = json.loads(body)
    return QueuedDelivery(parsed["id"], parsed["type"], due_at)


async def queue_outcome(
    session: AsyncSession,
    facts: ChargeFacts,
    plan: DeliveryPlan,
    *,
    now: dt.datetime,
    pending_since: dt.datetime,
) -> list[QueuedDelivery]:
    """Queue, in ``session``'s transaction, the deliveries of a charge's outcome: the
    event after ``plan.delay_seconds``, then its duplicates, then the stale pending one
    (dated ``pending_since``, when the charge really was pending)."""
    first = now + dt.timedelta(seconds=plan.delay_seconds)
    body = event_body(_event_type_of(facts.status), facts, created=now)
    queued = [await _queue(session, body, due_at=first, now=now)]
    spacing = dt.timedelta(seconds=FOLLOW_UP_SPACING_SECONDS)
    for copy in range(1, plan.duplicates + 1):
        queued.append(await _queue(session, body, due_at=first + copy * spacing, now=now))
    if plan.stale_pending:
        stale_facts = ChargeFacts(
            facts.charge_id, facts.reference, "pending", facts.amount_minor, facts.currency
        )
        stale = event_body(SandboxEventType.charge_pending, stale_facts, created=pending_since)
        due = first + (plan.duplicates + 1) * spacing
        queued.append(await _queue(session, stale, due_at=due, now=now))
    return queued


async def queue_refund_event(
    session: AsyncSession,
    facts: ChargeFacts,
    *,
    refund_id: uuid.UUID,
    refund_reference: str,
    refund_amount_minor: int,
    plan: DeliveryPlan,
    now: dt.datetime,
) -> list[QueuedDelivery]:
    """Queue a ``refund.succeeded`` event (and its duplicates) for a refund just made."""
    body = event_body(
        SandboxEventType.refund_succeeded,
        facts,
        created=now,
        extra={
            "refund_id": str(refund_id),
            "refund_reference": refund_reference,
            "refund_amount_minor": refund_amount_minor,
        },
    )
    first = now + dt.timedelta(seconds=plan.delay_seconds)
    spacing = dt.timedelta(seconds=FOLLOW_UP_SPACING_SECONDS)
    return [
        await _queue(session, body, due_at=first + copy * spacing, now=now)
        for copy in range(plan.duplicates + 1)
    ]


# -- background work (SQLite) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StagedCharge:
    """A charge opened on SQLite whose row is still waiting for the write lock."""

    facts: ChargeFacts


@dataclass(frozen=True, slots=True)
class StagedRefund:
    refund_id: uuid.UUID
    charge_id: uuid.UUID
    amount_minor: int


@dataclass
class SandboxState:
    """The sandbox's per-process state, shared by every :class:`SandboxProvider` of one
    runtime and by its page: the background tasks, and on SQLite the writes a caller's
    transaction is holding back.

    On SQLite the sandbox cannot open its own write transaction while its caller holds
    the write lock (a payment started inside a request's transaction, a refund sent from
    a job): it would wait for a lock that is only released after it returns. Those
    writes run in a background task that takes the lock once the caller has committed;
    until then the charge or refund is *staged* here, so that this process still answers
    for it (``fetch``, a repeated start or refund, the refundable amount), and the page
    waits for staged writes before it reads."""

    writes: set[asyncio.Task[None]] = field(default_factory=set)
    deliveries: set[asyncio.Task[None]] = field(default_factory=set)
    staged_charges: dict[uuid.UUID, StagedCharge] = field(default_factory=dict)
    staged_references: dict[str, uuid.UUID] = field(default_factory=dict)
    staged_refunds: dict[tuple[uuid.UUID, str], StagedRefund] = field(default_factory=dict)
    # Counts staged writes that have finished, so a reader can tell one finished while
    # it was reading the database.
    generation: int = 0
    # Staged writes commit in the order they were staged (asyncio's lock is FIFO): a
    # repeated start must not have its new page token overwritten by the first one's.
    write_order: asyncio.Lock = field(default_factory=asyncio.Lock)

    def spawn_write(self, work: Coroutine[Any, Any, None], *, name: str) -> None:
        self._spawn(self.writes, work, name)

    def spawn_delivery(self, work: Coroutine[Any, Any, None], *, name: str) -> None:
        self._spawn(self.deliveries, work, name)

    @staticmethod
    def _spawn(group: set[asyncio.Task[None]], work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        group.add(task)
        task.add_done_callback(group.discard)

    def unstage_refund(self, key: tuple[uuid.UUID, str]) -> None:
        self.staged_refunds.pop(key, None)
        self.generation += 1

    def staged_refunded_minor(self, charge_id: uuid.UUID) -> int:
        return sum(r.amount_minor for r in self.staged_refunds.values() if r.charge_id == charge_id)

    async def writes_settled(self) -> None:
        """Wait until every staged write has committed (or given up). Never call this
        while holding the SQLite write lock."""
        while self.writes:
            await asyncio.gather(*list(self.writes), return_exceptions=True)

    async def settle(self) -> int:
        """Wait for every background task, including ones they start; how many ran."""
        finished = 0
        while self.writes or self.deliveries:
            pending = [*self.writes, *self.deliveries]
            finished += len(pending)
            await asyncio.gather(*pending, return_exceptions=True)
        return finished

    async def close(self, grace: float = 5.0) -> None:
        pending = [*self.writes, *self.deliveries]
        if not pending:
            return
        _, unfinished = await asyncio.wait(pending, timeout=grace)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)


def sandbox_state(runtime: Runtime) -> SandboxState:
    state = runtime.extensions.get(STATE_EXTENSION)
    if not isinstance(state, SandboxState):
        state = SandboxState()
        runtime.extensions[STATE_EXTENSION] = state
        runtime.on_stop(state.close)
    return state


async def settle_sandbox(runtime: Runtime) -> int:
    """Wait for the sandbox's background work in this process (SQLite); how many tasks
    ran. For tests and the demo, beside ``runtime.dispatcher.run_until_idle()``."""
    return await sandbox_state(runtime).settle()


# How a deferred write waits out a caller that keeps the SQLite lock beyond the busy
# timeout: a few more tries, spaced out.
WRITE_ATTEMPTS = 5
WRITE_RETRY_SECONDS = 1.0


async def run_deferred_write(
    runtime: Runtime,
    write: Callable[[AsyncSession], Awaitable[object]],
    *,
    what: str,
    on_done: Callable[[], None] | None = None,
) -> None:
    """Run ``await write(session)`` in a transaction of its own once the write lock is
    free; ``on_done()`` runs afterwards whatever happened (it unstages)."""
    try:
        async with sandbox_state(runtime).write_order:
            await _write_with_retries(runtime, write)
    except Exception:
        log.exception("a deferred sandbox write failed", what=what)
    finally:
        if on_done is not None:
            on_done()


async def _write_with_retries(
    runtime: Runtime, write: Callable[[AsyncSession], Awaitable[object]]
) -> None:
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            async with runtime.db.transaction() as session:
                await write(session)
        except OperationalError:
            if attempt == WRITE_ATTEMPTS:
                raise
            await asyncio.sleep(WRITE_RETRY_SECONDS)
        else:
            runtime.dispatcher.wake()
            return


# -- delivery ------------------------------------------------------------------------------


async def post_webhook(runtime: Runtime, body: str) -> httpx2.Response:
    """POST one event, signed now, to the webhook URL; raise unless the answer is 2xx."""
    settings = runtime.settings
    raw = body.encode("utf-8")
    timestamp = int(runtime.clock.now().timestamp())
    headers = {
        "content-type": "application/json",
        "user-agent": "soko-sandbox/1",
        SIGNATURE_HEADER: signature_header(webhook_key(settings), raw, timestamp),
    }
    transport = runtime.extensions.get(TRANSPORT_EXTENSION)
    if not isinstance(transport, httpx2.AsyncBaseTransport):
        transport = None
    async with httpx2.AsyncClient(
        transport=transport, timeout=settings.payment_http_timeout_seconds
    ) as client:
        response = await client.post(webhook_url(settings), content=raw, headers=headers)
    if not 200 <= response.status_code < 300:
        raise SandboxDeliveryError(f"the webhook receiver answered {response.status_code}")
    return response


async def _deliver_after_commit(runtime: Runtime, payload: dict[str, Any], attempt: int) -> None:
    try:
        await post_webhook(runtime, payload["body"])
    except Exception as exc:
        # The address is named: a wrong SOKO_PUBLIC_URL (another port, say) shows here.
        url = webhook_url(runtime.settings)
        if attempt >= runtime.settings.outbox_max_attempts:
            log.error(
                "a sandbox webhook delivery gave up", url=url, attempts=attempt, error=str(exc)
            )
            return
        delay = runtime.dispatcher.backoff(attempt)
        log.warning(
            "a sandbox webhook delivery failed; retrying",
            url=url,
            attempt=attempt,
            error=str(exc),
        )
        retry = {"body": payload["body"], "attempt": attempt + 1}
        try:
            async with runtime.db.transaction() as session:
                await enqueue(session, DELIVER_JOB, retry, delay=delay, now=runtime.clock.now())
        except Exception:
            log.exception("could not queue the retry of a sandbox webhook delivery")
        else:
            runtime.dispatcher.wake()


@registry.job(DELIVER_JOB)
async def deliver_sandbox_webhook(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Deliver one sandbox webhook (see the module docstring)."""
    runtime: Runtime = ctx.services
    if not isinstance(payload.get("body"), str):
        log.error("a sandbox delivery without a body was dropped")
        return
    if ctx.session.get_bind().dialect.name == "sqlite":
        attempt = payload.get("attempt")
        attempt = attempt if isinstance(attempt, int) and attempt >= 1 else 1
        sandbox_state(runtime).spawn_delivery(
            _deliver_after_commit(runtime, payload, attempt), name="sandbox webhook delivery"
        )
        return
    await post_webhook(runtime, payload["body"])
