"""Concurrent writers of one cart: nothing lost, one version per write, one open cart
per user whatever the race."""

from __future__ import annotations

import asyncio

import httpx2

from tests.cart.catalog_support import Market
from tests.cart.conftest import CARTS, add, anonymous_cart, line_of, user_cart, view
from tests.identity.conftest import SignedInUser


async def test_racing_creates_end_with_one_cart(
    client: httpx2.AsyncClient, customer: SignedInUser
) -> None:
    answers = await asyncio.gather(
        *(client.post(CARTS, headers=customer.headers) for _ in range(6))
    )
    assert sorted(answer.status_code for answer in answers) == [200] * 5 + [201]
    assert len({answer.json()["cart"]["id"] for answer in answers}) == 1


async def test_concurrent_adds_of_one_variant_all_count(
    client: httpx2.AsyncClient, market: Market, customer: SignedInUser
) -> None:
    variant = await market.variant(stock=100)
    cart = await user_cart(client, customer)
    writers = 12
    answers = await asyncio.gather(
        *(add(client, cart, variant, quantity) for quantity in range(1, writers + 1))
    )
    assert [answer.status_code for answer in answers] == [200] * writers
    # Each write got a version of its own, one after the other.
    assert sorted(answer.json()["version"] for answer in answers) == list(range(2, writers + 2))
    shown = await view(client, cart)
    assert line_of(shown, variant)["quantity"] == sum(range(1, writers + 1))
    assert shown["version"] == writers + 1
    assert len(shown["lines"]) == 1


async def test_concurrent_writes_on_an_anonymous_cart_lose_nothing(
    client: httpx2.AsyncClient, market: Market
) -> None:
    shop = await market.open_shop()
    listing = await shop.list_product(100, 200, 300, stock=50)
    cart = await anonymous_cart(client)
    await add(client, cart, listing.variant_ids[0], 5)
    changes = [
        add(client, cart, listing.variant_ids[1], 2),
        add(client, cart, listing.variant_ids[2], 3),
        client.patch(
            f"{cart.url}/items/{listing.variant_ids[0]}",
            json={"quantity": 7},
            headers=cart.headers,
        ),
        add(client, cart, listing.variant_ids[1], 4),
    ]
    answers = await asyncio.gather(*changes)
    assert [answer.status_code for answer in answers] == [200] * 4
    shown = await view(client, cart)
    assert {line["variant_id"]: line["quantity"] for line in shown["lines"]} == {
        str(listing.variant_ids[0]): 7,
        str(listing.variant_ids[1]): 6,
        str(listing.variant_ids[2]): 3,
    }
    assert shown["version"] == 1 + 1 + 4
