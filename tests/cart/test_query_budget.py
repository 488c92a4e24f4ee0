"""Adding to a cart costs at most five SQL statements, however full the cart is."""

from __future__ import annotations

from typing import Any

import httpx2

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
    # Flat: the twenty-fifth line costs what the first did.
    assert len(set(costs)) == 1, costs
    print(f"statements per add to an anonymous cart: {costs[0]}")


async def test_adding_to_a_users_cart_stays_in_budget(
    client: httpx2.AsyncClient, market: Market, runtime: Runtime, customer: SignedInUser
) -> None:
    shop = await market.open_shop()
    listing = await shop.list_product(*range(2000, 2020), stock=10)
    cart = await user_cart(client, customer)  # also resolves (and caches) the caller
    costs = await _costs_of_adding(client, runtime, cart, list(listing.variant_ids))
    assert len(set(costs)) == 1, costs
    print(f"statements per add to a user's cart: {costs[0]}")
