"""Settling a payment on what its provider's API says (never on a webhook alone).

:func:`settle` is the one place a payment's state moves after it was started: the
webhook job and the reconciliation job both call it with the :class:`PaymentState` they
just fetched. Everything here is a conditional UPDATE on the current state, so a second
call with the same state (a duplicate webhook, a retried job, reconciliation racing a
webhook) changes nothing:

* precedence: ``created < pending < failed/abandoned < succeeded``; ``succeeded`` and
  ``duplicate`` are final, a failure may still succeed later;
* an amount or currency that differs from the payment's is flagged, and nothing moves;
* a success wins the group's one ``succeeded`` slot (a partial unique index) or, when
  another payment holds it, becomes ``duplicate``; then the ledger records the capture
  and the orders domain is asked to take the money (:func:`soko.orders.public.pay_group`).
  Whatever the group cannot take (a duplicate, stock gone, a cancelled group, orders
  cancelled meanwhile) goes to suspense and is refunded automatically.
"""

from __future__ import annotations

import uuid
from enum import StrEnum

import structlog
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from soko.orders.public import PayOutcome, group_for_payment, pay_group
from soko.payments import ledger
from soko.payments.events import PAYMENT_FAILED, PAYMENT_SUCCEEDED
from soko.payments.payment_models import Payment, PaymentFlag, PaymentStatus, RefundSource
from soko.payments.providers.base import PaymentState, ProviderStatus
from soko.payments.refunds import request_refund
from soko.payments.service import flag_payment, payment_event
from soko.platform.outbox import publish
from soko.platform.runtime import Runtime

log = structlog.get_logger("soko.payments")

CANCELLED_ORDER = "cancelled"
OPEN = (PaymentStatus.created.value, PaymentStatus.pending.value)
FINAL = (PaymentStatus.succeeded.value, PaymentStatus.duplicate.value)


class Settled(StrEnum):
    """What :func:`settle` did."""

    unchanged = "unchanged"  # nothing to do (already there, or a state that never goes back)
    pending = "pending"
    failed = "failed"
    paid = "paid"  # the group is paid by this payment
    refunded = "refunded"  # captured, but the money goes back in full
    flagged = "flagged"  # the provider's figures differ from the payment's


class RefundReason(StrEnum):
    duplicate_payment = "duplicate_payment"
    stock_gone = "stock_gone"
    group_cancelled = "group_cancelled"
    orders_cancelled = "orders_cancelled_before_payment"


async def settle(
    session: AsyncSession, runtime: Runtime, payment_id: uuid.UUID, state: PaymentState
) -> Settled:
    """Move payment ``payment_id`` to what ``state`` (fetched from its provider) says."""
    payment = await session.get(Payment, payment_id, populate_existing=True)
    if payment is None:
        raise LookupError(f"payment {payment_id} does not exist")
    if payment.status in FINAL:
        # Settled for good: a late or repeated report changes nothing (and a provider
        # that reports an amount net of later refunds is not a mismatch).
        return Settled.unchanged
    if state.amount_minor != payment.amount_minor or state.currency.upper() != payment.currency:
        await flag_payment(
            session,
            runtime,
            payment,
            PaymentFlag.amount_mismatch,
            f"provider reports {state.amount_minor} {state.currency.upper()} "
            f"({state.status.value}), the payment is {payment.amount_minor} "
            f"{payment.currency}",
        )
        return Settled.flagged
    if state.status == ProviderStatus.pending:
        return await _to_pending(session, runtime, payment)
    if state.status in (ProviderStatus.failed, ProviderStatus.abandoned):
        return await _to_failed(session, runtime, payment, state)
    return await _to_succeeded(session, runtime, payment)


async def _to_pending(session: AsyncSession, runtime: Runtime, payment: Payment) -> Settled:
    moved = await _move(session, runtime, payment, (PaymentStatus.created.value,), "pending")
    return Settled.pending if moved else Settled.unchanged


async def _to_failed(
    session: AsyncSession, runtime: Runtime, payment: Payment, state: PaymentState
) -> Settled:
    status = (
        PaymentStatus.abandoned
        if state.status == ProviderStatus.abandoned
        else PaymentStatus.failed
    )
    moved = await _move(
        session, runtime, payment, OPEN, status.value, failure_reason=state.failure_reason
    )
    if not moved:
        return Settled.unchanged
    await publish(session, PAYMENT_FAILED, await payment_event(session, payment))
    return Settled.failed


async def _move(
    session: AsyncSession,
    runtime: Runtime,
    payment: Payment,
    from_statuses: tuple[str, ...],
    to_status: str,
    *,
    failure_reason: str | None = None,
) -> bool:
    now = runtime.clock.now()
    values: dict[str, object] = {
        "status": to_status,
        "updated_at": now,
        "version": Payment.version + 1,
    }
    if failure_reason is not None:
        values["failure_reason"] = failure_reason[:500]
    if to_status == PaymentStatus.succeeded.value:
        values["succeeded_at"] = now
    moved = await session.execute(
        update(Payment)
        .where(Payment.id == payment.id, Payment.status.in_(from_statuses))
        .values(**values)
        .returning(Payment.id)
        .execution_options(synchronize_session=False)
    )
    if moved.first() is None:
        return False
    await session.refresh(payment)
    return True


async def _to_succeeded(session: AsyncSession, runtime: Runtime, payment: Payment) -> Settled:
    if payment.status in FINAL:
        return Settled.unchanged
    # Any state but a final one may still succeed (a failure reported early, then paid).
    movable = (*OPEN, PaymentStatus.failed.value, PaymentStatus.abandoned.value)
    won = False
    other = await session.scalar(
        select(Payment.id).where(
            Payment.group_id == payment.group_id,
            Payment.status == PaymentStatus.succeeded.value,
            Payment.id != payment.id,
        )
    )
    if other is None:
        try:
            # A savepoint: when a concurrent success of another payment of the group
            # committed first, the unique index refuses this one and only the savepoint
            # is undone.
            async with session.begin_nested():
                won = await _move(session, runtime, payment, movable, PaymentStatus.succeeded.value)
        except IntegrityError:
            won = False
        if not won:
            await session.refresh(payment)
            if payment.status in FINAL:
                return Settled.unchanged  # settled meanwhile by another delivery
    if not won:
        if not await _move(session, runtime, payment, movable, PaymentStatus.duplicate.value):
            return Settled.unchanged
        await _capture_to_suspense(session, runtime, payment, RefundReason.duplicate_payment)
        return Settled.refunded
    outcome = await pay_group(session, runtime, payment.group_id)
    if outcome == PayOutcome.paid:
        return await _capture_for_orders(session, runtime, payment)
    if outcome == PayOutcome.stock_gone:
        reason = RefundReason.stock_gone
    elif outcome == PayOutcome.not_payable:
        reason = RefundReason.group_cancelled
    else:
        # already_paid: the group was paid without this payment (it holds the slot now,
        # but the money belongs to no order).
        reason = RefundReason.duplicate_payment
    await _capture_to_suspense(session, runtime, payment, reason)
    return Settled.refunded


async def _capture_for_orders(session: AsyncSession, runtime: Runtime, payment: Payment) -> Settled:
    group = await group_for_payment(session, payment.group_id)
    assert group is not None  # pay_group just paid it
    shares = [
        ledger.SellerShare(
            seller_id=order.seller_id, order_id=order.order_id, gross_minor=order.subtotal_minor
        )
        for order in group.orders
        if order.status != CANCELLED_ORDER
    ]
    await ledger.post_capture(
        session,
        runtime,
        payment_id=payment.id,
        provider=payment.provider,
        currency=payment.currency,
        amount_minor=payment.amount_minor,
        shares=shares,
    )
    sellers = sorted({order.seller_id for order in group.orders})
    event = await payment_event(session, payment, outcome="paid", seller_ids=sellers)
    await publish(session, PAYMENT_SUCCEEDED, event)
    owed = sum(share.gross_minor for share in shares)
    surplus = payment.amount_minor - owed
    if surplus > 0:
        # An order was cancelled between the start and the capture: the group costs less
        # than was taken; the difference sits in suspense and goes back.
        await request_refund(
            session,
            runtime,
            payment,
            amount_minor=surplus,
            order_id=None,
            seller_id=None,
            reason=RefundReason.orders_cancelled.value,
            source=RefundSource.automatic,
            dedupe_key=f"automatic:{payment.id}:surplus",
        )
    return Settled.paid


async def _capture_to_suspense(
    session: AsyncSession, runtime: Runtime, payment: Payment, reason: RefundReason
) -> None:
    log.warning(
        "payment captured for nothing the group owes; refunding it",
        payment_id=str(payment.id),
        group_id=str(payment.group_id),
        reason=reason.value,
    )
    await ledger.post_capture(
        session,
        runtime,
        payment_id=payment.id,
        provider=payment.provider,
        currency=payment.currency,
        amount_minor=payment.amount_minor,
        shares=[],
    )
    await publish(
        session, PAYMENT_SUCCEEDED, await payment_event(session, payment, outcome=reason.value)
    )
    await request_refund(
        session,
        runtime,
        payment,
        amount_minor=payment.amount_minor - payment.refunded_minor,
        order_id=None,
        seller_id=None,
        reason=reason.value,
        source=RefundSource.automatic,
        dedupe_key=f"automatic:{payment.id}:full",
    )
