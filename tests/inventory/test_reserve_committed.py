"""Holds committed on their own (``reserve_committed``), on both backends and strategies:
the same all-or-nothing holds as ``reserve``, and on PostgreSQL a single stock row held in
one autocommitted statement."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from soko.inventory import public, reservations
from soko.inventory.planning import StockRow
from soko.platform.clock import ManualClock
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime
from tests.conftest import sql_statements
from tests.inventory.support import available, levels, make_store, reservation_statuses, reserve

HOLD = dt.timedelta(minutes=15)


@pytest.fixture(params=list(public.ReservationStrategy))
def strategy(request: pytest.FixtureRequest) -> public.ReservationStrategy:
    return public.ReservationStrategy(request.param)


@pytest.fixture
def sent(runtime: Runtime) -> Iterator[list[str]]:
    """Every statement sent to the database while the test runs."""
    with sql_statements(runtime) as statements:
        yield statements


async def hold(
    runtime: Runtime,
    lines: list[tuple[uuid.UUID, int]],
    strategy: public.ReservationStrategy,
) -> uuid.UUID:
    holder = uuid7()
    await public.reserve_committed(
        runtime,
        holder_ref=holder,
        lines=[public.ReservationRequest(v, q) for v, q in lines],
        expires_at=runtime.clock.now() + HOLD,
        strategy=strategy,
    )
    return holder


async def test_a_hold_is_committed_when_the_call_returns(
    runtime: Runtime, strategy: public.ReservationStrategy
) -> None:
    store = await make_store(runtime, variants=2, locations=2, on_hand=[3, 2])
    v1, v2 = store.variant_ids
    a, b = store.location_ids
    one = await hold(runtime, [(v1, 2)], strategy)
    # Several rows: v2 split over both locations, v1 from what is left.
    several = await hold(runtime, [(v2, 4), (v1, 3)], strategy)

    assert await reservation_statuses(runtime, one) == [("held", 2)]
    statuses = await reservation_statuses(runtime, several)
    assert {status for status, _ in statuses} == {"held"}
    assert sum(quantity for _, quantity in statuses) == 7
    stock = await levels(runtime)
    assert {key: on_hand for key, (on_hand, _, _) in stock.items()} == {
        (v1, a): 3,
        (v1, b): 2,
        (v2, a): 3,
        (v2, b): 2,
    }
    assert stock[v1, a][1] + stock[v1, b][1] == 5
    assert stock[v2, a][1] + stock[v2, b][1] == 4
    assert await available(runtime, [v1, v2]) == {v1: 0, v2: 1}


async def test_more_than_there_is_holds_nothing_and_names_the_shortage(
    runtime: Runtime, strategy: public.ReservationStrategy
) -> None:
    store = await make_store(runtime, variants=2, on_hand=2)
    v1, v2 = store.variant_ids
    before = await levels(runtime)
    for lines in ([(v1, 3)], [(v2, 1), (v1, 3)]):
        with pytest.raises(public.OutOfStock) as caught:
            await hold(runtime, lines, strategy)
        assert [(s.variant_id, s.requested, s.available) for s in caught.value.shortages] == [
            (v1, 3, 2)
        ]
    assert await levels(runtime) == before


async def test_a_row_that_fell_short_since_the_read_is_decided_on_a_fresh_one(
    runtime: Runtime, strategy: public.ReservationStrategy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read said 5 units, another buyer took 4 meanwhile: the claim takes nothing,
    and the hold is decided again from the stock as it is (here: refused, with the units
    really there). Only a read without locks can be stale."""
    store = await make_store(runtime, on_hand=5)
    (v1,) = store.variant_ids
    await hold(runtime, [(v1, 4)], strategy)
    real_read = reservations.read_stock_rows
    reads: list[bool] = []

    async def stale_first(*args: Any, **kwargs: Any) -> list[StockRow]:
        rows = await real_read(*args, **kwargs)
        locked = kwargs.get("lock", False)
        reads.append(locked)
        if locked or len(reads) > 1:
            return rows
        return [StockRow(r.variant_id, r.location_id, r.on_hand, 0, 0, 0, r.active) for r in rows]

    monkeypatch.setattr(reservations, "read_stock_rows", stale_first)
    with pytest.raises(public.OutOfStock) as caught:
        await hold(runtime, [(v1, 3)], strategy)
    assert [(s.requested, s.available) for s in caught.value.shortages] == [(3, 1)]
    assert await available(runtime, [v1]) == {v1: 1}


async def test_expired_holds_in_the_way_are_released_on_the_way(
    runtime: Runtime, clock: ManualClock, strategy: public.ReservationStrategy
) -> None:
    store = await make_store(runtime, on_hand=3)
    (v1,) = store.variant_ids
    (depot,) = store.location_ids
    first = await hold(runtime, [(v1, 3)], strategy)
    clock.advance(HOLD)
    second = await hold(runtime, [(v1, 2)], strategy)
    assert await reservation_statuses(runtime, first) == [("expired", 3)]
    assert await reservation_statuses(runtime, second) == [("held", 2)]
    assert await levels(runtime) == {(v1, depot): (3, 2, 0)}


async def test_one_stock_row_is_held_in_one_statement_on_postgresql(
    runtime: Runtime, strategy: public.ReservationStrategy, sent: list[str]
) -> None:
    """The read, then one statement that updates the row and writes its hold: committed
    inside the database, so no round trip to the application holds the row's lock. The
    pessimistic strategy takes the row FOR UPDATE in that statement first."""
    store = await make_store(runtime, on_hand=5)
    (v1,) = store.variant_ids
    await reserve(runtime, [(v1, 1)])  # warm: the first use of a pool may set things up
    sent.clear()
    await hold(runtime, [(v1, 2)], strategy)
    if runtime.db.dialect != "postgresql":
        # A transaction of its own: BEGIN IMMEDIATE, the read, the UPDATE, the INSERT.
        assert len(sent) == 4, sent
        return
    read, claim = sent
    assert "FROM inventory_stock_levels" in read and "FOR UPDATE" not in read
    assert claim.lstrip().startswith("WITH claimed AS")
    assert "UPDATE inventory_stock_levels" in claim
    assert "INSERT INTO inventory_reservations" in claim
    assert ("FOR UPDATE" in claim) is (strategy is public.ReservationStrategy.pessimistic)
