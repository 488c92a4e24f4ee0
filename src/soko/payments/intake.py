"""Inbound payment webhooks: verified, stored raw once, and processed by a job.

The route (:func:`receive`) verifies the signature on the raw bytes before anything
else; a rejected webhook is counted and logged, and nothing is stored. A verified one is
inserted with ``ON CONFLICT DO NOTHING`` on ``(provider, event_id)`` and, only when the
row is new, job ``payments.process_event`` is queued in the same transaction: a
duplicate or replayed delivery is stored once and processed once, whatever the
concurrency.

The job (:func:`process_event`) finds the payment (by Soko's reference, else by the
provider's id), asks the provider's API for the payment's state and settles on that
(:func:`soko.payments.settlement.settle`). An event for no known payment is marked
``unmatched`` for an admin.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import structlog
from prometheus_client import Counter
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.payments.payment_models import EventStatus, Payment, WebhookEvent
from soko.payments.providers.base import InboundEvent, PaymentProvider
from soko.payments.service import enabled_providers
from soko.payments.settlement import Settled, settle
from soko.platform.db import dialect_insert
from soko.platform.ids import uuid7
from soko.platform.outbox import enqueue
from soko.platform.runtime import Runtime

log = structlog.get_logger("soko.payments")

PROCESS_EVENT_JOB = "payments.process_event"
MAX_BODY_BYTES = 256 * 1024

#: The headers kept with a stored event (for an admin's investigation). Secrets sent as
#: headers (Flutterwave's ``verif-hash`` is the shared secret itself) are never kept.
KEPT_HEADERS = (
    "content-type",
    "user-agent",
    "x-request-id",
    "stripe-signature",
    "x-paystack-signature",
    "sandbox-signature",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
)

WEBHOOKS_TOTAL = Counter(
    "soko_payment_webhooks_total",
    "Inbound payment webhooks, by provider and outcome (accepted, duplicate, rejected)",
    ["provider", "outcome"],
)


@dataclass(frozen=True, slots=True)
class Received:
    event_row_id: uuid.UUID | None  # None: a duplicate, stored before
    duplicate: bool


def kept_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: headers[name][:1000] for name in KEPT_HEADERS if name in headers}


async def store_event(
    session: AsyncSession,
    runtime: Runtime,
    event: InboundEvent,
    raw_body: bytes,
    headers: Mapping[str, str],
) -> Received:
    """Insert the verified event once, queueing its processing only when it is new."""
    now = runtime.clock.now()
    row_id = uuid7()
    insert = dialect_insert(session)
    inserted = (
        await session.execute(
            insert(WebhookEvent)
            .values(
                id=row_id,
                provider=event.provider,
                event_id=event.event_id[:255],
                event_type=event.event_type[:120],
                reference=(event.reference or None) and event.reference[:255],
                provider_payment_id=(event.provider_payment_id or None)
                and event.provider_payment_id[:255],
                reported_status=event.status.value if event.status else None,
                reported_amount_minor=event.amount_minor,
                reported_currency=(event.currency or "").upper()[:3] or None,
                raw_body=raw_body,
                headers=kept_headers(headers),
                status=EventStatus.received.value,
                received_at=now,
            )
            .on_conflict_do_nothing(index_elements=["provider", "event_id"])
            .returning(WebhookEvent.id)
        )
    ).scalar_one_or_none()
    if inserted is None:
        WEBHOOKS_TOTAL.labels(event.provider, "duplicate").inc()
        log.info("duplicate payment webhook", provider=event.provider, event_id=event.event_id)
        return Received(None, duplicate=True)
    await enqueue(session, PROCESS_EVENT_JOB, {"event_row_id": str(row_id)}, now=now)
    WEBHOOKS_TOTAL.labels(event.provider, "accepted").inc()
    return Received(row_id, duplicate=False)


def count_rejected(provider: str) -> None:
    WEBHOOKS_TOTAL.labels(provider, "rejected").inc()


async def find_payment(
    session: AsyncSession, provider: str, reference: str | None, provider_payment_id: str | None
) -> Payment | None:
    if reference:
        try:
            payment_id = uuid.UUID(reference)
        except ValueError:
            payment_id = None
        if payment_id is not None:
            payment = await session.get(Payment, payment_id)
            if payment is not None and payment.provider == provider:
                return payment
    if provider_payment_id:
        found: Payment | None = await session.scalar(
            select(Payment).where(
                Payment.provider == provider, Payment.provider_payment_id == provider_payment_id
            )
        )
        return found
    return None


async def process_event(session: AsyncSession, runtime: Runtime, event_row_id: uuid.UUID) -> None:
    """The job: settle the payment the event names on what its provider says now."""
    event = await session.get(WebhookEvent, event_row_id)
    if event is None or event.status != EventStatus.received.value:
        return  # processed already (a retried job)
    if event.reported_status is None:
        await _finish(session, runtime, event, EventStatus.ignored, None)
        return
    payment = await find_payment(
        session, event.provider, event.reference, event.provider_payment_id
    )
    if payment is None:
        log.warning(
            "payment webhook for no known payment",
            provider=event.provider,
            event_id=event.event_id,
            reference=event.reference,
        )
        await _finish(session, runtime, event, EventStatus.unmatched, None, "no such payment")
        return
    provider = enabled_providers(runtime).get(payment.provider)
    if provider is None:
        await _finish(session, runtime, event, EventStatus.ignored, payment.id, "provider off")
        return
    settled = await confirm_and_settle(
        session, runtime, provider, payment, event.provider_payment_id
    )
    await _finish(session, runtime, event, EventStatus.processed, payment.id)
    log.info(
        "payment webhook processed",
        provider=event.provider,
        event_id=event.event_id,
        payment_id=str(payment.id),
        settled=settled.value,
    )


async def confirm_and_settle(
    session: AsyncSession,
    runtime: Runtime,
    provider: PaymentProvider,
    payment: Payment,
    provider_payment_id: str | None = None,
) -> Settled:
    """Fetch the payment's state from its provider, then settle on it. A provider error
    propagates: the job is retried later (the fetch is a safe call)."""
    payment_id = payment.id
    external_id = payment.provider_payment_id or provider_payment_id or ""
    # Nothing of the payment is locked during the call: settle() moves it with
    # conditional UPDATEs afterwards.
    state = await provider.fetch(external_id, str(payment_id))
    if payment.provider_payment_id is None and state.provider_payment_id:
        await session.execute(
            update(Payment)
            .where(Payment.id == payment_id, Payment.provider_payment_id.is_(None))
            .values(provider_payment_id=state.provider_payment_id[:255])
            .execution_options(synchronize_session=False)
        )
    return await settle(session, runtime, payment_id, state)


async def _finish(
    session: AsyncSession,
    runtime: Runtime,
    event: WebhookEvent,
    status: EventStatus,
    payment_id: uuid.UUID | None,
    error: str | None = None,
) -> None:
    now: dt.datetime = runtime.clock.now()
    await session.execute(
        update(WebhookEvent)
        .where(WebhookEvent.id == event.id, WebhookEvent.status == EventStatus.received.value)
        .values(status=status.value, processed_at=now, payment_id=payment_id, error=error)
        .execution_options(synchronize_session=False)
    )
