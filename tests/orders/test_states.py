"""The order state machine as a table, without a database."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from soko.orders.states import (
    FINAL_STATES,
    INITIAL_STATE,
    TRANSITIONS,
    Action,
    Actor,
    OrderStatus,
    TransitionRefused,
    allowed_actions,
    can,
    reachable_from,
    transition,
)

S = OrderStatus

# The table as the issue and docs/orders.md state it: (action, from, to, who, event).
EXPECTED = {
    (Action.pay, S.pending_payment, S.paid, frozenset({Actor.system}), "order.paid"),
    (Action.pay_late, S.expired, S.paid, frozenset({Actor.system}), "order.paid"),
    (
        Action.cancel,
        S.pending_payment,
        S.cancelled,
        frozenset({Actor.buyer, Actor.seller}),
        "order.cancelled",
    ),
    (Action.cancel, S.paid, S.cancelled, frozenset({Actor.buyer, Actor.seller}), "order.cancelled"),
    (
        Action.cancel,
        S.processing,
        S.cancelled,
        frozenset({Actor.buyer, Actor.seller}),
        "order.cancelled",
    ),
    (Action.expire, S.pending_payment, S.expired, frozenset({Actor.system}), "order.expired"),
    (Action.accept, S.paid, S.processing, frozenset({Actor.seller}), "order.processing"),
    (Action.ship, S.processing, S.shipped, frozenset({Actor.seller}), "order.shipped"),
    (
        Action.deliver,
        S.shipped,
        S.delivered,
        frozenset({Actor.buyer, Actor.seller}),
        "order.delivered",
    ),
    (Action.complete, S.delivered, S.completed, frozenset({Actor.system}), "order.completed"),
    (Action.dispute, S.delivered, S.disputed, frozenset({Actor.buyer}), "order.disputed"),
    # Not received: the service lets it through only once the parcel is late.
    (Action.dispute, S.shipped, S.disputed, frozenset({Actor.buyer}), "order.disputed"),
    (Action.refund, S.disputed, S.refunded, frozenset({Actor.admin}), "order.refunded"),
    (Action.reject_dispute, S.disputed, S.completed, frozenset({Actor.admin}), "order.completed"),
}


def test_the_table_is_the_one_documented() -> None:
    declared = {
        (move.action, source, move.target, move.actors, move.event)
        for move in TRANSITIONS.values()
        for source in move.sources
    }
    assert declared == EXPECTED
    assert set(TRANSITIONS) == set(Action)


@pytest.mark.parametrize("action", list(Action))
@pytest.mark.parametrize("current", list(OrderStatus))
@pytest.mark.parametrize("actor", list(Actor))
def test_every_move_is_allowed_exactly_as_the_table_says(
    action: Action, current: OrderStatus, actor: Actor
) -> None:
    allowed = any(
        a == action and source == current and actor in actors
        for a, source, _, actors, _ in EXPECTED
    )
    assert can(action, current, actor) is allowed
    if allowed:
        assert transition(action, current, actor) is TRANSITIONS[action]
    else:
        with pytest.raises(TransitionRefused) as refused:
            transition(action, current, actor)
        # The refusal says whether the order's state was the reason.
        assert refused.value.wrong_state is (current not in TRANSITIONS[action].sources)


def test_final_states_have_no_way_out() -> None:
    for state in FINAL_STATES:
        for actor in Actor:
            assert allowed_actions(state, actor) == []
    assert {S.completed, S.cancelled, S.refunded} == FINAL_STATES


def test_an_expired_order_is_only_paid_late_by_the_system() -> None:
    # Nobody may act on an expired order; a payment confirmed after the expiry job ran
    # still pays it (orders.public.pay_group), and it then goes on like any paid order.
    for actor in (Actor.buyer, Actor.seller, Actor.admin):
        assert allowed_actions(S.expired, actor) == []
    assert allowed_actions(S.expired, Actor.system) == [Action.pay_late]
    move = transition(Action.pay_late, S.expired, Actor.system)
    assert (move.target, move.event) == (S.paid, TRANSITIONS[Action.pay].event)
    # Both payment moves lead to paid, from the two states an unpaid order can be in.
    assert {
        source for action in (Action.pay, Action.pay_late) for source in TRANSITIONS[action].sources
    } == {S.pending_payment, S.expired}
    with pytest.raises(TransitionRefused) as refused:
        transition(Action.pay_late, S.pending_payment, Actor.system)
    assert refused.value.wrong_state
    with pytest.raises(TransitionRefused) as refused:
        transition(Action.pay_late, S.expired, Actor.admin)
    assert not refused.value.wrong_state
    assert reachable_from(S.expired) == reachable_from(S.paid) | {S.expired}


def test_every_state_is_reachable_from_placement_and_every_path_ends() -> None:
    assert INITIAL_STATE is S.pending_payment
    assert reachable_from(INITIAL_STATE) == set(OrderStatus)
    for state in OrderStatus:
        assert reachable_from(state) & FINAL_STATES, state


def test_nothing_leads_back_to_placement_or_out_of_shipping_into_a_cancel() -> None:
    # Once shipped, an order can no longer be cancelled: only delivered and what follows.
    assert reachable_from(S.shipped) == {
        S.shipped,
        S.delivered,
        S.completed,
        S.disputed,
        S.refunded,
    }
    assert all(move.target is not S.pending_payment for move in TRANSITIONS.values())


def test_what_each_party_may_do() -> None:
    assert allowed_actions(S.pending_payment, Actor.buyer) == [Action.cancel]
    assert allowed_actions(S.pending_payment, Actor.system) == [Action.pay, Action.expire]
    assert allowed_actions(S.paid, Actor.seller) == [Action.cancel, Action.accept]
    assert allowed_actions(S.shipped, Actor.buyer) == [Action.deliver, Action.dispute]
    assert allowed_actions(S.delivered, Actor.buyer) == [Action.dispute]
    assert allowed_actions(S.delivered, Actor.system) == [Action.complete]
    assert allowed_actions(S.disputed, Actor.admin) == [Action.refund, Action.reject_dispute]
    assert allowed_actions(S.disputed, Actor.seller) == []


@given(
    st.lists(st.tuples(st.sampled_from(list(Action)), st.sampled_from(list(Actor))), max_size=30)
)
def test_any_sequence_of_attempts_follows_the_table(attempts: list[tuple[Action, Actor]]) -> None:
    """Whatever anyone tries, in any order: an order only moves along the table, never
    leaves a final state, and every state it passes through is reachable."""
    state = INITIAL_STATE
    seen = [state]
    for action, actor in attempts:
        try:
            move = transition(action, state, actor)
        except TransitionRefused:
            continue
        assert state in move.sources and actor in move.actors
        assert state not in FINAL_STATES
        state = move.target
        seen.append(state)
    assert all(later in reachable_from(earlier) for earlier, later in itertools.pairwise(seen))
    # A path never visits a state twice: the machine has no cycles.
    assert len(seen) == len(set(seen))
