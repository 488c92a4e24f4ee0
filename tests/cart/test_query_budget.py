"""Adding to a cart costs at most five SQL statements, however full the cart is, and
a cart holds a bounded number of lines."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import pytest

from soko.cart import service as cart_service
from soko.platform.runtime import Runtime
from tests.cart.catalog_support import Market
from tests.cart.conftest import CartHandle, add, anonymous_cart, user_cart
from tests.conftest import sql_statements
from tests.identity.conftest import SignedInUser

ADD_BUDGET = 5


async def _costs_of_adding(
    client: httpx2.AsyncClient, runtime: Runtime, cart: CartHandle, variants: list[Any]
) -> list[int]:
    """The statements of each add, as the cart fills up; the last variant goes twice
    (a new line, then more of an existing one)."""
    costs: list[int] = []
    for variant in [*variants, variants[-1]]:
        with sql_statements(runtime) as sent:
            response = await add(client, cart, variant)
        assert response.status_code == 200, response.text
        assert len(sent) <= ADD_BUDGET, "\n".join(sent)
        costs.append(len(sent))
    return costs


async def test_adding_to_an_anonymous_cart_stays_in_budget(
    client: httpx2.AsyncClient, market: Market, runtime: Runtime
) -> None:
    shop = await market.open_shop()
    listing = await shop.list_product(*range(1000, 1025), stock=10)
    cart = await anonymous_cart(client)
    costs = await _costs_of_adding(client, runtime, cart, list(listing.variant_ids))
    # Flat: the twenty-fifth line costs what the first did (more of a line already
    # there may cost one less: no count of the lines).
    assert len(set(costs[:-1])) == 1 and costs[-1] <= costs[0], costs
    print(f"statements per add to an anonymous cart: {costs[0]}")


async def test_adding_to_a_users_cart_stays_in_budget(
    client: httpx2.AsyncClient, market: Market, runtime: Runtime, customer: SignedInUser
) -> None:
    shop = await market.open_shop()
    listing = await shop.list_product(*range(2000, 2020), stock=10)
    cart = await user_cart(client, customer)  # also resolves (and caches) the caller
    costs = await _costs_of_adding(client, runtime, cart, list(listing.variant_ids))
    assert len(set(costs[:-1])) == 1 and costs[-1] <= costs[0], costs
    print(f"statements per add to a user's cart: {costs[0]}")


async def test_a_cart_holds_a_bounded_number_of_lines(
    client: httpx2.AsyncClient, market: Market, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bounded, so reading, pricing and checking out a cart stay bounded too.
    monkeypatch.setattr(cart_service, "MAX_CART_LINES", 3)
    shop = await market.open_shop()
    listing = await shop.list_product(*range(3000, 3005), stock=10)
    variants = list(listing.variant_ids)
    cart = await anonymous_cart(client)
    for variant in variants[:3]:
        assert (await add(client, cart, variant)).status_code == 200
    full = await add(client, cart, variants[3])
    assert full.status_code == 409, full.text
    assert full.json()["type"] == "/problems/cart-full"
    assert full.json()["max_lines"] == 3
    # More of a line already there is fine; the refused line left nothing behind.
    assert (await add(client, cart, variants[0], 2)).status_code == 200
    view = (await client.get(cart.url, headers=cart.headers)).json()
    assert [line["quantity"] for line in view["lines"]] == [3, 1, 1]
    # Several new lines at once: the cart's lock lets exactly none past the bound.
    answers = await asyncio.gather(*(add(client, cart, v) for v in variants[3:]))
    assert [a.status_code for a in answers] == [409, 409]
