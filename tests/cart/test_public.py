"""The contract orders build on: the cart to check out, and closing it afterwards."""

from __future__ import annotations

import httpx2
import pytest

from soko.cart.public import (
    CartChanged,
    CartLineForCheckout,
    CartNotFound,
    cart_for_checkout,
    mark_converted,
)
from soko.platform.runtime import Runtime
from tests.cart.catalog_support import Market
from tests.cart.conftest import CARTS, add, anonymous_cart, problem_type, user_cart, view
from tests.identity.conftest import MakeUser, SignedInUser


async def test_cart_for_checkout_and_mark_converted(
    client: httpx2.AsyncClient,
    market: Market,
    runtime: Runtime,
    customer: SignedInUser,
    make_user: MakeUser,
) -> None:
    shop = await market.open_shop()
    listing = await shop.list_product(1500, 2500)
    first, second = listing.variant_ids
    cart = await user_cart(client, customer)
    async with runtime.db.transaction() as session:
        empty = await cart_for_checkout(session, cart_id=cart.id, user_id=customer.user_id)
    assert empty.lines == () and empty.version == 1 and empty.currency == "KES"

    await add(client, cart, first, 2)
    await add(client, cart, second, 1)
    await shop.set_price(first, 1600)  # the line keeps the price it was added at
    async with runtime.db.transaction() as session:
        found = await cart_for_checkout(session, cart_id=cart.id, user_id=customer.user_id)
    assert found.cart_id == cart.id and found.user_id == customer.user_id
    assert found.version == 3
    assert found.lines == (
        CartLineForCheckout(variant_id=first, quantity=2, unit_price_minor=1500, currency="KES"),
        CartLineForCheckout(variant_id=second, quantity=1, unit_price_minor=2500, currency="KES"),
    )

    stranger = await make_user()
    anonymous = await anonymous_cart(client)
    async with runtime.db.transaction() as session:
        with pytest.raises(CartNotFound):
            await cart_for_checkout(session, cart_id=cart.id, user_id=stranger.user_id)
        with pytest.raises(CartNotFound):
            await cart_for_checkout(session, cart_id=anonymous.id, user_id=customer.user_id)

    # A change after the checkout read the cart is noticed.
    await add(client, cart, second, 1)
    async with runtime.db.transaction() as session:
        with pytest.raises(CartChanged):
            await mark_converted(session, cart_id=cart.id, version=found.version)
    async with runtime.db.transaction() as session:
        await mark_converted(session, cart_id=cart.id, version=found.version + 1)
    shown = await view(client, cart)
    assert shown["status"] == "converted" and shown["version"] == found.version + 2
    async with runtime.db.transaction() as session:
        with pytest.raises(CartChanged):  # twice is refused
            await mark_converted(session, cart_id=cart.id, version=found.version + 2)
        with pytest.raises(CartNotFound):
            await cart_for_checkout(session, cart_id=cart.id, user_id=customer.user_id)

    refused = await add(client, cart, first)
    assert refused.status_code == 409 and problem_type(refused) == "cart-closed"
    fresh = await client.post(CARTS, headers=customer.headers)
    assert fresh.status_code == 201 and fresh.json()["cart"]["id"] != str(cart.id)
