"""The scheduled job gives the units of holds whose time ran out back to stock."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from soko.inventory import reservations
from soko.inventory.handlers import RELEASE_EXPIRED_HOLDS
from soko.platform.clock import ManualClock
from soko.platform.jobs import registry
from soko.platform.outbox import OutboxMessage
from soko.platform.runtime import Runtime
from tests.inventory.support import available, levels, make_store, reservation_statuses, reserve


async def test_the_job_runs_every_minute_and_releases_expired_holds_only(
    runtime: Runtime, clock: ManualClock
) -> None:
    assert registry.schedules[RELEASE_EXPIRED_HOLDS].cron == "* * * * *"
    store = await make_store(runtime, variants=2, locations=2, on_hand=[4, 4])
    v1, v2 = store.variant_ids
    short = await reserve(runtime, [(v1, 6), (v2, 1)], hold=dt.timedelta(minutes=5))
    long = await reserve(runtime, [(v2, 2)], hold=dt.timedelta(minutes=30))
    clock.advance(dt.timedelta(minutes=5))

    await runtime.dispatcher.run_until_idle()

    assert sorted(await reservation_statuses(runtime, short)) == [
        ("expired", 1),
        ("expired", 2),
        ("expired", 4),
    ]
    assert await reservation_statuses(runtime, long) == [("held", 2)]
    assert sum(reserved for _, reserved, _ in (await levels(runtime)).values()) == 2
    assert await available(runtime, [v1, v2]) == {v1: 8, v2: 6}
    async with runtime.db.transaction(read_only=True) as session:
        runs = await session.scalars(
            select(OutboxMessage.status).where(OutboxMessage.name == RELEASE_EXPIRED_HOLDS)
        )
        assert list(runs) == ["done"]

    # The next run finds nothing more to do; the long hold goes when its time comes.
    clock.advance(dt.timedelta(minutes=1))
    await runtime.dispatcher.run_until_idle()
    assert await reservation_statuses(runtime, long) == [("held", 2)]
    clock.advance(dt.timedelta(minutes=30))
    await runtime.dispatcher.run_until_idle()
    assert await reservation_statuses(runtime, long) == [("expired", 2)]
    assert all(reserved == 0 for _, reserved, _ in (await levels(runtime)).values())


async def test_many_expired_holds_are_released_in_batches(
    runtime: Runtime, clock: ManualClock
) -> None:
    store = await make_store(runtime, variants=3, on_hand=10)
    holders = [await reserve(runtime, [(v, 2)]) for v in store.variant_ids for _ in range(3)]
    clock.advance(dt.timedelta(minutes=15))
    async with runtime.db.transaction() as session:
        freed = await reservations.release_expired_holds(session, clock.now(), batch_size=4)
    assert freed == 18
    assert all(reserved == 0 for _, reserved, _ in (await levels(runtime)).values())
    for holder in holders:
        assert await reservation_statuses(runtime, holder) == [("expired", 2)]
