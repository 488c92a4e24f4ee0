"""Paying a checkout group: starting a payment with a provider, reading payments, and the
small steps every other payments module shares (flags, event payloads, the providers).

A provider call never runs inside a transaction that holds a payment's or a group's
row: :func:`start_payment` stores the attempt in a short transaction of its own, commits
it, calls the provider with no transaction open, and only then records the provider's
answer in the request's transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity.public import contact_of
from soko.orders.public import group_for_payment
from soko.payments.errors import (
    GroupAlreadyPaid,
    GroupNotPayable,
    PaymentProviderRefused,
    PaymentProviderUnavailable,
)
from soko.payments.events import PAYMENT_FLAGGED, PaymentEvent
from soko.payments.payment_models import Payment, PaymentFlag, PaymentStatus
from soko.payments.providers.base import (
    PaymentProvider,
    PaymentStart,
    ProviderError,
    ProviderUnavailableError,
    StartedPayment,
)
from soko.payments.providers.registry import providers_of
from soko.platform.errors import NotFound, ValidationFailed
from soko.platform.outbox import publish
from soko.platform.runtime import Runtime

log = structlog.get_logger("soko.payments")

#: How long a client is told to wait when a provider is down and names no time.
DEFAULT_RETRY_AFTER_SECONDS = 30
PENDING_GROUP = "pending_payment"
PAID_GROUP = "paid"


def enabled_providers(runtime: Runtime) -> Mapping[str, PaymentProvider]:
    """The providers this process may use, by name (the only way payments reach them)."""
    return providers_of(runtime)


def provider_named(runtime: Runtime, name: str) -> PaymentProvider | None:
    return enabled_providers(runtime).get(name)


async def payment_for_buyer(
    session: AsyncSession, payment_id: uuid.UUID, buyer_id: uuid.UUID
) -> Payment:
    """The buyer's own payment; anyone else's answers 404 like a missing one."""
    payment = await session.get(Payment, payment_id)
    if payment is None or payment.buyer_id != buyer_id:
        raise NotFound("No such payment.")
    return payment


async def payments_of_group(session: AsyncSession, group_id: uuid.UUID) -> Sequence[Payment]:
    return (
        await session.scalars(
            select(Payment).where(Payment.group_id == group_id).order_by(Payment.id)
        )
    ).all()


async def succeeded_payment_of_group(session: AsyncSession, group_id: uuid.UUID) -> Payment | None:
    return await session.scalar(
        select(Payment).where(
            Payment.group_id == group_id, Payment.status == PaymentStatus.succeeded.value
        )
    )


@dataclass(frozen=True, slots=True)
class PaymentPlan:
    """What was checked before asking the provider: the attempt stored as ``created``."""

    payment_id: uuid.UUID
    provider: PaymentProvider
    start: PaymentStart


async def plan_payment(
    runtime: Runtime, buyer_id: uuid.UUID, group_id: uuid.UUID, provider_name: str
) -> PaymentPlan:
    """Check the group may be paid by this buyer and store the attempt (``created``), in
    a transaction of its own committed before the provider hears of it: a webhook for
    the reference then always finds its payment."""
    provider = provider_named(runtime, provider_name)
    if provider is None:
        raise ValidationFailed.of_field(
            "provider", f"is not one of the enabled providers: {sorted(enabled_providers(runtime))}"
        )
    now = runtime.clock.now()
    async with runtime.db.transaction() as session:
        group = await group_for_payment(session, group_id)
        if group is None or group.buyer_id != buyer_id:
            raise NotFound("No such checkout.")
        if group.status == PAID_GROUP:
            raise GroupAlreadyPaid(group_status=group.status)
        if group.status != PENDING_GROUP:
            # Expired or cancelled: a payment that succeeded anyway (too late, its stock
            # sold meanwhile) was given back, so "already paid" would not be true.
            raise GroupNotPayable(
                f"The checkout is {group.status}; it can no longer be paid.",
                group_status=group.status,
            )
        if await succeeded_payment_of_group(session, group_id):
            raise GroupAlreadyPaid(group_status=group.status)
        if group.total_minor <= 0:
            raise GroupNotPayable(
                "Nothing is left to pay in this checkout.", group_status=group.status
            )
        if group.reservation_expires_at <= now:
            raise GroupNotPayable(
                "The stock held for this checkout ran out; check out again.",
                group_status="expired",
            )
        contact = await contact_of(session, runtime, buyer_id)
        payment = Payment(
            group_id=group_id,
            buyer_id=buyer_id,
            provider=provider.name,
            status=PaymentStatus.created.value,
            amount_minor=group.total_minor,
            currency=group.currency,
            refunded_minor=0,
            created_at=now,
            updated_at=now,
        )
        session.add(payment)
        await session.flush()
        payment_id = payment.id
    settings = runtime.settings
    return_url = (
        settings.payment_return_url
        or f"{settings.public_url.rstrip('/')}/payments/return?group_id={{group_id}}"
    ).replace("{group_id}", str(group_id))
    start = PaymentStart(
        reference=str(payment_id),
        amount_minor=group.total_minor,
        currency=group.currency,
        customer_email=contact.email if contact else None,
        return_url=return_url,
        description=f"Soko checkout {group_id}",
        metadata={"group_id": str(group_id), "payment_id": str(payment_id)},
    )
    return PaymentPlan(payment_id, provider, start)


async def call_provider_start(plan: PaymentPlan) -> StartedPayment | ProviderError:
    """Ask the provider, with no transaction open. Its error is returned, not raised, so
    the caller records the failed attempt before answering."""
    try:
        return await plan.provider.start(plan.start)
    except ProviderError as exc:
        log.warning(
            "payment start failed",
            provider=plan.provider.name,
            payment_id=str(plan.payment_id),
            retryable=exc.retryable,
            error=str(exc),
        )
        return exc


async def record_start(
    session: AsyncSession,
    runtime: Runtime,
    plan: PaymentPlan,
    outcome: StartedPayment | ProviderError,
) -> Payment:
    """Store the provider's answer on the attempt: ``pending`` with what the client does
    next, or ``failed`` (then raise the problem, keeping the failed attempt)."""
    now = runtime.clock.now()
    if isinstance(outcome, ProviderError):
        await session.execute(
            update(Payment)
            .where(Payment.id == plan.payment_id, Payment.status == PaymentStatus.created.value)
            .values(
                status=PaymentStatus.failed.value,
                failure_reason=f"provider error: {outcome}"[:500],
                updated_at=now,
                version=Payment.version + 1,
            )
            .execution_options(synchronize_session=False)
        )
        if isinstance(outcome, ProviderUnavailableError) or outcome.retryable:
            retry_after = getattr(outcome, "retry_after_seconds", DEFAULT_RETRY_AFTER_SECONDS)
            raise PaymentProviderUnavailable(
                f"{plan.provider.name} cannot be reached now.",
                headers={"Retry-After": str(max(1, int(retry_after + 0.999)))},
                provider=plan.provider.name,
            ).keeping_changes()
        raise PaymentProviderRefused(
            f"{plan.provider.name} refused to start the payment.", provider=plan.provider.name
        ).keeping_changes()
    await session.execute(
        update(Payment)
        .where(Payment.id == plan.payment_id)
        .values(
            provider_payment_id=outcome.provider_payment_id,
            next_action_type=outcome.next_action.value,
            next_action_url=outcome.url,
            next_action_client_secret=outcome.client_secret,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    # Only from created: a webhook processed in the meantime may have moved it on.
    await session.execute(
        update(Payment)
        .where(Payment.id == plan.payment_id, Payment.status == PaymentStatus.created.value)
        .values(status=PaymentStatus.pending.value, version=Payment.version + 1)
        .execution_options(synchronize_session=False)
    )
    payment = await session.get(Payment, plan.payment_id, populate_existing=True)
    assert payment is not None
    return payment


async def seller_ids_of_group(session: AsyncSession, group_id: uuid.UUID) -> list[uuid.UUID]:
    group = await group_for_payment(session, group_id)
    if group is None:
        return []
    return sorted({order.seller_id for order in group.orders})


async def payment_event(
    session: AsyncSession,
    payment: Payment,
    *,
    outcome: str | None = None,
    flag: str | None = None,
    seller_ids: list[uuid.UUID] | None = None,
) -> PaymentEvent:
    if seller_ids is None:
        seller_ids = await seller_ids_of_group(session, payment.group_id)
    return PaymentEvent(
        payment_id=payment.id,
        group_id=payment.group_id,
        buyer_id=payment.buyer_id,
        seller_ids=seller_ids,
        provider=payment.provider,
        amount_minor=payment.amount_minor,
        currency=payment.currency,
        status=payment.status,
        outcome=outcome,
        flag=flag,
        failure_reason=payment.failure_reason,
    )


async def flag_payment(
    session: AsyncSession, runtime: Runtime, payment: Payment, flag: PaymentFlag, detail: str
) -> bool:
    """Set ``flag`` for an admin (only when no flag is set: the first reason stays until
    an admin resolves it) and publish ``payment.flagged``. Returns whether it was set."""
    now = runtime.clock.now()
    flagged = await session.execute(
        update(Payment)
        .where(Payment.id == payment.id, Payment.flag.is_(None))
        .values(flag=flag.value, flag_detail=detail[:500], updated_at=now)
        .returning(Payment.id)
        .execution_options(synchronize_session=False)
    )
    if flagged.first() is None:
        return False
    log.warning("payment flagged", payment_id=str(payment.id), flag=flag.value, detail=detail)
    await publish(session, PAYMENT_FLAGGED, await payment_event(session, payment, flag=flag.value))
    return True
