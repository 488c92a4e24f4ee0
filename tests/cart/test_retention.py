"""The cart purge: converted, merged and expired carts go with their lines once closed
for the retention window; an open cart never does, however old."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import func, select

from soko.cart.models import Cart, CartLine, CartStatus
from soko.cart.retention import purge_closed_carts
from soko.platform.clock import ManualClock
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime

DAY = dt.timedelta(days=1)
KEEP = dt.timedelta(days=30)


async def add_cart(
    runtime: Runtime,
    status: CartStatus,
    *,
    user_id: uuid.UUID | None = None,
    merged_into: uuid.UUID | None = None,
    lines: int = 2,
) -> uuid.UUID:
    now = runtime.clock.now()
    cart_id = uuid7()
    async with runtime.db.transaction() as session:
        session.add(
            Cart(
                id=cart_id,
                user_id=user_id,
                token_hash=None if user_id else uuid.uuid4().hex * 2,
                status=status.value,
                currency="KES",
                version=1,
                created_at=now,
                updated_at=now,
                merged_into=merged_into,
            )
        )
        await session.flush()
        session.add_all(
            CartLine(
                id=uuid7(),
                cart_id=cart_id,
                variant_id=uuid.uuid4(),
                quantity=1,
                unit_price_minor=1500,
                currency="KES",
                added_at=now,
                updated_at=now,
            )
            for _ in range(lines)
        )
    return cart_id


async def count(runtime: Runtime, model: Any, *where: Any) -> int:
    async with runtime.db.sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def carts_left(runtime: Runtime) -> set[uuid.UUID]:
    async with runtime.db.sessionmaker() as session:
        return set((await session.scalars(select(Cart.id))).all())


async def test_closed_carts_go_with_their_lines_after_the_window(
    runtime: Runtime, clock: ManualClock
) -> None:
    buyer = uuid.uuid4()
    own = await add_cart(runtime, CartStatus.open, user_id=buyer)  # never purged
    merged = await add_cart(runtime, CartStatus.merged, merged_into=own)  # on sign-in
    converted = await add_cart(runtime, CartStatus.converted, user_id=uuid.uuid4())
    expired = await add_cart(runtime, CartStatus.expired)
    abandoned = await add_cart(runtime, CartStatus.open)  # left open, not expired yet
    clock.advance(KEEP - DAY)
    recent = await add_cart(runtime, CartStatus.converted, user_id=uuid.uuid4())
    clock.advance(2 * DAY)

    async with runtime.db.transaction() as session:
        assert await purge_closed_carts(session, clock.now(), keep=KEEP) == (3, 6, False)
    assert await carts_left(runtime) == {own, abandoned, recent}
    assert await count(runtime, CartLine) == 6
    assert await count(runtime, CartLine, CartLine.cart_id.in_([merged, converted, expired])) == 0

    clock.advance(KEEP * 10)
    async with runtime.db.transaction() as session:
        assert await purge_closed_carts(session, clock.now(), keep=KEEP) == (1, 2, False)
    assert await carts_left(runtime) == {own, abandoned}


async def test_a_purge_takes_a_bounded_batch_per_status(
    runtime: Runtime, clock: ManualClock
) -> None:
    for _ in range(3):
        await add_cart(runtime, CartStatus.expired, lines=1)
    await add_cart(runtime, CartStatus.merged, lines=1)
    clock.advance(KEEP + DAY)
    async with runtime.db.transaction() as session:
        assert await purge_closed_carts(session, clock.now(), keep=KEEP, limit=2) == (3, 3, True)
    async with runtime.db.transaction() as session:
        assert await purge_closed_carts(session, clock.now(), keep=KEEP, limit=2) == (1, 1, False)
    assert await carts_left(runtime) == set()


async def test_the_cart_purge_runs_from_the_dispatcher(
    runtime: Runtime, clock: ManualClock
) -> None:
    assert runtime.settings.retention_days == 30
    converted = await add_cart(runtime, CartStatus.converted, user_id=uuid.uuid4())
    clock.advance(KEEP - DAY)
    expired = await add_cart(runtime, CartStatus.expired)
    clock.advance(2 * DAY)
    open_cart = await add_cart(runtime, CartStatus.open, user_id=uuid.uuid4())

    await runtime.dispatcher.run_until_idle()

    assert await carts_left(runtime) == {expired, open_cart}
    assert await count(runtime, CartLine, CartLine.cart_id == converted) == 0
