"""Reservations through the public contract, on both backends and both strategies."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, select

from soko.inventory import public, reservations, service
from soko.inventory.models import InventoryItem, StockAdjustment
from soko.inventory.planning import StockRow
from soko.platform.clock import ManualClock
from soko.platform.errors import problem_body
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime
from tests.inventory.support import (
    available,
    levels,
    make_store,
    reservation_statuses,
    reserve,
)

STRATEGIES = list(public.ReservationStrategy)
HOLD = dt.timedelta(minutes=15)


@pytest.fixture(params=STRATEGIES)
def strategy(request: pytest.FixtureRequest) -> public.ReservationStrategy:
    return public.ReservationStrategy(request.param)


async def test_a_hold_is_reserved_then_committed_then_shipped(
    runtime: Runtime, strategy: public.ReservationStrategy
) -> None:
    store = await make_store(runtime, variants=2, on_hand=10)
    v1, v2 = store.variant_ids
    (depot,) = store.location_ids
    holder = await reserve(runtime, [(v1, 3), (v2, 1), (v1, 2)], strategy=strategy)
    assert await levels(runtime) == {(v1, depot): (10, 5, 0), (v2, depot): (10, 1, 0)}
    assert await available(runtime, [v1, v2]) == {v1: 5, v2: 9}

    async with runtime.db.transaction() as session:
        await public.commit_hold(session, runtime, holder)
        await public.commit_hold(session, runtime, holder)  # a second call changes nothing
    assert await levels(runtime) == {(v1, depot): (10, 0, 5), (v2, depot): (10, 0, 1)}
    assert await available(runtime, [v1, v2]) == {v1: 5, v2: 9}

    async with runtime.db.transaction() as session:
        await public.fulfil(session, runtime, holder, [v1])
        await public.fulfil(session, runtime, holder, [v1])
    assert await levels(runtime) == {(v1, depot): (5, 0, 0), (v2, depot): (10, 0, 1)}
    async with runtime.db.transaction() as session:
        await public.fulfil(session, runtime, holder)
    assert await levels(runtime) == {(v1, depot): (5, 0, 0), (v2, depot): (9, 0, 0)}
    assert sorted(await reservation_statuses(runtime, holder)) == [
        ("fulfilled", 1),
        ("fulfilled", 5),
    ]

    async with runtime.db.transaction(read_only=True) as session:
        sales = (
            await session.scalars(
                select(StockAdjustment)
                .where(StockAdjustment.kind == "sale")
                .order_by(StockAdjustment.variant_id)
            )
        ).all()
    assert sorted((s.variant_id, s.delta, s.on_hand_after, s.actor_id) for s in sales) == sorted(
        [(v1, -5, 5, None), (v2, -1, 9, None)]
    )


async def test_release_gives_back_held_and_committed_units_once(
    runtime: Runtime, strategy: public.ReservationStrategy
) -> None:
    store = await make_store(runtime, variants=2, on_hand=4)
    v1, v2 = store.variant_ids
    (depot,) = store.location_ids
    paid = await reserve(runtime, [(v1, 2)], strategy=strategy)
    unpaid = await reserve(runtime, [(v1, 1), (v2, 3)], strategy=strategy)
    async with runtime.db.transaction() as session:
        await public.commit_hold(session, runtime, paid)
    assert await levels(runtime) == {(v1, depot): (4, 1, 2), (v2, depot): (4, 3, 0)}

    async with runtime.db.transaction() as session:
        # One order of the group cancelled: only its variants go back.
        assert (
            await public.release_hold(
                session, runtime, unpaid, reason="cancelled", variant_ids=[v2]
            )
            == 3
        )
        assert await public.release_hold(session, runtime, paid, reason="refunded") == 2
        assert await public.release_hold(session, runtime, paid, reason="refunded") == 0
    assert await levels(runtime) == {(v1, depot): (4, 1, 0), (v2, depot): (4, 0, 0)}
    assert await reservation_statuses(runtime, unpaid) == [("held", 1), ("released", 3)]


async def test_out_of_stock_names_each_short_line_and_reserves_nothing(
    runtime: Runtime, strategy: public.ReservationStrategy
) -> None:
    store = await make_store(runtime, variants=2, locations=2, on_hand=[2, 1])
    v1, v2 = store.variant_ids
    unknown = uuid7()
    before = await levels(runtime)
    async with runtime.db.transaction() as session:
        with pytest.raises(public.OutOfStock) as caught:
            await public.reserve(
                session,
                runtime,
                holder_ref=uuid7(),
                lines=[
                    public.ReservationRequest(v1, 3),
                    public.ReservationRequest(v2, 4),
                    public.ReservationRequest(unknown, 1),
                ],
                expires_at=runtime.clock.now() + HOLD,
                strategy=strategy,
            )
        # All or nothing inside the caller's transaction too: it may carry on and commit.
    assert await levels(runtime) == before
    assert caught.value.shortages == [
        public.Shortage(v2, requested=4, available=3),
        public.Shortage(unknown, requested=1, available=0),
    ]
    body = problem_body(
        type(caught.value), detail=caught.value.detail, extensions=caught.value.extensions
    )
    assert body["type"] == "/problems/out-of-stock" and body["status"] == 409
    assert json.loads(json.dumps(body))["shortages"] == [
        {"variant_id": str(v2), "requested": 4, "available": 3},
        {"variant_id": str(unknown), "requested": 1, "available": 0},
    ]


async def test_a_line_is_split_over_locations_when_none_has_enough(
    runtime: Runtime, strategy: public.ReservationStrategy
) -> None:
    store = await make_store(runtime, locations=2, on_hand=[3, 2])
    (v1,) = store.variant_ids
    a, b = store.location_ids
    await reserve(runtime, [(v1, 4)], strategy=strategy)
    assert await levels(runtime) == {(v1, a): (3, 3, 0), (v1, b): (2, 1, 0)}
    await reserve(runtime, [(v1, 1)], strategy=strategy)
    with pytest.raises(public.OutOfStock):
        await reserve(runtime, [(v1, 1)], strategy=strategy)
    assert await available(runtime, [v1]) == {v1: 0}


async def test_expired_holds_are_free_at_once_and_released_by_the_next_buyer(
    runtime: Runtime, clock: ManualClock, strategy: public.ReservationStrategy
) -> None:
    store = await make_store(runtime, variants=2, on_hand=3)
    v1, v2 = store.variant_ids
    (depot,) = store.location_ids
    first = await reserve(runtime, [(v1, 3), (v2, 1)], strategy=strategy)
    assert await available(runtime, [v1, v2]) == {v1: 0, v2: 2}
    clock.advance(HOLD)
    # Not released yet, but already free for readers.
    assert await levels(runtime) == {(v1, depot): (3, 3, 0), (v2, depot): (3, 1, 0)}
    assert await available(runtime, [v1, v2]) == {v1: 3, v2: 3}

    second = await reserve(runtime, [(v1, 2)], strategy=strategy)
    # The buyer released every expired hold of the variant it reserved, and only those.
    assert await levels(runtime) == {(v1, depot): (3, 2, 0), (v2, depot): (3, 1, 0)}
    assert sorted(await reservation_statuses(runtime, first)) == [("expired", 3), ("held", 1)]
    assert await reservation_statuses(runtime, second) == [("held", 2)]

    # The paid-late holder's commit leaves expired holds alone; the v2 hold, past its time
    # but never released, is still there to commit.
    async with runtime.db.transaction() as session:
        await public.commit_hold(session, runtime, first)
    assert await levels(runtime) == {(v1, depot): (3, 2, 0), (v2, depot): (3, 0, 1)}


async def test_a_short_reservation_still_releases_expired_holds_consistently(
    runtime: Runtime, clock: ManualClock, strategy: public.ReservationStrategy
) -> None:
    store = await make_store(runtime, on_hand=3)
    (v1,) = store.variant_ids
    (depot,) = store.location_ids
    await reserve(runtime, [(v1, 2)], strategy=strategy)
    clock.advance(HOLD)
    async with runtime.db.transaction() as session:
        with pytest.raises(public.OutOfStock):
            await public.reserve(
                session,
                runtime,
                holder_ref=uuid7(),
                lines=[public.ReservationRequest(v1, 4)],
                expires_at=clock.now() + HOLD,
                strategy=strategy,
            )
    # Committed after the refusal: the expired hold is released, counters agree with it.
    assert await levels(runtime) == {(v1, depot): (3, 0, 0)}


async def test_inactive_locations_serve_no_one(
    runtime: Runtime, strategy: public.ReservationStrategy
) -> None:
    store = await make_store(runtime, locations=2, on_hand=[5, 1])
    (v1,) = store.variant_ids
    a, b = store.location_ids
    async with runtime.db.transaction() as session:
        await service.update_location(
            session,
            runtime.clock.now(),
            seller_id=store.seller_id,
            location_id=a,
            changes={"active": False},
        )
    assert await available(runtime, [v1]) == {v1: 1}
    with pytest.raises(public.OutOfStock):
        await reserve(runtime, [(v1, 2)], strategy=strategy)
    await reserve(runtime, [(v1, 1)], strategy=strategy)
    assert await levels(runtime) == {(v1, a): (5, 0, 0), (v1, b): (1, 1, 0)}


async def test_rehold_holds_again_what_expired_once(runtime: Runtime, clock: ManualClock) -> None:
    store = await make_store(runtime, variants=2, on_hand=2)
    v1, v2 = store.variant_ids
    (depot,) = store.location_ids
    holder = await reserve(runtime, [(v1, 2), (v2, 1)])
    clock.advance(HOLD)
    await reserve(runtime, [(v2, 1)])  # releases the holder's expired v2 hold on the way
    later = clock.now() + HOLD
    for _ in range(2):  # the second call finds everything held and changes nothing
        async with runtime.db.transaction() as session:
            assert await public.rehold_if_available(session, runtime, holder, later)
        assert await levels(runtime) == {(v1, depot): (2, 2, 0), (v2, depot): (2, 2, 0)}
    statuses = sorted(await reservation_statuses(runtime, holder))
    assert statuses == [("held", 1), ("held", 2), ("renewed", 1)]
    clock.advance(HOLD - dt.timedelta(seconds=1))
    assert await available(runtime, [v1, v2]) == {v1: 0, v2: 0}  # extended, not expired


async def test_rehold_changes_nothing_when_the_stock_is_gone(
    runtime: Runtime, clock: ManualClock
) -> None:
    store = await make_store(runtime, variants=2, on_hand=2)
    v1, v2 = store.variant_ids
    holder = await reserve(runtime, [(v1, 1), (v2, 2)])
    clock.advance(HOLD)
    await reserve(runtime, [(v2, 2)])  # someone else bought the units
    before = await levels(runtime)
    statuses = await reservation_statuses(runtime, holder)
    async with runtime.db.transaction() as session:
        assert not await public.rehold_if_available(session, runtime, holder, clock.now() + HOLD)
    assert await levels(runtime) == before
    assert await reservation_statuses(runtime, holder) == statuses


async def test_the_optimistic_strategy_plans_again_when_a_row_fell_short(
    runtime: Runtime, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan made from a stale read: the conditional UPDATE refuses the row that no
    longer has the units, what the attempt took is given back, and a fresh read finds the
    other location. An expired hold released on the way stays released."""
    store = await make_store(runtime, variants=2, locations=2, on_hand=[2, 3])
    v1, v2 = store.variant_ids
    a, b = store.location_ids
    await reserve(runtime, [(v2, 2)])
    clock.advance(HOLD)
    real_read = reservations.read_stock_rows
    reads: list[bool] = []

    async def stale_first(*args: Any, **kwargs: Any) -> list[StockRow]:
        rows = await real_read(*args, **kwargs)
        reads.append(kwargs.get("lock", False))
        if len(reads) > 1:
            return rows
        # As read a moment earlier: location a seemed to hold 12 units of v1.
        return [
            StockRow(r.variant_id, r.location_id, 12, r.reserved, r.allocated, r.expired_held)
            if (r.variant_id, r.location_id) == (v1, a)
            else r
            for r in rows
        ]

    monkeypatch.setattr(reservations, "read_stock_rows", stale_first)
    await reserve(runtime, [(v1, 4), (v2, 3)], strategy=public.ReservationStrategy.optimistic)
    assert reads == [False, False]
    # v1 split over b (3) and a (1) after all; v2's expired hold at b given back, 3 taken.
    assert await levels(runtime) == {
        (v1, a): (2, 1, 0),
        (v1, b): (3, 3, 0),
        (v2, a): (2, 0, 0),
        (v2, b): (3, 3, 0),
    }


async def test_register_item_is_idempotent_and_keeps_the_owner(runtime: Runtime) -> None:
    variant, seller = uuid7(), uuid7()
    async with runtime.db.transaction() as session:
        await public.register_item(session, variant_id=variant, seller_id=seller, sku="A-1")
        await public.register_item(session, variant_id=variant, seller_id=seller, sku="A-2")
        await public.register_item(session, variant_id=variant, seller_id=uuid7(), sku="STOLEN")
    async with runtime.db.transaction(read_only=True) as session:
        item = (await session.scalars(select(InventoryItem))).one()
    assert (item.variant_id, item.seller_id, item.sku) == (variant, seller, "A-2")


async def test_availability_read_model_embeds_in_another_query(
    runtime: Runtime, clock: ManualClock
) -> None:
    store = await make_store(runtime, variants=3, on_hand=2)
    v1, v2, v3 = store.variant_ids
    await reserve(runtime, [(v1, 2)])
    await reserve(runtime, [(v2, 2)])
    clock.advance(HOLD)
    await reserve(runtime, [(v2, 1)])
    model = public.availability_by_variant(clock.now()).subquery()
    async with runtime.db.transaction(read_only=True) as session:
        in_stock = set(
            await session.scalars(
                select(InventoryItem.variant_id)
                .join(model, model.c.variant_id == InventoryItem.variant_id)
                .where(model.c.available > 0)
            )
        )
    assert in_stock == {v1, v2, v3}  # v1's hold expired: free again
    assert await available(runtime, [v1, v2, v3, uuid7()]) != {}
    assert (await available(runtime, [v1, v2, v3])) == {v1: 2, v2: 1, v3: 2}


# -- statement budget ------------------------------------------------------------------------------


class StatementCounter:
    def __init__(self) -> None:
        self.statements: list[str] = []
        self.counting = False

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self.counting:
            self.statements.append(statement)


@pytest.fixture
def statements(runtime: Runtime) -> Iterator[StatementCounter]:
    counter = StatementCounter()
    engine = runtime.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", counter)
    yield counter
    event.remove(engine, "before_cursor_execute", counter)


async def count_reserve(
    runtime: Runtime,
    counter: StatementCounter,
    lines: list[tuple[uuid.UUID, int]],
    strategy: public.ReservationStrategy,
) -> int:
    async with runtime.db.transaction() as session:
        await session.execute(select(1))  # the transaction has begun before counting
        counter.statements.clear()
        counter.counting = True
        await public.reserve(
            session,
            runtime,
            holder_ref=uuid7(),
            lines=[public.ReservationRequest(v, q) for v, q in lines],
            expires_at=runtime.clock.now() + HOLD,
            strategy=strategy,
        )
        counter.counting = False
    return len(counter.statements)


async def test_reserve_costs_the_same_statements_for_one_line_or_twenty_over_five_sellers(
    runtime: Runtime,
    clock: ManualClock,
    statements: StatementCounter,
    strategy: public.ReservationStrategy,
) -> None:
    stores = [await make_store(runtime, variants=4, locations=2, on_hand=[3, 2]) for _ in range(5)]
    variants = [v for store in stores for v in store.variant_ids]
    one = await count_reserve(runtime, statements, [(variants[0], 1)], strategy)
    # Twenty lines, five sellers, some split over two locations.
    twenty = await count_reserve(
        runtime, statements, [(v, 4 if i % 3 else 1) for i, v in enumerate(variants)], strategy
    )
    assert twenty == 3, statements.statements
    # A claim of a single stock row (here: pessimistic, whose locked read leaves nothing
    # to lock in order; the optimistic claim locks both of the variant's rows) writes
    # its hold in the same statement on PostgreSQL.
    single_row = (
        runtime.db.dialect == "postgresql" and strategy is public.ReservationStrategy.pessimistic
    )
    assert one == (2 if single_row else 3), statements.statements
    # With expired holds of these variants in the way: one statement more, still flat.
    clock.advance(HOLD)
    one_expired = await count_reserve(runtime, statements, [(variants[0], 1)], strategy)
    twenty_expired = await count_reserve(runtime, statements, [(v, 1) for v in variants], strategy)
    assert one_expired == twenty_expired == 4, statements.statements
