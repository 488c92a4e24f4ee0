"""An order's life as one declared table: which move leads from which states to which,
who may make it, and the event it publishes.

Pure: no database, no clock. The service makes each move a compare-and-set on the states
this table allows (``UPDATE orders ... WHERE status IN (<sources>)``), so the table is
both the documentation and the guard.

The table (``TRANSITIONS``), in words:

=================  ==========================================  ==============  ===============
move               from                                        to              who
=================  ==========================================  ==============  ===============
pay                pending_payment                             paid            system
pay_late           expired                                     paid            system
cancel             pending_payment, paid, processing           cancelled       buyer, seller
expire             pending_payment                             expired         system
accept             paid                                        processing      seller
ship               processing                                  shipped         seller
deliver            shipped                                     delivered       buyer, seller
complete           delivered                                   completed       system
dispute            delivered, shipped (not received, late)     disputed        buyer
refund             disputed                                    refunded        admin
reject_dispute     disputed                                    completed       admin
=================  ==========================================  ==============  ===============
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum


class OrderStatus(StrEnum):
    pending_payment = "pending_payment"  # placed; stock held until the group is paid
    paid = "paid"  # the checkout group was paid; stock allocated
    processing = "processing"  # the seller accepted it and is preparing it
    shipped = "shipped"  # handed to a carrier
    delivered = "delivered"  # the buyer has it; the dispute window runs
    completed = "completed"  # closed: nothing more can happen
    cancelled = "cancelled"  # by the buyer or the seller before shipping
    expired = "expired"  # not paid before its stock holds ran out
    disputed = "disputed"  # the buyer opened a dispute; an admin settles it
    refunded = "refunded"  # a dispute settled with a refund


class Actor(StrEnum):
    """Who makes a move."""

    buyer = "buyer"
    seller = "seller"  # a member of the order's store
    admin = "admin"  # the marketplace's staff
    system = "system"  # payments, scheduled jobs


class Action(StrEnum):
    pay = "pay"
    pay_late = "pay_late"
    cancel = "cancel"
    expire = "expire"
    accept = "accept"
    ship = "ship"
    deliver = "deliver"
    complete = "complete"
    dispute = "dispute"
    refund = "refund"
    reject_dispute = "reject_dispute"


@dataclass(frozen=True, slots=True)
class Transition:
    """One declared move."""

    action: Action
    sources: frozenset[OrderStatus]
    target: OrderStatus
    actors: frozenset[Actor]
    event: str


def _move(
    action: Action,
    sources: Iterable[OrderStatus],
    target: OrderStatus,
    actors: Iterable[Actor],
    event: str,
) -> Transition:
    return Transition(action, frozenset(sources), target, frozenset(actors), event)


S = OrderStatus
A = Actor

TRANSITIONS: Mapping[Action, Transition] = {
    move.action: move
    for move in (
        # Payments (a later issue) move the whole checkout group through orders.public.
        _move(Action.pay, [S.pending_payment], S.paid, [A.system], "order.paid"),
        # A payment confirmed after the expiry job ran is not lost: when the stock can
        # be held again, the expired order is paid after all (orders.public.pay_group).
        _move(Action.pay_late, [S.expired], S.paid, [A.system], "order.paid"),
        # Before shipping, either side may call the order off; after payment, the
        # payments issue refunds it on order.cancelled.
        _move(
            Action.cancel,
            [S.pending_payment, S.paid, S.processing],
            S.cancelled,
            [A.buyer, A.seller],
            "order.cancelled",
        ),
        _move(Action.expire, [S.pending_payment], S.expired, [A.system], "order.expired"),
        _move(Action.accept, [S.paid], S.processing, [A.seller], "order.processing"),
        _move(Action.ship, [S.processing], S.shipped, [A.seller], "order.shipped"),
        # The buyer confirms receipt, or the seller records a delivery they can prove.
        _move(Action.deliver, [S.shipped], S.delivered, [A.buyer, A.seller], "order.delivered"),
        # Once the dispute window has passed without a dispute (a scheduled job).
        _move(Action.complete, [S.delivered], S.completed, [A.system], "order.completed"),
        # From shipped only as "not received", once the parcel is late (the service
        # checks both): a seller who never marks it delivered cannot block a dispute.
        _move(Action.dispute, [S.delivered, S.shipped], S.disputed, [A.buyer], "order.disputed"),
        _move(Action.refund, [S.disputed], S.refunded, [A.admin], "order.refunded"),
        _move(Action.reject_dispute, [S.disputed], S.completed, [A.admin], "order.completed"),
    )
}

#: States no move leaves. ``expired`` is not one of them: nobody may act on an expired
#: order, but a payment confirmed late still pays it (``pay_late``, by the system).
FINAL_STATES: frozenset[OrderStatus] = frozenset({S.completed, S.cancelled, S.refunded})

#: The event an order publishes when it is created (not a move: it has no source state).
PLACED_EVENT = "order.placed"
#: The state an order is created in.
INITIAL_STATE = S.pending_payment


class TransitionRefused(Exception):
    """The table does not allow ``actor`` to make ``action`` from ``current``.

    ``wrong_state`` says whether the order's state is the reason (someone else moved it
    first, or the move comes too late); otherwise the actor may never make this move."""

    def __init__(self, action: Action, current: OrderStatus, actor: Actor) -> None:
        self.action = action
        self.current = current
        self.actor = actor
        move = TRANSITIONS[action]
        self.wrong_state = current not in move.sources
        if actor not in move.actors:
            because = f"{action.value} is not a {actor.value}'s move"
        else:
            because = f"{action.value} is not allowed on an order that is {current.value}"
        super().__init__(because)


def transition(action: Action, current: OrderStatus, actor: Actor) -> Transition:
    """The move ``actor`` makes with ``action`` from ``current``; raises
    :class:`TransitionRefused` when the table does not allow it."""
    move = TRANSITIONS[action]
    if current not in move.sources or actor not in move.actors:
        raise TransitionRefused(action, current, actor)
    return move


def can(action: Action, current: OrderStatus, actor: Actor) -> bool:
    move = TRANSITIONS[action]
    return current in move.sources and actor in move.actors


def allowed_actions(current: OrderStatus, actor: Actor) -> list[Action]:
    """What ``actor`` may do to an order in ``current``, in the table's order (for a
    client to show the right buttons)."""
    return [action for action in TRANSITIONS if can(action, current, actor)]


def reachable_from(start: OrderStatus) -> frozenset[OrderStatus]:
    """Every state some sequence of moves leads to from ``start`` (itself included)."""
    seen = {start}
    frontier = [start]
    while frontier:
        state = frontier.pop()
        for move in TRANSITIONS.values():
            if state in move.sources and move.target not in seen:
                seen.add(move.target)
                frontier.append(move.target)
    return frozenset(seen)
