"""The rules of an order's life after checkout: every move a compare-and-set on the
state the mover saw, recorded with who made it and when, published through the outbox,
and followed by the stock.

Locks are always taken in one order, checkout group before its orders before stock
(inventory's rows), so two moves of one group never wait for each other in a circle.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Select, case, exists, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.inventory.public import (
    commit_hold,
    fulfil,
    rehold_if_available,
    release_hold,
    release_holds,
)
from soko.orders.errors import OrderStateConflict
from soko.orders.events import OrderMoved
from soko.orders.models import (
    REASON_MAX_LENGTH,
    CheckoutGroup,
    Dispute,
    GroupStatus,
    Order,
    OrderLine,
    OrderTransition,
)
from soko.orders.states import (
    TRANSITIONS,
    Action,
    Actor,
    OrderStatus,
    TransitionRefused,
    allowed_actions,
    transition,
)
from soko.platform.errors import NotFound
from soko.platform.ids import uuid7
from soko.platform.outbox import publish
from soko.platform.runtime import Runtime

# The timestamp each state sets on the order when it is reached.
_STAMPS: dict[OrderStatus, str] = {
    OrderStatus.paid: "paid_at",
    OrderStatus.shipped: "shipped_at",
    OrderStatus.delivered: "delivered_at",
    OrderStatus.completed: "completed_at",
    OrderStatus.cancelled: "cancelled_at",
}
JOB_BATCH = 500


@dataclass(frozen=True, slots=True)
class Acting:
    """Who makes a move: their kind in the state machine's table, and their user id
    (none for the system)."""

    kind: Actor
    user_id: uuid.UUID | None = None

    @classmethod
    def system(cls) -> Acting:
        return cls(Actor.system)


# -- reads ----------------------------------------------------------------------------------------


async def order_for(
    session: AsyncSession,
    order_id: uuid.UUID,
    *,
    buyer_id: uuid.UUID | None = None,
    seller_id: uuid.UUID | None = None,
) -> Order:
    """Order ``order_id``, if it is ``buyer_id``'s / ``seller_id``'s (when given);
    anyone else's answers 404 exactly like a missing one."""
    statement = select(Order).where(Order.id == order_id)
    if buyer_id is not None:
        statement = statement.where(Order.buyer_id == buyer_id)
    if seller_id is not None:
        statement = statement.where(Order.seller_id == seller_id)
    order = (await session.scalars(statement.execution_options(populate_existing=True))).first()
    if order is None:
        raise NotFound("No such order.")
    return order


@dataclass(frozen=True, slots=True)
class OrderDetails:
    order: Order
    lines: list[OrderLine]
    transitions: list[OrderTransition]
    dispute: Dispute | None
    shipping_address: dict[str, Any] | None


async def order_details(session: AsyncSession, order: Order) -> OrderDetails:
    """An order with its lines, its moves, its dispute and where it goes (four queries)."""
    lines = (
        await session.scalars(
            select(OrderLine).where(OrderLine.order_id == order.id).order_by(OrderLine.position)
        )
    ).all()
    moves = (
        await session.scalars(
            select(OrderTransition)
            .where(OrderTransition.order_id == order.id)
            .order_by(OrderTransition.at, OrderTransition.id)
        )
    ).all()
    dispute = (
        await session.scalars(
            select(Dispute)
            .where(Dispute.order_id == order.id)
            .execution_options(populate_existing=True)
        )
    ).first()
    address = await session.scalar(
        select(CheckoutGroup.shipping_address).where(CheckoutGroup.id == order.group_id)
    )
    return OrderDetails(order, list(lines), list(moves), dispute, address)


async def lines_by_order(
    session: AsyncSession, order_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[OrderLine]]:
    found: dict[uuid.UUID, list[OrderLine]] = {order_id: [] for order_id in order_ids}
    if order_ids:
        rows = await session.scalars(
            select(OrderLine)
            .where(OrderLine.order_id.in_(list(order_ids)))
            .order_by(OrderLine.order_id, OrderLine.position)
        )
        for line in rows:
            found[line.order_id].append(line)
    return found


@dataclass(frozen=True, slots=True)
class GroupDetails:
    group: CheckoutGroup
    orders: list[Order]
    lines: dict[uuid.UUID, list[OrderLine]]


async def group_details(
    session: AsyncSession, group_id: uuid.UUID, *, buyer_id: uuid.UUID | None = None
) -> GroupDetails:
    """A checkout group with its orders and their lines (three queries); 404 unless it
    is ``buyer_id``'s (when given)."""
    statement = select(CheckoutGroup).where(CheckoutGroup.id == group_id)
    if buyer_id is not None:
        statement = statement.where(CheckoutGroup.buyer_id == buyer_id)
    group = (await session.scalars(statement)).first()
    if group is None:
        raise NotFound("No such checkout.")
    orders = list(
        (
            await session.scalars(
                select(Order).where(Order.group_id == group.id).order_by(Order.id)
            )
        ).all()
    )
    return GroupDetails(group, orders, await lines_by_order(session, [o.id for o in orders]))


def orders_query(
    *,
    buyer_id: uuid.UUID | None = None,
    seller_id: uuid.UUID | None = None,
    status: OrderStatus | None = None,
) -> Select[Order]:
    statement = select(Order)
    if buyer_id is not None:
        statement = statement.where(Order.buyer_id == buyer_id)
    if seller_id is not None:
        statement = statement.where(Order.seller_id == seller_id)
    if status is not None:
        statement = statement.where(Order.status == status.value)
    return statement


# -- moves ----------------------------------------------------------------------------------------


def conflict(
    order_id: uuid.UUID, current: OrderStatus, action: Action, actor: Actor
) -> OrderStateConflict:
    return OrderStateConflict(
        f"The order is {current.value}: {action.value} is not possible now.",
        order_id=str(order_id),
        current_status=current.value,
        allowed_actions=[a.value for a in allowed_actions(current, actor)],
    )


def _moved(
    order: Any,  # an Order, or a row of the same columns from a bulk move
    move_from: OrderStatus,
    move_to: OrderStatus,
    acting: Acting,
    reason: str,
    at: dt.datetime,
    **extra: Any,
) -> OrderMoved:
    return OrderMoved(
        order_id=order.id,
        group_id=order.group_id,
        number=order.number,
        buyer_id=order.buyer_id,
        seller_id=order.seller_id,
        from_status=move_from.value,
        to_status=move_to.value,
        actor_id=acting.user_id,
        actor_kind=acting.kind.value,
        reason=reason,
        at=at,
        currency=order.currency,
        **extra,
    )


async def move_order(
    session: AsyncSession,
    runtime: Runtime,
    order: Order,
    action: Action,
    acting: Acting,
    *,
    reason: str = "",
    values: Mapping[str, Any] | None = None,
    refund_due_minor: int | None = None,
) -> OrderStatus:
    """Make ``action`` on ``order`` as ``acting``: a compare-and-set from the state the
    caller read (409 ``order-state-conflict`` when the table does not allow the move, or
    when someone else moved the order first), the move's record and its event. Returns
    the state the order left. ``order`` is refreshed afterwards.

    ``reason`` goes into the order's history, cut to its column's length: a longer text
    (an admin's dispute resolution note) is kept whole where its own record keeps it."""
    if len(reason) > REASON_MAX_LENGTH:
        reason = reason[: REASON_MAX_LENGTH - 1] + "…"
    current = OrderStatus(order.status)
    try:
        move = transition(action, current, acting.kind)
    except TransitionRefused as refused:
        if refused.wrong_state:
            raise conflict(order.id, current, action, acting.kind) from None
        raise
    now = runtime.clock.now()
    changes: dict[str, Any] = {"status": move.target.value, "updated_at": now, **(values or {})}
    if (stamp := _STAMPS.get(move.target)) is not None:
        changes[stamp] = now
    # Equal to the state read, not merely one the move starts from: two movers that read
    # the same state cannot both win, and the event says truly where the order came from.
    changed = await session.execute(
        update(Order)
        .where(Order.id == order.id, Order.status == current.value)
        .values(**changes, version=Order.version + 1)
        .returning(Order.id)
        .execution_options(synchronize_session=False)
    )
    if changed.first() is None:
        now_status = await session.scalar(select(Order.status).where(Order.id == order.id))
        raise conflict(order.id, OrderStatus(now_status or current), action, acting.kind)
    session.add(
        OrderTransition(
            id=uuid7(),
            order_id=order.id,
            from_status=current.value,
            to_status=move.target.value,
            actor_id=acting.user_id,
            actor_kind=acting.kind.value,
            reason=reason,
            at=now,
        )
    )
    extra: dict[str, Any] = {"refund_due_minor": refund_due_minor}
    if move.target is OrderStatus.shipped:
        extra.update(carrier=changes.get("carrier"), tracking_number=changes.get("tracking_number"))
    await publish(
        session,
        move.event,
        _moved(order, current, move.target, acting, reason, now, **extra),
        now=now,
    )
    await session.refresh(order)
    return current


async def _variant_ids(session: AsyncSession, order_id: uuid.UUID) -> list[uuid.UUID]:
    return list(
        (
            await session.scalars(
                select(OrderLine.variant_id).where(OrderLine.order_id == order_id)
            )
        ).all()
    )


async def cancel_order(
    session: AsyncSession, runtime: Runtime, order: Order, acting: Acting, *, reason: str
) -> None:
    """Cancel before shipping. The order's stock goes back; an unpaid group costs that
    much less (and is cancelled with its last order); a paid order is owed back
    (``refund_due_minor`` on ``order.cancelled``, for the payments domain)."""
    # The group's row first (lock order: group, then orders): a payment of the group
    # running now either finishes first, and this cancels a paid order, or waits.
    await session.execute(
        select(CheckoutGroup.id).where(CheckoutGroup.id == order.group_id).with_for_update()
    )
    await session.refresh(order)
    paid = order.status in (OrderStatus.paid, OrderStatus.processing)
    left = await move_order(
        session,
        runtime,
        order,
        Action.cancel,
        acting,
        reason=reason,
        refund_due_minor=order.subtotal_minor if paid else None,
    )
    await release_hold(
        session,
        runtime,
        order.group_id,
        reason="order cancelled",
        variant_ids=await _variant_ids(session, order.id),
    )
    if left is OrderStatus.pending_payment:
        still_pending = exists().where(
            Order.group_id == CheckoutGroup.id,
            Order.status == OrderStatus.pending_payment.value,
        )
        await session.execute(
            update(CheckoutGroup)
            .where(
                CheckoutGroup.id == order.group_id,
                CheckoutGroup.status == GroupStatus.pending_payment.value,
            )
            .values(
                total_minor=CheckoutGroup.total_minor - order.subtotal_minor,
                # The group is called off with its last unpaid order.
                status=case(
                    (still_pending, CheckoutGroup.status), else_=GroupStatus.cancelled.value
                ),
                updated_at=runtime.clock.now(),
                version=CheckoutGroup.version + 1,
            )
            .execution_options(synchronize_session=False)
        )


async def ship_order(
    session: AsyncSession,
    runtime: Runtime,
    order: Order,
    acting: Acting,
    *,
    carrier: str,
    tracking_number: str,
) -> None:
    """The seller handed the order to ``carrier``: its stock leaves the shelf."""
    await move_order(
        session,
        runtime,
        order,
        Action.ship,
        acting,
        values={"carrier": carrier, "tracking_number": tracking_number},
    )
    await fulfil(session, runtime, order.group_id, await _variant_ids(session, order.id))


# -- many orders at once: payment and the scheduled jobs ----------------------------------------


async def _record_bulk(
    session: AsyncSession,
    orders: Sequence[Any],
    action: Action,
    acting: Acting,
    *,
    reason: str,
    now: dt.datetime,
) -> None:
    """The moves' records and events for ``orders`` (rows returned by a bulk
    compare-and-set from the move's single source state)."""
    move = TRANSITIONS[action]
    (source,) = move.sources
    if not orders:
        return
    await session.execute(
        insert(OrderTransition),
        [
            {
                "id": uuid7(),
                "order_id": row.id,
                "from_status": source.value,
                "to_status": move.target.value,
                "actor_id": acting.user_id,
                "actor_kind": acting.kind.value,
                "reason": reason,
                "at": now,
            }
            for row in orders
        ],
    )
    for row in orders:
        await publish(
            session,
            move.event,
            _moved(row, source, move.target, acting, reason, now),
            now=now,
        )


_MOVED_COLUMNS = (
    Order.id,
    Order.group_id,
    Order.number,
    Order.buyer_id,
    Order.seller_id,
    Order.currency,
)


async def _bulk_move(
    session: AsyncSession, action: Action, where: Iterable[Any], now: dt.datetime
) -> list[Any]:
    move = TRANSITIONS[action]
    (source,) = move.sources
    changes: dict[str, Any] = {"status": move.target.value, "updated_at": now}
    if (stamp := _STAMPS.get(move.target)) is not None:
        changes[stamp] = now
    result = await session.execute(
        update(Order)
        .where(*where, Order.status == source.value)
        .values(**changes, version=Order.version + 1)
        .returning(*_MOVED_COLUMNS)
        .execution_options(synchronize_session=False)
    )
    return list(result.all())


async def mark_group_paid(
    session: AsyncSession, runtime: Runtime, group_id: uuid.UUID, acting: Acting
) -> bool:
    now = runtime.clock.now()
    paid = await session.execute(
        update(CheckoutGroup)
        .where(
            CheckoutGroup.id == group_id,
            CheckoutGroup.status == GroupStatus.pending_payment.value,
        )
        .values(
            status=GroupStatus.paid.value,
            paid_at=now,
            updated_at=now,
            version=CheckoutGroup.version + 1,
        )
        .returning(CheckoutGroup.id)
        .execution_options(synchronize_session=False)
    )
    if paid.first() is None:
        return False
    orders = await _bulk_move(session, Action.pay, [Order.group_id == group_id], now)
    await _record_bulk(session, orders, Action.pay, acting, reason="", now=now)
    await commit_hold(session, runtime, group_id)
    return True


class PayOutcome(StrEnum):
    """What confirmed money for a checkout group did to it (:func:`pay_group`)."""

    paid = "paid"  # the group and its unpaid orders are paid now; the stock is theirs
    already_paid = "already_paid"  # paid before (by this payment's earlier delivery or another)
    stock_gone = "stock_gone"  # the holds ran out and the stock was sold meanwhile: unchanged
    not_payable = "not_payable"  # cancelled (or no such group): nothing to pay for


#: The reason recorded on the moves of a group paid after its stock holds ran out.
PAID_LATE = "paid after the hold expired"
# The orders a payment pays: those not cancelled (an expired group's orders are expired).
_PAYABLE_ORDERS = (OrderStatus.pending_payment.value, OrderStatus.expired.value)
_PAYABLE_GROUPS = (GroupStatus.pending_payment.value, GroupStatus.expired.value)


async def pay_group(
    session: AsyncSession, runtime: Runtime, group_id: uuid.UUID, acting: Acting
) -> PayOutcome:
    """Money for ``group_id`` is confirmed: pay the group and its unpaid orders, with
    their stock, whether or not the holds are still running.

    The group's compare-and-set (``pending_payment`` or ``expired`` -> ``paid``) comes
    first and is the arbiter: its row lock makes a concurrent payment or the expiry job
    wait, and whoever comes second sees the winner's state. Then the payable orders are
    locked (lock order: group, orders, stock), their stock is held again where the holds
    ran out or were released by the expiry job (``rehold_if_available``, all or nothing,
    only the variants of these orders, so a cancelled order's stock stays on sale), the
    orders move (``pay`` from ``pending_payment``, ``pay_late`` from ``expired``, each a
    compare-and-set recorded and publishing ``order.paid``) and the holds are committed.
    Holds are re-taken even while they still run: a hold past its time can be released by
    another buyer's checkout at any moment, and the re-take locks our reservation rows
    until commit. When the stock no longer allows it, everything rolls back to a
    savepoint and the answer is ``stock_gone``."""
    async with session.begin_nested() as savepoint:
        now = runtime.clock.now()
        won = (
            await session.execute(
                update(CheckoutGroup)
                .where(CheckoutGroup.id == group_id, CheckoutGroup.status.in_(_PAYABLE_GROUPS))
                .values(
                    status=GroupStatus.paid.value,
                    paid_at=now,
                    updated_at=now,
                    version=CheckoutGroup.version + 1,
                )
                .returning(CheckoutGroup.reservation_expires_at)
                .execution_options(synchronize_session=False)
            )
        ).first()
        if won is None:
            status = await session.scalar(
                select(CheckoutGroup.status).where(CheckoutGroup.id == group_id)
            )
            return PayOutcome.already_paid if status == GroupStatus.paid else PayOutcome.not_payable
        rows = (
            await session.execute(
                select(Order.id, Order.status, OrderLine.variant_id)
                .join(OrderLine, OrderLine.order_id == Order.id)
                .where(Order.group_id == group_id, Order.status.in_(_PAYABLE_ORDERS))
                .order_by(Order.id)
                .with_for_update(of=Order)
            )
        ).all()
        if not rows:  # a group that is not cancelled always has an order to pay
            await savepoint.rollback()
            return PayOutcome.not_payable
        held_until = now + dt.timedelta(seconds=runtime.settings.reservation_hold_seconds)
        if not await rehold_if_available(
            session, runtime, group_id, held_until, variant_ids={row.variant_id for row in rows}
        ):
            await savepoint.rollback()
            return PayOutcome.stock_gone
        late = won.reservation_expires_at <= now
        paid = await _bulk_move(session, Action.pay, [Order.group_id == group_id], now)
        await _record_bulk(
            session, paid, Action.pay, acting, reason=PAID_LATE if late else "", now=now
        )
        paid_late = await _bulk_move(session, Action.pay_late, [Order.group_id == group_id], now)
        await _record_bulk(session, paid_late, Action.pay_late, acting, reason=PAID_LATE, now=now)
        await commit_hold(session, runtime, group_id)
    return PayOutcome.paid


async def expire_unpaid(session: AsyncSession, runtime: Runtime, *, limit: int = JOB_BATCH) -> int:
    """Groups still unpaid when their stock holds ran out: the group and its unpaid
    orders expire and the stock goes back. How many groups expired."""
    now = runtime.clock.now()
    due = (
        select(CheckoutGroup.id)
        .where(
            CheckoutGroup.status == GroupStatus.pending_payment.value,
            CheckoutGroup.reservation_expires_at <= now,
        )
        .order_by(CheckoutGroup.reservation_expires_at)
        .limit(limit)
    )
    expired = await session.execute(
        update(CheckoutGroup)
        .where(
            CheckoutGroup.id.in_(due.scalar_subquery()),
            CheckoutGroup.status == GroupStatus.pending_payment.value,
        )
        .values(status=GroupStatus.expired.value, updated_at=now, version=CheckoutGroup.version + 1)
        .returning(CheckoutGroup.id)
        .execution_options(synchronize_session=False)
    )
    group_ids = list(expired.scalars().all())
    if not group_ids:
        return 0
    orders = await _bulk_move(session, Action.expire, [Order.group_id.in_(group_ids)], now)
    await _record_bulk(
        session, orders, Action.expire, Acting.system(), reason="not paid in time", now=now
    )
    # All at once: one pass locks the stock rows in key order, as every writer does.
    await release_holds(session, runtime, group_ids, reason="checkout expired")
    return len(group_ids)


async def complete_delivered(
    session: AsyncSession, runtime: Runtime, *, limit: int = JOB_BATCH
) -> int:
    """Delivered orders whose dispute window has passed without a dispute become
    completed. How many."""
    now = runtime.clock.now()
    cutoff = now - dt.timedelta(days=runtime.settings.dispute_window_days)
    due = (
        select(Order.id)
        .where(
            Order.status == OrderStatus.delivered.value,
            Order.delivered_at <= cutoff,
        )
        .order_by(Order.delivered_at)
        .limit(limit)
    )
    orders = await _bulk_move(session, Action.complete, [Order.id.in_(due.scalar_subquery())], now)
    await _record_bulk(
        session,
        orders,
        Action.complete,
        Acting.system(),
        reason="dispute window passed",
        now=now,
    )
    return len(orders)


def dispute_window_closes(order: Order, runtime: Runtime) -> dt.datetime | None:
    if order.delivered_at is None:
        return None
    return order.delivered_at + dt.timedelta(days=runtime.settings.dispute_window_days)


# -- a deleted buyer ----------------------------------------------------------------------------


def _kept_of_address(address: Mapping[str, Any]) -> dict[str, Any]:
    """What an erased shipping address keeps: its country, which tax records need."""
    country = address.get("country")
    kept: dict[str, Any] = {"erased": True}
    if isinstance(country, str) and len(country) <= 64:
        kept["country"] = country
    return kept


async def forget_buyer(session: AsyncSession, buyer_id: uuid.UUID) -> int:
    """Erase what identifies a deleted buyer in their orders: the shipping addresses of
    their checkouts (all but the country) and the details and evidence of their
    disputes. The orders, their lines and amounts stay. Returns the checkouts changed."""
    rows = (
        await session.execute(
            select(CheckoutGroup.id, CheckoutGroup.shipping_address).where(
                CheckoutGroup.buyer_id == buyer_id, CheckoutGroup.shipping_address.is_not(None)
            )
        )
    ).all()
    erased = 0
    for group_id, address in rows:
        if isinstance(address, Mapping) and address.get("erased") is True:
            continue  # done by an earlier delivery of the event
        kept = _kept_of_address(address) if isinstance(address, Mapping) else {"erased": True}
        await session.execute(
            update(CheckoutGroup)
            .where(CheckoutGroup.id == group_id)
            .values(shipping_address=kept)
            .execution_options(synchronize_session=False)
        )
        erased += 1
    await session.execute(
        update(Dispute)
        .where(Dispute.buyer_id == buyer_id)
        .values(details="", evidence_urls=[])
        .execution_options(synchronize_session=False)
    )
    return erased
