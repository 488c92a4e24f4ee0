"""Reconciliation: payments left open longer than ``SOKO_PAYMENT_RECONCILE_AFTER_MINUTES``
are asked about at their provider and settled through the same code as webhooks
(:func:`soko.payments.settlement.settle`), so a lost webhook never leaves money
unaccounted for. Mismatches are flagged there."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.payments.intake import confirm_and_settle
from soko.payments.payment_models import Payment, PaymentStatus
from soko.payments.providers.base import ProviderError
from soko.payments.service import enabled_providers
from soko.payments.settlement import Settled
from soko.platform.runtime import Runtime

log = structlog.get_logger("soko.payments")

#: Payments looked at per run: each costs a provider call made while the job's
#: transaction is open, so a run stays short; the next run takes the rest.
BATCH = 50


@dataclass
class ReconcileReport:
    checked: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    errors: int = 0


async def reconcile_open_payments(
    session: AsyncSession, runtime: Runtime, *, limit: int = BATCH
) -> ReconcileReport:
    now = runtime.clock.now()
    cutoff = now - dt.timedelta(minutes=runtime.settings.payment_reconcile_after_minutes)
    stale = (
        await session.scalars(
            select(Payment)
            .where(
                Payment.status.in_((PaymentStatus.created.value, PaymentStatus.pending.value)),
                Payment.updated_at <= cutoff,
            )
            .order_by(Payment.updated_at, Payment.id)
            .limit(limit)
        )
    ).all()
    report = ReconcileReport()
    providers = enabled_providers(runtime)
    for payment in stale:
        report.checked += 1
        provider = providers.get(payment.provider)
        if provider is None:
            report.errors += 1
            continue
        try:
            settled = await confirm_and_settle(session, runtime, provider, payment)
        except ProviderError as exc:
            if payment.status == PaymentStatus.created.value and not exc.retryable:
                # Stored but never started at the provider (the process stopped between
                # the two): nothing can be paid on it.
                await _abandon(session, runtime, payment, "never started at the provider")
                settled = Settled.failed
            else:
                report.errors += 1
                log.warning(
                    "reconciliation could not ask the provider",
                    payment_id=str(payment.id),
                    provider=payment.provider,
                    error=str(exc),
                )
                continue
        if settled in (Settled.unchanged, Settled.flagged):
            # Still open at the provider, or flagged for an admin: look again only
            # after another threshold.
            await session.execute(
                update(Payment)
                .where(Payment.id == payment.id, Payment.status == payment.status)
                .values(updated_at=now)
                .execution_options(synchronize_session=False)
            )
        report.outcomes[settled.value] = report.outcomes.get(settled.value, 0) + 1
    return report


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
