"""A product's ``stocked`` flag follows its units on hand, in the transaction that moves
them, and the ``in_stock`` listing reads only the products it lets through."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession

from soko.catalog.models import Product
from soko.inventory import public as inventory
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime
from tests.catalog.support import API, Catalog, Store, ok

pytestmark = pytest.mark.usefixtures("settings")


async def _stocked(runtime: Runtime, product: dict[str, Any]) -> bool:
    async with runtime.db.transaction(read_only=True) as session:
        flag = await session.scalar(
            select(Product.stocked).where(Product.id == uuid.UUID(product["id"]))
        )
    assert flag is not None
    return bool(flag)


async def _set_location_active(store: Store, active: bool) -> None:
    location = await store.location_id()
    ok(
        await store.client.patch(
            f"{API}/seller/locations/{location}", json={"active": active}, headers=store.headers
        )
    )


async def test_the_flag_follows_units_on_hand(
    runtime: Runtime, client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    store = await catalog.store()
    product = await store.product(1000, 1500)
    first, second = (variant["id"] for variant in product["variants"])
    assert await _stocked(runtime, product) is False

    await store.set_stock(first, 4)
    assert await _stocked(runtime, product) is True
    assert await catalog.listed_ids(in_stock="true") == [product["id"]]
    await store.set_stock(second, 2)
    await store.set_stock(first, 0)
    assert await _stocked(runtime, product) is True  # the second variant still has units
    await store.adjust_stock(second, -2)
    assert await _stocked(runtime, product) is False
    assert await catalog.listed_ids(in_stock="true") == []
    await store.adjust_stock(second, 3)
    assert await _stocked(runtime, product) is True

    await _set_location_active(store, False)
    assert await _stocked(runtime, product) is False
    assert await catalog.listed_ids(in_stock="true") == []
    await _set_location_active(store, True)
    assert await _stocked(runtime, product) is True
    assert await catalog.listed_ids(in_stock="true") == [product["id"]]


async def test_held_units_stay_flagged_but_are_not_listed_as_in_stock(
    runtime: Runtime, client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    """The flag counts units on hand whether held or not, so a checkout never writes it;
    the listing still checks what can be bought now."""
    store = await catalog.store()
    product = await store.product()
    variant_id = uuid.UUID(product["variants"][0]["id"])
    await store.set_stock(variant_id, 2)

    async with runtime.db.transaction() as session:
        await inventory.reserve(
            session,
            runtime,
            holder_ref=(holder := uuid7()),
            lines=[inventory.ReservationRequest(variant_id=variant_id, quantity=2)],
            expires_at=runtime.clock.now() + dt.timedelta(minutes=15),
        )
    assert await _stocked(runtime, product) is True
    assert await catalog.listed_ids(in_stock="true") == []

    async with runtime.db.transaction() as session:
        await inventory.commit_hold(session, runtime, holder)
        await inventory.fulfil(session, runtime, holder)
    # Shipped: the units left the shelf, and the flag with them.
    assert await _stocked(runtime, product) is False


async def test_only_the_products_of_the_changed_variants_are_written(
    runtime: Runtime, client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    store = await catalog.store()
    stocked, other = await store.product(), await store.product()
    await store.set_stock(other["variants"][0]["id"], 1)
    async with runtime.db.transaction() as session:
        # A flag gone wrong behind the listener's back stays wrong until its product's
        # stock moves: the listener works on the products it is told of, not all.
        await session.execute(text("UPDATE catalog_products SET stocked = false"))
    await store.set_stock(stocked["variants"][0]["id"], 3)
    assert await _stocked(runtime, stocked) is True
    assert await _stocked(runtime, other) is False


@pytest.mark.postgresql
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_concurrent_writers_of_one_product_leave_the_flag_right(
    runtime: Runtime, client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    """Writers of different variants of one product run at once, each in its own
    transaction; whichever commits last, the flag matches the stock left."""
    store = await catalog.store()
    product = await store.product(1000, 1100, 1200, 1300)
    variants = [variant["id"] for variant in product["variants"]]
    await store.location_id()
    rng = random.Random(7)
    for _ in range(12):
        levels = [rng.choice([0, 0, 1]) for _ in variants]
        await asyncio.gather(
            *(store.set_stock(v, n) for v, n in zip(variants, levels, strict=True))
        )
        assert await _stocked(runtime, product) is any(levels), levels


async def test_a_location_of_many_products_is_followed_in_chunks(
    runtime: Runtime,
    client: httpx2.AsyncClient,
    catalog: Catalog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A location going (in)active names every variant stocked there: the listener
    works through them a bounded number of ids at a time."""
    from soko.catalog import handlers

    monkeypatch.setattr(handlers, "IDS_PER_STATEMENT", 2)
    store = await catalog.store()
    products = [await store.product(1000, 1200) for _ in range(3)]
    for product in products:
        for variant in product["variants"]:
            await store.set_stock(variant["id"], 1)
    await _set_location_active(store, False)
    assert [await _stocked(runtime, p) for p in products] == [False] * 3
    await _set_location_active(store, True)
    assert [await _stocked(runtime, p) for p in products] == [True] * 3


@pytest.mark.postgresql
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
@pytest.mark.parametrize(
    ("first", "activate"), [("stock", False), ("stock", True), ("location", True)]
)
async def test_a_location_change_and_a_stock_write_at_once_leave_the_flag_right(
    runtime: Runtime, client: httpx2.AsyncClient, catalog: Catalog, first: str, activate: bool
) -> None:
    """The first units of a variant at a location, and the location going (in)active, in
    two transactions at once: neither may miss the other, whichever writes first."""
    from soko.inventory import service

    store = await catalog.store()
    product = await store.product()
    variant_id = uuid.UUID(product["variants"][0]["id"])
    location_id = await store.location_id()
    now = runtime.clock.now()
    if activate:
        await _set_location_active(store, False)
    began = asyncio.Event()
    writes: dict[str, Callable[[AsyncSession], Awaitable[Any]]] = {
        "stock": lambda session: service.set_stock(
            session,
            now,
            seller_id=store.seller_id,
            variant_id=variant_id,
            location_id=location_id,
            on_hand=5,
            reason="count",
            actor_id=store.owner.user_id,
        ),
        "location": lambda session: service.update_location(
            session,
            now,
            seller_id=store.seller_id,
            location_id=location_id,
            changes={"active": activate},
        ),
    }

    async def held_open(kind: str) -> None:
        async with runtime.db.transaction() as session:
            await writes[kind](session)
            began.set()
            await asyncio.sleep(0.3)  # the other transaction runs, or waits, meanwhile

    async def second() -> None:
        await began.wait()
        await held_open("location" if first == "stock" else "stock")

    await asyncio.gather(held_open(first), second())
    assert await _stocked(runtime, product) is activate
