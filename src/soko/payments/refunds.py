"""Refunds: reserving the amount on the payment, sending it to the provider from a job,
and recording it in the ledger.

A refund is created in the transaction of its cause (an order cancelled, a dispute
resolved, an admin's request, an automatic refund while settling) by
:func:`request_refund`: it reserves its amount on the payment with a conditional UPDATE
(``refunded_minor + amount <= amount_minor``), so no two refunds together ever exceed the
payment, and queues job ``payments.send_refund``. Its ``dedupe_key`` names the cause, so
a cause seen twice refunds once. The job calls the provider with the refund's id as the
idempotency key (a retry never refunds twice), then posts the refund to the ledger and
publishes ``refund.succeeded``; a refusal for good gives the amount back to the payment,
flags the payment and publishes ``refund.failed``.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.orders.public import group_for_payment
from soko.payments import ledger
from soko.payments.errors import PaymentNotRefundable, RefundExceedsPayment
from soko.payments.events import REFUND_FAILED, REFUND_SUCCEEDED, RefundEvent
from soko.payments.ledger_errors import RefundExceedsCapture
from soko.payments.payment_models import (
    Payment,
    PaymentFlag,
    Refund,
    RefundSource,
    RefundStatus,
)
from soko.payments.providers.base import ProviderError, RefundRequest, RefundStatusReader
from soko.payments.providers.base import RefundStatus as ProviderRefundStatus
from soko.payments.service import enabled_providers, flag_payment, seller_ids_of_group
from soko.platform.db import dialect_insert
from soko.platform.errors import ValidationFailed
from soko.platform.ids import uuid7
from soko.platform.outbox import enqueue, publish
from soko.platform.runtime import Runtime

log = structlog.get_logger("soko.payments")

SEND_REFUND_JOB = "payments.send_refund"
#: Attempts of the provider call before a refund is given up as failed.
SEND_REFUND_ATTEMPTS = 8
#: A refund the provider accepted but has not finished is asked about again this often...
REFUND_POLL_SECONDS = 60
#: ...this many times at most, then flagged for an admin.
REFUND_POLLS = 60


class RefundConflictError(Exception):
    """Another transaction created the refund of this cause at the same moment: retry,
    and the retry finds it."""


@dataclass(frozen=True, slots=True)
class RefundAsked:
    refund: Refund
    created: bool  # False: the refund of this cause existed already


async def request_refund(
    session: AsyncSession,
    runtime: Runtime,
    payment: Payment,
    *,
    amount_minor: int,
    order_id: uuid.UUID | None,
    seller_id: uuid.UUID | None,
    reason: str,
    source: RefundSource,
    dedupe_key: str,
    requested_by: uuid.UUID | None = None,
    order_limit_minor: int | None = None,
) -> RefundAsked:
    """Create the refund of cause ``dedupe_key`` once and queue its provider call.

    Raises :class:`RefundExceedsPayment` when less than ``amount_minor`` remains
    refundable on the payment or, with ``order_id``, on that order: at most
    ``order_limit_minor`` (the order's subtotal) is refunded for one order, whatever
    the causes together (an admin's part refund, then a cancellation). The payment's row
    is locked before the order's refunds are added up, so refunds requested at the same
    moment are counted one after the other. Nothing is written when it raises."""
    existing = await session.scalar(select(Refund).where(Refund.dedupe_key == dedupe_key))
    if existing is not None:
        return RefundAsked(existing, created=False)
    if amount_minor <= 0:
        raise ValueError("a refund must be of a positive amount")
    if order_id is not None and order_limit_minor is not None:
        left = await refundable_for_order(session, payment.id, order_id, order_limit_minor)
        if amount_minor > left:
            raise RefundExceedsPayment(
                f"Only {left} {payment.currency} remain refundable on this order.",
                refundable_minor=left,
            )
    now = runtime.clock.now()
    reserved = await session.execute(
        update(Payment)
        .where(
            Payment.id == payment.id,
            Payment.refunded_minor + amount_minor <= Payment.amount_minor,
        )
        .values(
            refunded_minor=Payment.refunded_minor + amount_minor,
            updated_at=now,
            version=Payment.version + 1,
        )
        .returning(Payment.refunded_minor)
        .execution_options(synchronize_session=False)
    )
    if reserved.first() is None:
        current = await session.scalar(
            select(Payment.amount_minor - Payment.refunded_minor).where(Payment.id == payment.id)
        )
        raise RefundExceedsPayment(
            f"Only {current} {payment.currency} remain refundable on this payment.",
            refundable_minor=int(current or 0),
        )
    refund_id = uuid7()
    insert = dialect_insert(session)
    inserted = (
        await session.execute(
            insert(Refund)
            .values(
                id=refund_id,
                payment_id=payment.id,
                order_id=order_id,
                seller_id=seller_id,
                amount_minor=amount_minor,
                currency=payment.currency,
                status=RefundStatus.pending.value,
                reason=reason[:500],
                source=source.value,
                dedupe_key=dedupe_key,
                requested_by=requested_by,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["dedupe_key"])
            .returning(Refund.id)
        )
    ).scalar_one_or_none()
    if inserted is None:
        # The same cause, created concurrently and committed first: this transaction's
        # reservation must not stand. Failing it undoes the reservation; a retry finds
        # the existing refund.
        raise RefundConflictError(dedupe_key)
    await enqueue(session, SEND_REFUND_JOB, {"refund_id": str(refund_id), "poll": 0})
    refund = await session.get(Refund, refund_id)
    assert refund is not None
    await session.refresh(payment)
    log.info(
        "refund requested",
        refund_id=str(refund_id),
        payment_id=str(payment.id),
        amount_minor=amount_minor,
        source=source.value,
        reason=reason,
    )
    return RefundAsked(refund, created=True)


async def refundable_for_order(
    session: AsyncSession, payment_id: uuid.UUID, order_id: uuid.UUID, limit_minor: int
) -> int:
    """What may still be refunded for one order of a payment (its subtotal
    ``limit_minor`` less the refunds not failed), read with the payment's row locked
    until the transaction ends (PostgreSQL; SQLite's writers are serialized already)."""
    await session.execute(select(Payment.id).where(Payment.id == payment_id).with_for_update())
    return max(limit_minor - await refunded_for_order(session, payment_id, order_id), 0)


async def refunded_for_order(
    session: AsyncSession, payment_id: uuid.UUID, order_id: uuid.UUID
) -> int:
    """What refunds not failed have reserved for one order of a payment."""
    total = await session.scalar(
        select(func.coalesce(func.sum(Refund.amount_minor), 0)).where(
            Refund.payment_id == payment_id,
            Refund.order_id == order_id,
            Refund.status != RefundStatus.failed.value,
        )
    )
    return int(total or 0)


async def refund_event(session: AsyncSession, refund: Refund, payment: Payment) -> RefundEvent:
    return RefundEvent(
        refund_id=refund.id,
        payment_id=payment.id,
        group_id=payment.group_id,
        buyer_id=payment.buyer_id,
        seller_ids=await seller_ids_of_group(session, payment.group_id),
        order_id=refund.order_id,
        seller_id=refund.seller_id,
        provider=payment.provider,
        amount_minor=refund.amount_minor,
        currency=refund.currency,
        reason=refund.reason,
        source=refund.source,
        failure_reason=refund.failure_reason,
    )


async def send_refund(
    session: AsyncSession,
    runtime: Runtime,
    refund_id: uuid.UUID,
    *,
    attempt: int,
    poll: int,
) -> None:
    """The job's work: call the provider (no payment row is locked meanwhile), then
    record the outcome with conditional UPDATEs on the refund's state."""
    refund = await session.get(Refund, refund_id)
    if refund is None or refund.status != RefundStatus.pending.value:
        return  # done already: a retried or duplicated job
    payment = await session.get(Payment, refund.payment_id)
    assert payment is not None
    provider = enabled_providers(runtime).get(payment.provider)
    if provider is None:
        await _fail(session, runtime, refund, payment, "the payment's provider is not enabled")
        return
    request = RefundRequest(
        reference=str(refund.id),
        provider_payment_id=payment.provider_payment_id or "",
        payment_reference=str(payment.id),
        amount_minor=refund.amount_minor,
        currency=refund.currency,
        reason=refund.reason,
    )
    following_up = refund.provider_refund_id is not None
    if following_up and not isinstance(provider, RefundStatusReader):
        await flag_payment(
            session,
            runtime,
            payment,
            PaymentFlag.refund_failed,
            f"refund {refund.id} is pending at the provider, which cannot be asked about it",
        )
        return
    if not following_up:
        # The ledger's limits, checked before any money leaves: a refund the ledger
        # could not record afterwards is refused now, not paid out and left pending.
        room = await ledger.refundable(
            session,
            runtime,
            payment_id=payment.id,
            provider=payment.provider,
            currency=refund.currency,
            order_id=refund.order_id,
            seller_id=refund.seller_id,
        )
        if refund.amount_minor > room:
            await _fail(
                session, runtime, refund, payment, f"only {room} remains refundable in the ledger"
            )
            return
    marked = False
    if not following_up and not provider.refunds_are_idempotent:
        if refund.sent_at is not None:
            # An earlier run asked the provider and died before recording the answer:
            # asking again could pay twice, so a person checks the provider first.
            await _fail(session, runtime, refund, payment, OUTCOME_UNKNOWN)
            return
        marked = await _mark_sent(runtime, refund.id, sent=True)
    try:
        if following_up:
            # Never refund() again for a refund the provider accepted: only some
            # providers recognise a repeated request; the others would pay out twice.
            assert isinstance(provider, RefundStatusReader)
            result = await provider.refund_status(refund.provider_refund_id or "", request)
        else:
            result = await provider.refund(request)
    except ProviderError as exc:
        if exc.retryable and attempt < SEND_REFUND_ATTEMPTS:
            # Retryable means the provider did not act (see providers/http.py): the
            # next run may ask again.
            if marked:
                await _mark_sent(runtime, refund.id, sent=False)
            raise  # the outbox retries with backoff; the refund id keeps it single
        await _fail(session, runtime, refund, payment, f"provider error: {exc}")
        return
    now = runtime.clock.now()
    if result.status == ProviderRefundStatus.pending:
        await session.execute(
            update(Refund)
            .where(Refund.id == refund.id)
            .values(provider_refund_id=result.provider_refund_id, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if poll >= REFUND_POLLS:
            await flag_payment(
                session,
                runtime,
                payment,
                PaymentFlag.refund_failed,
                f"refund {refund.id} still pending at the provider",
            )
            return
        await enqueue(
            session,
            SEND_REFUND_JOB,
            {"refund_id": str(refund.id), "poll": poll + 1},
            delay=dt.timedelta(seconds=REFUND_POLL_SECONDS),
        )
        return
    if result.status == ProviderRefundStatus.failed:
        await _fail(session, runtime, refund, payment, "refused by the provider")
        return
    done = await session.execute(
        update(Refund)
        .where(Refund.id == refund.id, Refund.status == RefundStatus.pending.value)
        .values(
            status=RefundStatus.succeeded.value,
            provider_refund_id=result.provider_refund_id,
            updated_at=now,
            completed_at=now,
        )
        .returning(Refund.id)
        .execution_options(synchronize_session=False)
    )
    if done.first() is None:
        return
    await session.refresh(refund)
    try:
        await ledger.post_refund(
            session,
            runtime,
            refund_id=refund.id,
            payment_id=payment.id,
            provider=payment.provider,
            currency=refund.currency,
            amount_minor=refund.amount_minor,
            order_id=refund.order_id,
            seller_id=refund.seller_id,
        )
    except RefundExceedsCapture as exc:
        # The provider paid it out, so it succeeded; the ledger refuses it (the check
        # before the call passed, and something refunded the order meanwhile). Retrying
        # cannot help: a person records it by hand.
        log.error("a refund paid out exceeds what the ledger holds", refund_id=str(refund.id))
        await flag_payment(
            session,
            runtime,
            payment,
            PaymentFlag.refund_exceeds,
            f"refund {refund.id} was paid out but the ledger refused it: {exc}",
        )
    await publish(session, REFUND_SUCCEEDED, await refund_event(session, refund, payment))
    log.info("refund succeeded", refund_id=str(refund.id), payment_id=str(payment.id))


OUTCOME_UNKNOWN = (
    "an earlier attempt may have reached the provider and its answer was lost; check the "
    "provider's dashboard before refunding again"
)


async def _mark_sent(runtime: Runtime, refund_id: uuid.UUID, *, sent: bool) -> bool:
    """Record (or clear) that the provider is being asked, in a transaction of its own
    that commits before the call. PostgreSQL only: on SQLite the job's transaction holds
    the database's one write lock, so a second transaction would wait for it forever;
    production runs on PostgreSQL, and the sandbox's refunds are idempotent anyway."""
    if runtime.db.dialect != "postgresql":
        return False
    async with runtime.db.transaction() as marker:
        await marker.execute(
            update(Refund)
            .where(Refund.id == refund_id, Refund.status == RefundStatus.pending.value)
            .values(sent_at=runtime.clock.now() if sent else None)
            .execution_options(synchronize_session=False)
        )
    return True


async def _fail(
    session: AsyncSession, runtime: Runtime, refund: Refund, payment: Payment, why: str
) -> None:
    now = runtime.clock.now()
    failed = await session.execute(
        update(Refund)
        .where(Refund.id == refund.id, Refund.status == RefundStatus.pending.value)
        .values(
            status=RefundStatus.failed.value,
            failure_reason=why[:500],
            updated_at=now,
            completed_at=now,
        )
        .returning(Refund.id)
        .execution_options(synchronize_session=False)
    )
    if failed.first() is None:
        return
    # The amount is refundable again (an admin may retry it).
    await session.execute(
        update(Payment)
        .where(Payment.id == payment.id)
        .values(
            refunded_minor=Payment.refunded_minor - refund.amount_minor,
            updated_at=now,
            version=Payment.version + 1,
        )
        .execution_options(synchronize_session=False)
    )
    await session.refresh(refund)
    await session.refresh(payment)
    log.error("refund failed", refund_id=str(refund.id), payment_id=str(payment.id), why=why)
    await publish(session, REFUND_FAILED, await refund_event(session, refund, payment))
    await flag_payment(
        session, runtime, payment, PaymentFlag.refund_failed, f"refund {refund.id}: {why}"
    )


def payload_refund_id(payload: dict[str, Any]) -> uuid.UUID:
    return uuid.UUID(str(payload["refund_id"]))


async def admin_refund(
    session: AsyncSession,
    runtime: Runtime,
    payment: Payment,
    *,
    amount_minor: int,
    order_id: uuid.UUID | None,
    reason: str,
    actor_id: uuid.UUID,
) -> Refund:
    """An admin's refund of part of a payment: an order's share when the payment paid
    the group (``order_id`` may be left out when it paid one order only), else from the
    money in suspense (a duplicate, or a payment the group could not take)."""
    if payment.status not in ("succeeded", "duplicate"):
        raise PaymentNotRefundable(payment_status=payment.status)
    group = await group_for_payment(session, payment.group_id)
    # The orders this payment paid: an order cancelled before payment never was (its
    # money was not taken); one cancelled after was, and may still be refunded by hand
    # (its own refund failed, say), up to what is left of it.
    paid_orders = (
        [order for order in group.orders if order.paid]
        if group is not None and group.status == "paid" and payment.status == "succeeded"
        else []
    )
    seller_id: uuid.UUID | None = None
    order_limit: int | None = None
    if paid_orders:
        if order_id is None:
            standing = [order for order in paid_orders if order.status != "cancelled"]
            if len(standing) != 1:
                raise ValidationFailed.of_field(
                    "order_id", "is required: this payment paid several orders"
                )
            order_id = standing[0].order_id
        order = next((o for o in paid_orders if o.order_id == order_id), None)
        if order is None:
            raise ValidationFailed.of_field("order_id", "is not an order paid by this payment")
        seller_id = order.seller_id
        order_limit = order.subtotal_minor
    elif order_id is not None:
        raise ValidationFailed.of_field(
            "order_id", "must be left out: this payment's money belongs to no order"
        )
    asked = await request_refund(
        session,
        runtime,
        payment,
        amount_minor=amount_minor,
        order_id=order_id,
        seller_id=seller_id,
        reason=reason,
        source=RefundSource.admin,
        dedupe_key=f"admin:{uuid7()}",
        requested_by=actor_id,
        order_limit_minor=order_limit,
    )
    return asked.refund
