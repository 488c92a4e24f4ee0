"""Reconciliation: payments left open longer than ``SOKO_PAYMENT_RECONCILE_AFTER_MINUTES``
are asked about at their provider and settled through the same code as webhooks
(:func:`soko.payments.settlement.settle`), so a lost webhook never leaves money
unaccounted for. Mismatches are flagged there.

Every five minutes the schedule queues one job per stale payment (the oldest
:data:`BATCH`); each job asks the provider once, then settles. A job's transaction thus
waits for one outbound call, which the settings' idle-in-transaction limit outlasts, and
what a settlement locks (the group, its orders and their stock) is held only until that
one payment is settled, not while the provider is asked about the others."""

from __future__ import annotations

import datetime as dt
import uuid

import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.payments.intake import confirm_and_settle
from soko.payments.payment_models import Payment, PaymentStatus
from soko.payments.providers.base import ProviderError
from soko.payments.service import enabled_providers
from soko.payments.settlement import Settled
from soko.platform.outbox import enqueue
from soko.platform.runtime import Runtime

log = structlog.get_logger("soko.payments")

#: Payments queued per run; the next run takes the rest.
BATCH = 50
RECONCILE_PAYMENT_JOB = "payments.reconcile_payment"
OPEN_STATUSES = (PaymentStatus.created.value, PaymentStatus.pending.value)


def _stale_before(runtime: Runtime, now: dt.datetime) -> dt.datetime:
    return now - dt.timedelta(minutes=runtime.settings.payment_reconcile_after_minutes)


async def queue_stale_payments(
    session: AsyncSession, runtime: Runtime, run: str, *, limit: int = BATCH
) -> int:
    """Queue a reconciliation job for each of the ``limit`` oldest stale payments; how
    many were queued. ``run`` names this run of the schedule: a payment is queued once
    a run, and again by a later run while it stays open and unchanged."""
    now = runtime.clock.now()
    stale = (
        await session.scalars(
            select(Payment.id)
            .where(
                Payment.status.in_(OPEN_STATUSES),
                Payment.updated_at <= _stale_before(runtime, now),
            )
            .order_by(Payment.updated_at, Payment.id)
            .limit(limit)
        )
    ).all()
    queued = 0
    for payment_id in stale:
        job = await enqueue(
            session,
            RECONCILE_PAYMENT_JOB,
            {"payment_id": str(payment_id)},
            dedupe_key=f"reconcile:{payment_id}:{run}",
            now=now,
        )
        queued += job is not None
    return queued


async def reconcile_payment(
    session: AsyncSession, runtime: Runtime, payment_id: uuid.UUID
) -> Settled | None:
    """Ask the provider about one stale payment and settle on its answer: the outcome,
    or None when there was nothing to do (settled meanwhile, by a webhook say) or the
    provider could not be asked (the next run asks again)."""
    now = runtime.clock.now()
    payment = (
        await session.scalars(
            select(Payment).where(
                Payment.id == payment_id,
                Payment.status.in_(OPEN_STATUSES),
                Payment.updated_at <= _stale_before(runtime, now),
            )
        )
    ).one_or_none()
    if payment is None:
        return None
    provider = enabled_providers(runtime).get(payment.provider)
    if provider is None:
        log.warning(
            "reconciliation found no enabled provider",
            payment_id=str(payment.id),
            provider=payment.provider,
        )
        return None
    try:
        settled = await confirm_and_settle(session, runtime, provider, payment)
    except ProviderError as exc:
        if payment.status == PaymentStatus.created.value and not exc.retryable:
            # Stored but never started at the provider (the process stopped between
            # the two): nothing can be paid on it.
            await _abandon(session, runtime, payment, "never started at the provider")
            return Settled.failed
        log.warning(
            "reconciliation could not ask the provider",
            payment_id=str(payment.id),
            provider=payment.provider,
            error=str(exc),
        )
        return None
    if settled in (Settled.unchanged, Settled.flagged):
        # Still open at the provider, or flagged for an admin: look again only after
        # another threshold.
        await session.execute(
            update(Payment)
            .where(Payment.id == payment.id, Payment.status == payment.status)
            .values(updated_at=now)
            .execution_options(synchronize_session=False)
        )
    return settled


async def _abandon(session: AsyncSession, runtime: Runtime, payment: Payment, why: str) -> None:
    await session.execute(
        update(Payment)
        .where(Payment.id == payment.id, Payment.status == PaymentStatus.created.value)
        .values(
            status=PaymentStatus.abandoned.value,
            failure_reason=why,
            updated_at=runtime.clock.now(),
            version=Payment.version + 1,
        )
        .execution_options(synchronize_session=False)
    )
