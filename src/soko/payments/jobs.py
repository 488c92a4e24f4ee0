"""The payments domain's jobs, event handlers and schedule: processing inbound
webhooks, sending refunds, refunding cancelled orders and resolved disputes, and
reconciling open payments."""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from soko.orders.events import DISPUTE_RESOLVED, ORDER_CANCELLED, DisputeEvent, OrderMoved
from soko.orders.public import order_summary
from soko.payments.errors import RefundExceedsPayment
from soko.payments.intake import PROCESS_EVENT_JOB, process_event
from soko.payments.payment_models import PaymentFlag, RefundSource
from soko.payments.reconciliation import (
    RECONCILE_PAYMENT_JOB,
    queue_stale_payments,
    reconcile_payment,
)
from soko.payments.refunds import (
    SEND_REFUND_ATTEMPTS,
    SEND_REFUND_JOB,
    payload_refund_id,
    request_refund,
    send_refund,
)
from soko.payments.service import flag_payment, succeeded_payment_of_group
from soko.platform.jobs import JobContext, registry
from soko.platform.runtime import Runtime

log = structlog.get_logger("soko.payments")


@registry.job(PROCESS_EVENT_JOB)
async def process_webhook_event(ctx: JobContext, payload: dict[str, Any]) -> None:
    """A stored webhook: confirm with the provider and settle the payment."""
    await process_event(ctx.session, ctx.services, uuid.UUID(str(payload["event_row_id"])))


@registry.job(SEND_REFUND_JOB, max_attempts=SEND_REFUND_ATTEMPTS)
async def send_refund_job(ctx: JobContext, payload: dict[str, Any]) -> None:
    """A refund's provider call, retried with the outbox's backoff."""
    await send_refund(
        ctx.session,
        ctx.services,
        payload_refund_id(payload),
        attempt=ctx.attempt,
        poll=int(payload.get("poll", 0)),
    )


async def _refund_order(
    session: AsyncSession,
    runtime: Runtime,
    *,
    group_id: uuid.UUID,
    order_id: uuid.UUID,
    seller_id: uuid.UUID,
    amount_minor: int,
    order_limit_minor: int,
    reason: str,
    source: RefundSource,
    dedupe_key: str,
) -> None:
    """Refund what a cause owes on one order. Refunds of the order before it (an admin's
    part refund) count: when less is left on the order than the cause owes, what is left
    is refunded and the payment flagged ``refund_exceeds`` for a person to look at."""
    payment = await succeeded_payment_of_group(session, group_id)
    if payment is None:
        # Paid without a payment of this domain (an admin's manual step): nothing to give back here.
        log.warning("refund owed for a group without a succeeded payment", group_id=str(group_id))
        return
    owed = amount_minor
    while True:
        try:
            await request_refund(
                session,
                runtime,
                payment,
                amount_minor=owed,
                order_id=order_id,
                seller_id=seller_id,
                reason=reason,
                source=source,
                dedupe_key=dedupe_key,
                order_limit_minor=order_limit_minor,
            )
        except RefundExceedsPayment as exc:
            left = int(exc.extensions.get("refundable_minor") or 0)
            await flag_payment(
                session,
                runtime,
                payment,
                PaymentFlag.refund_exceeds,
                f"{dedupe_key}: {amount_minor} owed, {left} left to refund"
                + (", which is refunded" if 0 < left < owed else ""),
            )
            if 0 < left < owed:
                owed = left  # nothing was written: ask again for what is left
                continue
        return


@registry.on(ORDER_CANCELLED, name="payments.refund_cancelled")
async def refund_cancelled_order(ctx: JobContext, payload: dict[str, Any]) -> None:
    """A paid order was cancelled: its subtotal goes back to the buyer."""
    moved = OrderMoved.model_validate(payload)
    if not moved.refund_due_minor or moved.refund_due_minor <= 0:
        return
    await _refund_order(
        ctx.session,
        ctx.services,
        group_id=moved.group_id,
        order_id=moved.order_id,
        seller_id=moved.seller_id,
        amount_minor=moved.refund_due_minor,
        # What a cancellation owes is the order's subtotal, its most for one order.
        order_limit_minor=moved.refund_due_minor,
        reason=f"order {moved.number} cancelled" + (f": {moved.reason}" if moved.reason else ""),
        source=RefundSource.cancellation,
        dedupe_key=f"order.cancelled:{moved.order_id}",
    )


@registry.on(DISPUTE_RESOLVED, name="payments.refund_dispute")
async def refund_resolved_dispute(ctx: JobContext, payload: dict[str, Any]) -> None:
    """A dispute settled with a refund: that amount goes back to the buyer."""
    dispute = DisputeEvent.model_validate(payload)
    if dispute.outcome != "refund" or not dispute.refund_minor or dispute.refund_minor <= 0:
        return
    order = await order_summary(ctx.session, dispute.order_id)
    if order is None:
        log.warning("resolved dispute for a missing order", order_id=str(dispute.order_id))
        return
    await _refund_order(
        ctx.session,
        ctx.services,
        group_id=order.group_id,
        order_id=order.id,
        seller_id=order.seller_id,
        amount_minor=dispute.refund_minor,
        order_limit_minor=order.subtotal_minor,
        reason=f"dispute on order {order.number} resolved with a refund",
        source=RefundSource.dispute,
        dedupe_key=f"dispute:{dispute.dispute_id}",
    )


@registry.schedule("*/5 * * * *", name="payments.reconcile")
async def reconcile(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Every five minutes: open payments past the threshold are queued to be settled on
    what their provider says, a job each."""
    run = str(payload.get("scheduled_for") or ctx.message_id)
    queued = await queue_stale_payments(ctx.session, ctx.services, run)
    if queued:
        log.info("payments queued for reconciliation", queued=queued)


@registry.job(RECONCILE_PAYMENT_JOB)
async def reconcile_one_payment(ctx: JobContext, payload: dict[str, Any]) -> None:
    """One stale payment: its provider asked once, then settled on the answer."""
    payment_id = uuid.UUID(str(payload["payment_id"]))
    settled = await reconcile_payment(ctx.session, ctx.services, payment_id)
    if settled is not None:
        log.info("payment reconciled", payment_id=str(payment_id), outcome=settled.value)
