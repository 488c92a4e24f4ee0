"""Random histories against the real database, checked against a simple model.

Hypothesis drives a seller and buyers through sets, adjustments, reservations (either
strategy), commits, releases, shipments, re-holds, the clock and the release job. After
every step the counters of every stock level must equal the model's, stay within their
bounds (on_hand, reserved, allocated >= 0; reserved + allocated <= on_hand), and the
availability a buyer reads must equal the model's.

Hypothesis runs the machine synchronously, so the test owns an event loop
(``asyncio.Runner``) and a runtime built inside it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import delete, select

from soko.inventory import public, reservations, service
from soko.inventory.errors import StockBelowCommitted
from soko.inventory.models import (
    AdjustmentKind,
    InventoryItem,
    Location,
    Reservation,
    StockAdjustment,
    StockLevel,
)
from soko.platform.clock import ManualClock
from soko.platform.config import Settings
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime

T = TypeVar("T")
Key = tuple[uuid.UUID, uuid.UUID]
HOLD = dt.timedelta(minutes=10)
VARIANTS = 2
LOCATIONS = 2

EXAMPLES = hypothesis_settings(
    max_examples=12,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Hold:
    holder: uuid.UUID
    variant_id: uuid.UUID
    location_id: uuid.UUID
    quantity: int
    status: str
    expires_at: dt.datetime


class Model:
    """What the counters must be, from the holds alone and the seller's changes."""

    def __init__(self) -> None:
        self.on_hand: dict[Key, int] = {}
        self.holds: dict[uuid.UUID, Hold] = {}

    def counters(self, key: Key) -> tuple[int, int, int]:
        reserved = sum(
            h.quantity
            for h in self.holds.values()
            if (h.variant_id, h.location_id) == key and h.status == "held"
        )
        allocated = sum(
            h.quantity
            for h in self.holds.values()
            if (h.variant_id, h.location_id) == key and h.status == "committed"
        )
        return self.on_hand[key], reserved, allocated

    def available(self, variant_id: uuid.UUID, now: dt.datetime) -> int:
        total = 0
        for key in self.on_hand:
            if key[0] != variant_id:
                continue
            on_hand, reserved, allocated = self.counters(key)
            expired = sum(
                h.quantity
                for h in self.holds.values()
                if (h.variant_id, h.location_id) == key
                and h.status == "held"
                and h.expires_at <= now
            )
            total += on_hand - reserved - allocated + expired
        return total

    def expire(
        self,
        now: dt.datetime,
        variant_ids: set[uuid.UUID] | None = None,
        key: Key | None = None,
    ) -> None:
        for hold in self.holds.values():
            if (
                hold.status == "held"
                and hold.expires_at <= now
                and (variant_ids is None or hold.variant_id in variant_ids)
                and (key is None or (hold.variant_id, hold.location_id) == key)
            ):
                hold.status = "expired"

    def copy_holds(self) -> dict[uuid.UUID, Hold]:
        return {
            id_: Hold(h.holder, h.variant_id, h.location_id, h.quantity, h.status, h.expires_at)
            for id_, h in self.holds.items()
        }


def make_machine(runner: asyncio.Runner, runtime: Runtime, clock: ManualClock) -> type[Any]:
    def run(coroutine: Coroutine[Any, Any, T]) -> T:
        return runner.run(coroutine)

    class Inventory(RuleBasedStateMachine):
        holders = Bundle("holders")

        def __init__(self) -> None:
            super().__init__()
            self.model = Model()
            self.seller = uuid7()
            self.actor = uuid7()
            self.variants: list[uuid.UUID] = []
            self.locations: list[uuid.UUID] = []

        @initialize(counts=st.lists(st.integers(0, 6), min_size=4, max_size=4))
        def open_store(self, counts: list[int]) -> None:
            run(self._open_store(counts))

        async def _open_store(self, counts: list[int]) -> None:
            now = clock.now()
            async with runtime.db.transaction() as session:
                for table in (Reservation, StockAdjustment, StockLevel, InventoryItem, Location):
                    await session.execute(delete(table))
                for index in range(LOCATIONS):
                    location = await service.create_location(
                        session,
                        now,
                        seller_id=self.seller,
                        name=f"Depot {index}",
                        kind=service.LocationKind.warehouse,
                        address="",
                    )
                    self.locations.append(location.id)
                for index in range(VARIANTS):
                    variant_id = uuid7()
                    self.variants.append(variant_id)
                    await public.register_item(
                        session, variant_id=variant_id, seller_id=self.seller, sku=f"S{index}"
                    )
            for count, key in zip(counts, self.keys(), strict=True):
                await self._set(key, count)
                self.model.on_hand[key] = count

        def keys(self) -> list[Key]:
            return [(v, loc) for v in self.variants for loc in self.locations]

        async def _set(self, key: Key, on_hand: int) -> None:
            async with runtime.db.transaction() as session:
                await service.set_stock(
                    session,
                    clock.now(),
                    seller_id=self.seller,
                    variant_id=key[0],
                    location_id=key[1],
                    on_hand=on_hand,
                    reason="count",
                    actor_id=self.actor,
                )

        async def _adjust(self, key: Key, delta: int) -> None:
            async with runtime.db.transaction() as session:
                await service.adjust_stock(
                    session,
                    clock.now(),
                    seller_id=self.seller,
                    variant_id=key[0],
                    location_id=key[1],
                    delta=delta,
                    kind=AdjustmentKind.adjust,
                    reason="random",
                    actor_id=self.actor,
                )

        # -- the seller ------------------------------------------------------------------

        @rule(index=st.integers(0, VARIANTS * LOCATIONS - 1), on_hand=st.integers(0, 8))
        def set_stock(self, index: int, on_hand: int) -> None:
            key = self.keys()[index]
            before = self.model.copy_holds()
            self.model.expire(clock.now(), key=key)
            _, reserved, allocated = self.model.counters(key)
            if on_hand < reserved + allocated:
                self.model.holds = before
                try:
                    run(self._set(key, on_hand))
                except StockBelowCommitted:
                    return
                raise AssertionError("set below the committed units was accepted")
            run(self._set(key, on_hand))
            self.model.on_hand[key] = on_hand

        @rule(
            index=st.integers(0, VARIANTS * LOCATIONS - 1),
            delta=st.integers(-5, 5).filter(bool),
        )
        def adjust(self, index: int, delta: int) -> None:
            key = self.keys()[index]
            before = self.model.copy_holds()
            self.model.expire(clock.now(), key=key)
            on_hand, reserved, allocated = self.model.counters(key)
            if on_hand + delta < reserved + allocated:
                self.model.holds = before
                try:
                    run(self._adjust(key, delta))
                except StockBelowCommitted:
                    return
                raise AssertionError("an adjustment below the committed units was accepted")
            run(self._adjust(key, delta))
            self.model.on_hand[key] = on_hand + delta

        # -- buyers ----------------------------------------------------------------------

        @rule(
            target=holders,
            lines=st.lists(
                st.tuples(st.integers(0, VARIANTS - 1), st.integers(1, 4)),
                min_size=1,
                max_size=3,
            ),
            strategy=st.sampled_from(list(public.ReservationStrategy)),
        )
        def reserve(
            self, lines: list[tuple[int, int]], strategy: public.ReservationStrategy
        ) -> Any:
            now = clock.now()
            wanted: dict[uuid.UUID, int] = {}
            for index, quantity in lines:
                variant_id = self.variants[index]
                wanted[variant_id] = wanted.get(variant_id, 0) + quantity
            short = {
                v: (q, self.model.available(v, now))
                for v, q in wanted.items()
                if self.model.available(v, now) < q
            }
            holder = uuid7()
            try:
                run(self._reserve(holder, lines, strategy))
            except public.OutOfStock as refusal:
                assert short, "refused although the model has the stock"
                assert {
                    s.variant_id: (s.requested, s.available) for s in refusal.shortages
                } == short
                return multiple()
            assert not short, f"reserved although the model is short: {short}"
            self.model.expire(now, set(wanted))
            self.learn_new_holds(run(self._holds_of(holder)), holder)
            taken: dict[uuid.UUID, int] = {}
            for hold in self.model.holds.values():
                if hold.holder == holder:
                    taken[hold.variant_id] = taken.get(hold.variant_id, 0) + hold.quantity
            assert taken == wanted
            return holder

        async def _reserve(
            self, holder: uuid.UUID, lines: list[tuple[int, int]], strategy: Any
        ) -> None:
            async with runtime.db.transaction() as session:
                await public.reserve(
                    session,
                    runtime,
                    holder_ref=holder,
                    lines=[public.ReservationRequest(self.variants[i], q) for i, q in lines],
                    expires_at=clock.now() + HOLD,
                    strategy=strategy,
                )

        async def _holds_of(self, holder: uuid.UUID) -> list[Any]:
            async with runtime.db.transaction(read_only=True) as session:
                return list(
                    (
                        await session.execute(
                            select(
                                Reservation.id,
                                Reservation.variant_id,
                                Reservation.location_id,
                                Reservation.quantity,
                                Reservation.status,
                                Reservation.expires_at,
                            ).where(Reservation.holder_ref == holder)
                        )
                    ).all()
                )

        def learn_new_holds(self, rows: list[Any], holder: uuid.UUID) -> None:
            for id_, variant_id, location_id, quantity, status, expires_at in rows:
                if id_ not in self.model.holds:
                    assert status == "held"
                    self.model.holds[id_] = Hold(
                        holder, variant_id, location_id, quantity, status, expires_at
                    )

        def holds_of(self, holder: uuid.UUID, *statuses: str) -> list[Hold]:
            return [
                h for h in self.model.holds.values() if h.holder == holder and h.status in statuses
            ]

        @rule(holder=holders)
        def commit(self, holder: uuid.UUID) -> None:
            run(self._call(public.commit_hold, holder))
            for hold in self.holds_of(holder, "held"):
                hold.status = "committed"

        @rule(holder=holders)
        def release(self, holder: uuid.UUID) -> None:
            given_back = run(self._call(public.release_hold, holder, reason="cancelled"))
            ending = self.holds_of(holder, "held", "committed")
            assert given_back == sum(h.quantity for h in ending)
            for hold in ending:
                hold.status = "released"

        @rule(holder=holders)
        def fulfil(self, holder: uuid.UUID) -> None:
            run(self._call(public.fulfil, holder))
            for hold in self.holds_of(holder, "committed"):
                hold.status = "fulfilled"
                self.model.on_hand[(hold.variant_id, hold.location_id)] -= hold.quantity

        @rule(holder=holders)
        def rehold(self, holder: uuid.UUID) -> None:
            now = clock.now()
            expires_at = now + HOLD
            ended = self.holds_of(holder, "expired", "released")
            wanted: dict[uuid.UUID, int] = {}
            for hold in ended:
                wanted[hold.variant_id] = wanted.get(hold.variant_id, 0) + hold.quantity
            # The holder's live holds are extended first, so they do not count as free.
            before = self.model.copy_holds()
            for hold in self.holds_of(holder, "held"):
                hold.expires_at = expires_at
            fits = all(self.model.available(v, now) >= q for v, q in wanted.items())
            answer = run(self._call(public.rehold_if_available, holder, expires_at))
            if wanted and not fits:
                self.model.holds = before
                assert answer is False
                return
            for hold in ended:
                hold.status = "renewed"
            self.model.expire(now, set(wanted))
            self.learn_new_holds(run(self._holds_of(holder)), holder)
            assert answer is bool(self.holds_of(holder, "held", "committed"))

        async def _call(self, function: Any, holder: uuid.UUID, *args: Any, **kwargs: Any) -> Any:
            async with runtime.db.transaction() as session:
                return await function(session, runtime, holder, *args, **kwargs)

        # -- time ------------------------------------------------------------------------

        @rule(minutes=st.integers(1, 12))
        def time_passes(self, minutes: int) -> None:
            clock.advance(dt.timedelta(minutes=minutes))

        @rule()
        def release_job(self) -> None:
            run(self._release_job())
            self.model.expire(clock.now())

        async def _release_job(self) -> None:
            async with runtime.db.transaction() as session:
                await reservations.release_expired_holds(session, clock.now())

        # -- what must always hold -----------------------------------------------------------

        @invariant()
        def counters_match_the_model(self) -> None:
            if not self.variants:
                return
            levels, statuses, available = run(self._observe())
            for key, (on_hand, reserved, allocated) in levels.items():
                assert on_hand >= 0 and reserved >= 0 and allocated >= 0
                assert reserved + allocated <= on_hand
                assert (on_hand, reserved, allocated) == self.model.counters(key), key
            assert set(levels) == set(self.model.on_hand)
            assert statuses == {id_: h.status for id_, h in self.model.holds.items()}
            now = clock.now()
            assert available == {v: self.model.available(v, now) for v in self.variants}

        async def _observe(
            self,
        ) -> tuple[dict[Key, tuple[int, int, int]], dict[uuid.UUID, str], dict[uuid.UUID, int]]:
            async with runtime.db.transaction(read_only=True) as session:
                levels = {
                    (v, loc): (a, b, c)
                    for v, loc, a, b, c in await session.execute(
                        select(
                            StockLevel.variant_id,
                            StockLevel.location_id,
                            StockLevel.on_hand,
                            StockLevel.reserved,
                            StockLevel.allocated,
                        )
                    )
                }
                statuses = {
                    id_: status
                    for id_, status in await session.execute(
                        select(Reservation.id, Reservation.status)
                    )
                }
                available = await public.available_for(session, runtime, self.variants)
            return levels, statuses, available

    return Inventory


def test_random_histories_keep_every_counter_sound(settings: Settings) -> None:
    clock = ManualClock()
    with asyncio.Runner() as runner:
        runtime = Runtime(settings, clock=clock)
        try:
            machine = make_machine(runner, runtime, clock)
            run_state_machine_as_test(machine, settings=EXAMPLES)
        finally:
            runner.run(runtime.stop())
