"""A checkout costs at most fifteen SQL statements, whatever the number of lines or
stores: the idempotency key's claim (its own transaction), the checkout's transaction
and the stock reservation, BEGIN included."""

from __future__ import annotations

from typing import Any

import httpx2
from sqlalchemy import event
from sqlalchemy.orm import Session

from soko.platform.config import ReservationStrategy
from soko.platform.runtime import Runtime
from tests.cart.catalog_support import Market
from tests.conftest import sql_statements
from tests.orders.conftest import ORDERS, Buyer, MakeBuyer, ok

CHECKOUT_BUDGET = 15


async def _cost_of_checkout(client: httpx2.AsyncClient, runtime: Runtime, buyer: Buyer) -> int:
    # A first request of the buyer's token caches what the token stands for, as any
    # client's earlier requests would have.
    ok(await client.get(ORDERS, headers=buyer.headers))
    with sql_statements(runtime) as sent:
        response = await buyer.post_checkout()
    assert response.status_code == 201, response.text
    assert len(sent) <= CHECKOUT_BUDGET, "\n".join(sent)
    return len(sent)


def _one_row_saving(runtime: Runtime) -> int:
    """On PostgreSQL a checkout of one stock row claims it and writes its hold in one
    statement; several rows take two."""
    return 1 if runtime.db.dialect == "postgresql" else 0


async def _buyers(market: Market, make_buyer: MakeBuyer) -> tuple[Buyer, Buyer]:
    one_store = await market.open_shop()
    single = await make_buyer((await one_store.list_product(1000)).variant_id)
    lines: list[tuple[Any, int]] = []
    for _ in range(4):
        shop = await market.open_shop()
        listing = await shop.list_product(100, 200, 300, stock=20)
        lines.extend((variant_id, 2) for variant_id in listing.variant_ids)
    assert len(lines) == 12
    return single, await make_buyer(*lines)


async def test_a_checkout_stays_in_budget_whatever_its_size(
    client: httpx2.AsyncClient, runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    single, large = await _buyers(market, make_buyer)

    one_line = await _cost_of_checkout(client, runtime, single)
    twelve_lines = await _cost_of_checkout(client, runtime, large)

    # Flat: twelve lines of four stores cost what one line of one store did, but for
    # the one stock row whose claim writes its hold in the same statement (PostgreSQL).
    assert twelve_lines == one_line + _one_row_saving(runtime)
    print(f"statements per checkout: {one_line} (1 line, 1 store; 12 lines, 4 stores)")


async def test_the_pessimistic_strategy_stays_in_budget_too(
    client: httpx2.AsyncClient, runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    runtime.settings.reservation_strategy = ReservationStrategy.pessimistic
    single, large = await _buyers(market, make_buyer)
    one_line = await _cost_of_checkout(client, runtime, single)
    assert await _cost_of_checkout(client, runtime, large) == one_line + _one_row_saving(runtime)


async def test_a_sold_out_checkout_is_refused_before_any_write(
    client: httpx2.AsyncClient, runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    """What is already sold out is refused from the read of the cart's variants, which
    carries inventory's availability: no order is written and rolled back, and no stock
    row is touched, so a sold-out answer never waits on another checkout's row lock."""
    shop = await market.open_shop()
    scarce = (await shop.list_product(700, stock=1)).variant_ids[0]
    buyer = await make_buyer((scarce, 2))
    ok(await client.get(ORDERS, headers=buyer.headers))
    with sql_statements(runtime) as sent:
        response = await buyer.post_checkout()
    assert response.status_code == 409, response.text
    assert response.json()["shortages"] == [
        {"variant_id": str(scarce), "requested": 2, "available": 1}
    ]
    writes = [
        statement
        for statement in sent
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))
        and "idempotency" not in statement
    ]
    assert writes == [], "\n".join(writes)
    stock_reads = [statement for statement in sent if "inventory_stock_levels" in statement]
    assert len(stock_reads) == 1, "availability was not read with the variants"
    # Only the cart's variants are aggregated: without the filter the read would sum the
    # stock of every variant in the market on every checkout.
    assert "inventory_stock_levels.variant_id IN (" in stock_reads[0], stock_reads[0]


async def test_a_sold_out_checkout_opens_no_transaction(
    client: httpx2.AsyncClient, runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    """The cart and its variants are read before the checkout's transaction writes
    anything, so a sold-out answer costs no BEGIN and no ROLLBACK: only the reads and the
    idempotency key's own statements."""
    shop = await market.open_shop()
    scarce = (await shop.list_product(700, stock=1)).variant_ids[0]
    buyer = await make_buyer((scarce, 2))
    ok(await client.get(ORDERS, headers=buyer.headers))
    began: list[object] = []

    def record(session: Any, transaction: Any, connection: Any) -> None:
        began.append(transaction)

    event.listen(Session, "after_begin", record)
    try:
        response = await buyer.post_checkout()
    finally:
        event.remove(Session, "after_begin", record)
    assert response.status_code == 409, response.text
    assert began == []

    # A checkout that goes through writes in one transaction on SQLite; on PostgreSQL its
    # writes and its stored answer are one autocommitted statement, with none at all.
    shop_two = await market.open_shop()
    plenty = (await shop_two.list_product(700, stock=5)).variant_ids[0]
    other = await make_buyer((plenty, 1))
    event.listen(Session, "after_begin", record)
    try:
        assert (await other.post_checkout()).status_code == 201
    finally:
        event.remove(Session, "after_begin", record)
    assert len(began) == (0 if runtime.db.dialect == "postgresql" else 1)
