"""The pure arithmetic of availability and of which locations serve which line."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from soko.inventory.planning import (
    ReservationRequest,
    Shortage,
    StockRow,
    available_by_variant,
    merge_lines,
    plan_reservation,
    row_available,
    shortages_of,
)

V1, V2, V3 = (uuid.UUID(int=n) for n in (1, 2, 3))
A, B, C = (uuid.UUID(int=n) for n in (101, 102, 103))


def row(
    variant: uuid.UUID,
    location: uuid.UUID,
    on_hand: int,
    reserved: int = 0,
    allocated: int = 0,
    expired: int = 0,
    active: bool = True,
) -> StockRow:
    return StockRow(variant, location, on_hand, reserved, allocated, expired, active)


def test_available_is_on_hand_less_live_holds_and_allocations() -> None:
    assert row_available(10, 3, 2) == 5
    # Three of the four reserved units belong to holds past their time: they are free.
    assert row_available(10, 4, 2, expired_held=3) == 7
    assert row_available(5, 3, 2) == 0


def test_available_by_variant_sums_active_locations_only() -> None:
    rows = [
        row(V1, A, 5, reserved=1),
        row(V1, B, 4, expired=0, allocated=4),
        row(V1, C, 9, active=False),
        row(V2, A, 3, reserved=3, expired=2),
    ]
    assert available_by_variant(rows) == {V1: 4, V2: 2}


def test_lines_of_one_variant_add_up_and_must_be_positive() -> None:
    lines = [ReservationRequest(V1, 2), ReservationRequest(V2, 1), ReservationRequest(V1, 3)]
    assert merge_lines(lines) == {V1: 5, V2: 1}
    with pytest.raises(ValueError):
        merge_lines([ReservationRequest(V1, 0)])


def test_a_line_is_served_whole_by_one_location_when_one_can() -> None:
    plan = plan_reservation({V1: 3}, [row(V1, A, 2), row(V1, B, 5)])
    assert plan.feasible
    assert plan.takes == {(V1, B): 3}


def test_the_location_serving_the_most_lines_whole_is_preferred() -> None:
    # B has fewer units of V1 than A, but it can also serve V2: one parcel instead of two.
    rows = [row(V1, A, 9), row(V1, B, 2), row(V2, B, 4), row(V2, C, 1)]
    plan = plan_reservation({V1: 2, V2: 3}, rows)
    assert plan.takes == {(V1, B): 2, (V2, B): 3}


def test_among_equals_the_location_with_most_units_serves() -> None:
    plan = plan_reservation({V1: 1}, [row(V1, A, 3), row(V1, B, 7), row(V1, C, 7, reserved=1)])
    assert plan.takes == {(V1, B): 1}


def test_a_line_no_location_can_serve_whole_is_split_largest_first() -> None:
    rows = [row(V1, A, 2), row(V1, B, 3, reserved=1), row(V1, C, 4)]
    plan = plan_reservation({V1: 7}, rows)
    assert plan.takes == {(V1, C): 4, (V1, A): 2, (V1, B): 1}


def test_expired_holds_count_as_free_when_planning() -> None:
    plan = plan_reservation({V1: 4}, [row(V1, A, 5, reserved=5, expired=4)])
    assert plan.takes == {(V1, A): 4}


def test_inactive_locations_and_empty_rows_serve_nothing() -> None:
    rows = [row(V1, A, 10, active=False), row(V1, B, 3, allocated=3), row(V1, C, 2)]
    plan = plan_reservation({V1: 3}, rows)
    assert not plan.feasible
    assert plan.shortages == (Shortage(V1, requested=3, available=2),)
    assert plan.takes == {}


def test_every_short_line_is_named_and_nothing_is_taken() -> None:
    rows = [row(V1, A, 1), row(V2, A, 5)]
    plan = plan_reservation({V1: 2, V2: 5, V3: 1}, rows)
    assert plan.takes == {}
    assert plan.shortages == (Shortage(V1, 2, 1), Shortage(V3, 1, 0))
    assert shortages_of({V1: 2, V2: 5, V3: 1}, rows) == list(plan.shortages)


VARIANTS = [V1, V2, V3]
LOCATIONS = [A, B, C]

stock_rows = st.lists(
    st.builds(
        lambda v, loc, on_hand, reserved_share, allocated_share, expired_share, active: row(
            v,
            loc,
            on_hand,
            reserved := on_hand * reserved_share // 100,
            (on_hand - reserved) * allocated_share // 100,
            reserved * expired_share // 100,
            active,
        ),
        st.sampled_from(VARIANTS),
        st.sampled_from(LOCATIONS),
        st.integers(0, 20),
        st.integers(0, 100),
        st.integers(0, 100),
        st.integers(0, 100),
        st.booleans(),
    ),
    max_size=9,
    unique_by=lambda r: (r.variant_id, r.location_id),
)
wanted_lines = st.dictionaries(st.sampled_from(VARIANTS), st.integers(1, 30), min_size=1)


@given(wanted=wanted_lines, rows=stock_rows)
@settings(max_examples=300)
def test_a_plan_takes_exactly_what_is_asked_from_what_is_free(
    wanted: dict[uuid.UUID, int], rows: list[StockRow]
) -> None:
    plan = plan_reservation(wanted, rows)
    free = {(r.variant_id, r.location_id): r.available for r in rows if r.active}
    totals = available_by_variant(rows)
    feasible = all(totals.get(v, 0) >= q for v, q in wanted.items())
    assert plan.feasible is feasible
    if not feasible:
        assert plan.takes == {}
        assert {s.variant_id for s in plan.shortages} == {
            v for v, q in wanted.items() if totals.get(v, 0) < q
        }
        assert all(s.available == totals.get(s.variant_id, 0) for s in plan.shortages)
        return
    for (variant_id, location_id), quantity in plan.takes.items():
        assert 0 < quantity <= free[(variant_id, location_id)]
    for variant_id, quantity in wanted.items():
        taken = [q for (v, _), q in plan.takes.items() if v == variant_id]
        assert sum(taken) == quantity
        # A line is split only when no single location could serve it whole.
        if len(taken) > 1:
            assert all(f < quantity for (v, _), f in free.items() if v == variant_id)
