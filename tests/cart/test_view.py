"""The cart view: today's prices with changes flagged, stock per line, per-seller
subtotals and the total."""

from __future__ import annotations

import httpx2

from tests.cart.catalog_support import Market
from tests.cart.conftest import add, anonymous_cart, line_of, view


async def test_price_change_is_flagged_with_both_prices(
    client: httpx2.AsyncClient, market: Market
) -> None:
    shop = await market.open_shop()
    listing = await shop.list_product(2000, 3000)
    changing, steady = listing.variant_ids
    cart = await anonymous_cart(client)
    await add(client, cart, changing, 2)
    await add(client, cart, steady)
    before = await view(client, cart)
    assert not any(line["price_changed"] for line in before["lines"])

    await shop.set_price(changing, 2400)
    after = await view(client, cart)
    line = line_of(after, changing)
    assert line["price_changed"] is True
    assert line["unit_price"] == {"amount": 2400, "currency": "KES"}
    assert line["price_when_added"] == {"amount": 2000, "currency": "KES"}
    assert line["line_total"] == {"amount": 4800, "currency": "KES"}
    assert line_of(after, steady)["price_changed"] is False
    # The total is what a checkout would charge: today's prices.
    assert after["total"] == {"amount": 4800 + 3000, "currency": "KES"}

    # Changing the quantity does not acknowledge the change...
    await client.patch(f"{cart.url}/items/{changing}", json={"quantity": 1}, headers=cart.headers)
    assert line_of(await view(client, cart), changing)["price_changed"] is True
    # ...adding the variant again, at the price the buyer now sees, does.
    await add(client, cart, changing)
    line = line_of(await view(client, cart), changing)
    assert line["price_changed"] is False and line["quantity"] == 2


async def test_availability_per_line(client: httpx2.AsyncClient, market: Market) -> None:
    shop = await market.open_shop()
    listing = await shop.list_product(1000, 1000, stock=(3, 0))
    plenty, none = listing.variant_ids
    cart = await anonymous_cart(client)
    await add(client, cart, plenty, 3)
    await add(client, cart, none, 1)  # adding is not refused: the view says so
    shown = await view(client, cart)
    assert line_of(shown, plenty)["available"] == 3
    assert line_of(shown, plenty)["quantity_available_ok"] is True
    assert line_of(shown, none)["available"] == 0
    assert line_of(shown, none)["quantity_available_ok"] is False

    await shop.set_stock(plenty, 2)
    await shop.set_stock(none, 8)
    shown = await view(client, cart)
    assert line_of(shown, plenty)["available"] == 2
    assert line_of(shown, plenty)["quantity_available_ok"] is False
    assert line_of(shown, none)["quantity_available_ok"] is True


async def test_subtotals_per_seller_and_total(client: httpx2.AsyncClient, market: Market) -> None:
    nairobi = await market.open_shop()
    mombasa = await market.open_shop()
    shirts = await nairobi.list_product(1500, 2500)
    baskets = await mombasa.list_product(4000)
    cart = await anonymous_cart(client)
    await add(client, cart, shirts.variant_ids[0], 2)
    await add(client, cart, shirts.variant_ids[1], 1)
    await add(client, cart, baskets.variant_id, 3)

    shown = await view(client, cart)
    subtotals = {seller["seller_id"]: seller for seller in shown["sellers"]}
    assert subtotals[str(nairobi.seller_id)]["subtotal"] == {"amount": 5500, "currency": "KES"}
    assert subtotals[str(nairobi.seller_id)]["item_count"] == 3
    assert subtotals[str(mombasa.seller_id)]["subtotal"] == {"amount": 12000, "currency": "KES"}
    assert shown["total"] == {"amount": 17500, "currency": "KES"}
    assert shown["item_count"] == 6
    line = line_of(shown, baskets.variant_id)
    assert line["seller_id"] == str(mombasa.seller_id)
    assert line["product_id"] == str(baskets.product_id)
    assert line["purchasable"] is True and line["title"] and line["sku"]

    # A line that can no longer be bought stays in view, out of the totals.
    await mombasa.archive_product(baskets.product_id)
    shown = await view(client, cart)
    assert line_of(shown, baskets.variant_id)["purchasable"] is False
    assert [seller["seller_id"] for seller in shown["sellers"]] == [str(nairobi.seller_id)]
    assert shown["total"] == {"amount": 5500, "currency": "KES"}
