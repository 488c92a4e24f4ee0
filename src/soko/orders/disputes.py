"""Disputes: a buyer complains about a delivered order within the marketplace's window
(or about a shipped one that is late, as not received), the seller answers, and the
marketplace settles it with a refund (in full or in part) or for the seller. Each step
is an event; the money of a refund moves in the payments domain, on
``dispute.resolved``.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.orders.errors import (
    DisputeStateConflict,
    DisputeTooEarly,
    DisputeWindowClosed,
    OrderStateConflict,
)
from soko.orders.events import DISPUTE_ANSWERED, DISPUTE_OPENED, DISPUTE_RESOLVED, DisputeEvent
from soko.orders.models import Dispute, DisputeReason, DisputeStatus, Order
from soko.orders.service import Acting, dispute_window_closes, move_order
from soko.orders.states import Action, OrderStatus
from soko.platform.errors import NotFound, ValidationFailed
from soko.platform.ids import uuid7
from soko.platform.outbox import publish
from soko.platform.runtime import Runtime

UNRESOLVED = (DisputeStatus.open.value, DisputeStatus.answered.value)


def _event(dispute: Dispute, acting: Acting, **extra: Any) -> DisputeEvent:
    return DisputeEvent(
        dispute_id=dispute.id,
        order_id=dispute.order_id,
        buyer_id=dispute.buyer_id,
        seller_id=dispute.seller_id,
        status=dispute.status,
        actor_id=acting.user_id,
        at=dispute.resolved_at or dispute.responded_at or dispute.opened_at,
        **extra,
    )


async def open_dispute(
    session: AsyncSession,
    runtime: Runtime,
    order: Order,
    acting: Acting,
    *,
    reason: DisputeReason,
    details: str,
    evidence_urls: Sequence[str],
) -> Dispute:
    """The buyer disputes ``order`` (delivered, within the window; or shipped, late and
    not received): the order becomes disputed and the dispute waits for the seller."""
    closes = dispute_window_closes(order, runtime)
    now = runtime.clock.now()
    if order.status == OrderStatus.shipped.value:
        if reason is not DisputeReason.not_received:
            raise ValidationFailed.of_field(
                "reason", "must be not_received: the order is not delivered yet"
            )
        days = runtime.settings.dispute_not_received_after_days
        opens = (order.shipped_at or now) + dt.timedelta(days=days)
        if now < opens:
            opens_at = opens.isoformat().replace("+00:00", "Z")
            raise DisputeTooEarly(
                f"The order shipped recently; if it has not arrived by {opens_at}, "
                "dispute it then as not received.",
                opens_at=opens_at,
                not_received_after_days=days,
            )
    if order.status == OrderStatus.delivered.value and closes is not None and now > closes:
        closed_at = closes.isoformat().replace("+00:00", "Z")
        raise DisputeWindowClosed(
            f"Disputes about this order could be opened until {closed_at}.",
            closed_at=closed_at,
            window_days=runtime.settings.dispute_window_days,
        )
    await move_order(session, runtime, order, Action.dispute, acting, reason=reason.value)
    dispute = Dispute(
        id=uuid7(),
        order_id=order.id,
        buyer_id=order.buyer_id,
        seller_id=order.seller_id,
        status=DisputeStatus.open.value,
        reason=reason.value,
        details=details,
        evidence_urls=list(evidence_urls),
        opened_at=now,
        version=1,
    )
    session.add(dispute)
    await publish(session, DISPUTE_OPENED, _event(dispute, acting), now=now)
    await session.flush()
    return dispute


async def dispute_of(
    session: AsyncSession, order_id: uuid.UUID, *, seller_id: uuid.UUID | None = None
) -> Dispute:
    statement = select(Dispute).where(Dispute.order_id == order_id)
    if seller_id is not None:
        statement = statement.where(Dispute.seller_id == seller_id)
    dispute = (await session.scalars(statement.execution_options(populate_existing=True))).first()
    if dispute is None:
        raise NotFound("This order has no dispute.")
    return dispute


def _state_conflict(dispute_id: uuid.UUID, current: str, what: str) -> DisputeStateConflict:
    return DisputeStateConflict(
        f"The dispute is {current}: it cannot be {what} now.",
        dispute_id=str(dispute_id),
        current_status=current,
    )


async def answer_dispute(
    session: AsyncSession, runtime: Runtime, dispute: Dispute, acting: Acting, *, response: str
) -> Dispute:
    """The seller's side of the story, once, while the dispute is open."""
    now = runtime.clock.now()
    answered = await session.execute(
        update(Dispute)
        .where(Dispute.id == dispute.id, Dispute.status == DisputeStatus.open.value)
        .values(
            status=DisputeStatus.answered.value,
            seller_response=response,
            responded_by=acting.user_id,
            responded_at=now,
            version=Dispute.version + 1,
        )
        .returning(Dispute.id)
        .execution_options(synchronize_session=False)
    )
    if answered.first() is None:
        await session.refresh(dispute)
        raise _state_conflict(dispute.id, dispute.status, "answered")
    await session.refresh(dispute)
    await publish(session, DISPUTE_ANSWERED, _event(dispute, acting), now=now)
    return dispute


async def resolve_dispute(
    session: AsyncSession,
    runtime: Runtime,
    dispute: Dispute,
    order: Order,
    acting: Acting,
    *,
    refund: bool,
    refund_minor: int | None,
    note: str,
) -> Dispute:
    """Settle the dispute: with a refund of ``refund_minor`` (the whole order when
    ``None``; at most its subtotal), or for the seller (the order completes)."""
    if dispute.status not in UNRESOLVED:
        raise _state_conflict(dispute.id, dispute.status, "resolved")
    amount: int | None = None
    if refund:
        amount = order.subtotal_minor if refund_minor is None else refund_minor
        if not 0 < amount <= order.subtotal_minor:
            raise ValidationFailed.of_field(
                "refund_minor",
                f"must be between 1 and the order's subtotal, {order.subtotal_minor}",
            )
    elif refund_minor is not None:
        raise ValidationFailed.of_field("refund_minor", "is only for a refund")
    # The order first, like every move: its row is locked before the dispute's.
    try:
        await move_order(
            session,
            runtime,
            order,
            Action.refund if refund else Action.reject_dispute,
            acting,
            reason=note,
            refund_due_minor=amount,
        )
    except OrderStateConflict:
        # Two resolutions at once: the other moved the order and, in the same
        # transaction (committed by the time this move found the order moved), settled
        # the dispute. Say that, not what became of the order.
        current = await session.scalar(select(Dispute.status).where(Dispute.id == dispute.id))
        if current is not None and current not in UNRESOLVED:
            raise _state_conflict(dispute.id, current, "resolved") from None
        raise
    now = runtime.clock.now()
    status = DisputeStatus.resolved_refund if refund else DisputeStatus.resolved_rejected
    resolved = await session.execute(
        update(Dispute)
        .where(Dispute.id == dispute.id, Dispute.status.in_(UNRESOLVED))
        .values(
            status=status.value,
            resolution_note=note,
            refund_minor=amount,
            resolved_by=acting.user_id,
            resolved_at=now,
            version=Dispute.version + 1,
        )
        .returning(Dispute.id)
        .execution_options(synchronize_session=False)
    )
    if resolved.first() is None:
        await session.refresh(dispute)
        raise _state_conflict(dispute.id, dispute.status, "resolved")
    await session.refresh(dispute)
    await publish(
        session,
        DISPUTE_RESOLVED,
        _event(
            dispute,
            acting,
            outcome="refund" if refund else "reject",
            refund_minor=amount,
            currency=order.currency,
        ),
        now=now,
    )
    return dispute
