"""The reservation purge: released, expired, fulfilled and renewed reservations go once
ended for the retention window; held and committed ones (counted in the stock levels)
never do."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import select

from soko.inventory.models import Reservation, ReservationStatus
from soko.inventory.retention import purge_ended_reservations
from soko.platform.clock import ManualClock
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime

DAY = dt.timedelta(days=1)
KEEP = dt.timedelta(days=30)
HOLD = dt.timedelta(minutes=15)


async def add_reservation(
    runtime: Runtime, status: ReservationStatus, *, ended: dt.datetime | None = None
) -> uuid.UUID:
    now = runtime.clock.now()
    reservation_id = uuid7()
    async with runtime.db.transaction() as session:
        session.add(
            Reservation(
                id=reservation_id,
                holder_ref=uuid.uuid4(),
                variant_id=uuid.uuid4(),
                location_id=uuid.uuid4(),
                quantity=2,
                status=status.value,
                expires_at=now + HOLD,
                created_at=now,
                ended_at=ended,
                end_reason=None,
            )
        )
    return reservation_id


async def left(runtime: Runtime) -> set[uuid.UUID]:
    async with runtime.db.sessionmaker() as session:
        return set((await session.scalars(select(Reservation.id))).all())


async def test_ended_reservations_go_after_the_window_and_live_ones_stay(
    runtime: Runtime, clock: ManualClock
) -> None:
    start = clock.now()
    held = await add_reservation(runtime, ReservationStatus.held)  # its time ran out long ago
    committed = await add_reservation(runtime, ReservationStatus.committed)  # paid, unshipped
    released = await add_reservation(runtime, ReservationStatus.released, ended=start)
    expired = await add_reservation(runtime, ReservationStatus.expired, ended=start + HOLD)
    renewed = await add_reservation(runtime, ReservationStatus.renewed, ended=start + HOLD)
    # Held at checkout, shipped 20 days later: it ended then, not when its hold ran out.
    shipped = await add_reservation(runtime, ReservationStatus.fulfilled, ended=start + 20 * DAY)
    clock.advance(KEEP + DAY)

    async with runtime.db.transaction() as session:
        assert await purge_ended_reservations(session, clock.now(), keep=KEEP) == (3, False)
    assert await left(runtime) == {held, committed, shipped}

    clock.advance(20 * DAY)
    async with runtime.db.transaction() as session:
        assert await purge_ended_reservations(session, clock.now(), keep=KEEP) == (1, False)
    assert await left(runtime) == {held, committed}
    assert {released, expired, renewed}.isdisjoint(await left(runtime))


async def test_a_purge_takes_a_bounded_batch(runtime: Runtime, clock: ManualClock) -> None:
    for _ in range(3):
        await add_reservation(runtime, ReservationStatus.released, ended=clock.now())
    clock.advance(KEEP + DAY)
    async with runtime.db.transaction() as session:
        assert await purge_ended_reservations(session, clock.now(), keep=KEEP, limit=2) == (
            2,
            True,
        )
    async with runtime.db.transaction() as session:
        assert await purge_ended_reservations(session, clock.now(), keep=KEEP, limit=2) == (
            1,
            False,
        )


async def test_the_reservation_purge_runs_from_the_dispatcher(
    runtime: Runtime, clock: ManualClock
) -> None:
    assert runtime.settings.retention_days == 30
    old = await add_reservation(runtime, ReservationStatus.expired, ended=clock.now())
    committed = await add_reservation(runtime, ReservationStatus.committed)
    clock.advance(KEEP - DAY)
    recent = await add_reservation(runtime, ReservationStatus.released, ended=clock.now())
    clock.advance(2 * DAY)

    await runtime.dispatcher.run_until_idle()

    assert await left(runtime) == {committed, recent}
    assert old not in await left(runtime)
