"""Checkout over HTTP: a cart becomes one group and one order per seller, once per
Idempotency-Key, with the stock held last; and every way it is refused."""

from __future__ import annotations

import asyncio
import uuid

import httpx2
import pytest
from sqlalchemy import select

from soko.cart.public import CartNotFound, cart_for_checkout
from soko.inventory.public import OutOfStock
from soko.orders.models import CheckoutGroup, Order, OrderLine
from soko.platform.idempotency import IdempotencyKey
from soko.platform.money import MAX_AMOUNT_MINOR
from soko.platform.runtime import Runtime
from tests.cart.catalog_support import Market
from tests.orders.conftest import (
    ADMIN,
    CHECKOUT,
    ORDERS,
    MakeBuyer,
    available,
    count,
    events,
    ok,
    refused,
)


async def cart_is_open(runtime: Runtime, cart_id: uuid.UUID, user_id: uuid.UUID) -> bool:
    async with runtime.db.transaction(read_only=True) as session:
        try:
            await cart_for_checkout(session, cart_id=cart_id, user_id=user_id)
        except CartNotFound:
            return False
        return True


async def nothing_created(runtime: Runtime) -> None:
    assert await count(runtime, CheckoutGroup) == 0
    assert await count(runtime, Order) == 0
    assert await count(runtime, OrderLine) == 0
    assert await events(runtime, "order.placed") == []


async def test_a_cart_of_two_stores_becomes_two_orders_in_one_group(
    client: httpx2.AsyncClient, runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    kiosk, bakery = await market.open_shop(), await market.open_shop()
    wraps = await kiosk.list_product(1000, 2500, stock=5, title="Kikoi wrap")
    bread = await bakery.list_product(700, stock=5, title="Mandazi box")
    buyer = await make_buyer(
        (wraps.variant_ids[0], 2), (wraps.variant_ids[1], 1), (bread.variant_id, 3)
    )
    before = await available(runtime, *wraps.variant_ids, bread.variant_id)

    response = await buyer.post_checkout(shipping_address={"city": "Nairobi", "line1": "Moi Ave 1"})
    group = ok(response, 201)

    assert response.headers["location"] == f"{CHECKOUT}/{group['id']}"
    assert "idempotency-replayed" not in response.headers
    assert group["status"] == "pending_payment"
    assert group["total"] == {"amount": 2 * 1000 + 2500 + 3 * 700, "currency": "KES"}
    assert group["shipping_address"] == {"city": "Nairobi", "line1": "Moi Ave 1"}
    # The stock is held for the configured time.
    assert group["reservation_expires_at"] == "2030-01-01T00:15:00Z"
    by_seller = {order["seller_id"]: order for order in group["orders"]}
    assert set(by_seller) == {str(kiosk.seller_id), str(bakery.seller_id)}
    first, second = by_seller[str(kiosk.seller_id)], by_seller[str(bakery.seller_id)]
    assert first["subtotal"] == {"amount": 4500, "currency": "KES"}
    assert (first["item_count"], second["item_count"]) == (3, 3)
    assert second["subtotal"] == {"amount": 2100, "currency": "KES"}
    assert first["number"].startswith("SK-") and first["number"] != second["number"]
    line = first["lines"][0]
    assert line["title"] == "Kikoi wrap"
    assert line["sku"].startswith("KW-")
    assert line["unit_price"] == {"amount": 1000, "currency": "KES"}
    assert (line["quantity"], line["line_total"]["amount"]) == (2, 2000)
    assert [line["variant_id"] for line in first["lines"]] == [str(v) for v in wraps.variant_ids]

    # The stock is held; the cart is closed; each order announced itself.
    after = await available(runtime, *wraps.variant_ids, bread.variant_id)
    assert after == {
        wraps.variant_ids[0]: before[wraps.variant_ids[0]] - 2,
        wraps.variant_ids[1]: before[wraps.variant_ids[1]] - 1,
        bread.variant_id: before[bread.variant_id] - 3,
    }
    assert not await cart_is_open(runtime, buyer.cart_id, buyer.user_id)
    placed = await events(runtime, "order.placed")
    assert {event["order_id"] for event in placed} == {first["id"], second["id"]}
    assert {event["group_id"] for event in placed} == {group["id"]}

    # The buyer reads it back as it was answered; each store sees where to deliver.
    assert ok(await client.get(f"{CHECKOUT}/{group['id']}", headers=buyer.headers)) == group
    for shop, order in ((kiosk, first), (bakery, second)):
        seen = ok(await client.get(f"/api/v1/seller/orders/{order['id']}", headers=shop.headers))
        assert seen["shipping_address"] == {"city": "Nairobi", "line1": "Moi Ave 1"}
        assert seen["buyer_id"] == str(buyer.user_id)


async def test_lines_keep_the_title_sku_and_price_of_the_checkout(
    client: httpx2.AsyncClient, market: Market, make_buyer: MakeBuyer
) -> None:
    shop = await market.open_shop()
    listing = await shop.list_product(1200, title="Sisal basket")
    buyer = await make_buyer(listing.variant_id)
    group = await buyer.checkout()
    order_id = group["orders"][0]["id"]

    await shop.set_price(listing.variant_id, 9900)
    ok(
        await client.patch(
            f"/api/v1/seller/products/{listing.product_id}",
            json={"title": "Renamed basket"},
            headers=shop.headers,
        )
    )

    [line] = ok(await client.get(f"{ORDERS}/{order_id}", headers=buyer.headers))["lines"]
    assert line["title"] == "Sisal basket"
    assert line["unit_price"] == {"amount": 1200, "currency": "KES"}
    assert line["line_total"] == {"amount": 1200, "currency": "KES"}


async def test_a_retry_with_the_same_key_replays_the_checkout(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    variant_id = await market.variant(800, stock=10)
    buyer = await make_buyer((variant_id, 4))
    first = await buyer.post_checkout(key="retry-me")
    assert first.status_code == 201
    assert (await available(runtime, variant_id))[variant_id] == 6

    again = await buyer.post_checkout(key="retry-me")

    assert again.status_code == 201
    assert again.headers["idempotency-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert again.json() == first.json()
    # No second group, no second reservation.
    assert await count(runtime, CheckoutGroup) == 1
    assert (await available(runtime, variant_id))[variant_id] == 6
    assert len(await events(runtime, "order.placed")) == 1


async def test_the_same_key_with_another_body_is_refused(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    variant_id = await market.variant()
    buyer = await make_buyer(variant_id)
    await buyer.checkout(key="once")

    changed = await buyer.post_checkout(key="once", accept_price_changes=True)

    refused(changed, 422, "idempotency-key-reused")
    assert await count(runtime, CheckoutGroup) == 1


async def test_concurrent_requests_with_one_key_check_out_once(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    variant_id = await market.variant(stock=10)
    buyer = await make_buyer((variant_id, 3))

    answers = await asyncio.gather(*(buyer.post_checkout(key="double-click") for _ in range(2)))

    created = [
        r for r in answers if r.status_code == 201 and "idempotency-replayed" not in r.headers
    ]
    others = [r for r in answers if r not in created]
    assert len(created) == 1, [(r.status_code, r.text) for r in answers]
    [other] = others
    assert (other.status_code, other.headers.get("idempotency-replayed")) in {
        (409, None),
        (201, "true"),
    }, other.text
    if other.status_code == 409:
        refused(other, 409, "idempotency-in-flight")
        assert int(other.headers["retry-after"]) >= 1
    else:
        assert other.json() == created[0].json()
    assert await count(runtime, CheckoutGroup) == 1
    assert (await available(runtime, variant_id))[variant_id] == 7


async def test_a_checkout_needs_an_idempotency_key(
    client: httpx2.AsyncClient, runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    buyer = await make_buyer(await market.variant())

    refused(await buyer.post_checkout(key=None), 400, "idempotency-key-required")
    refused(await buyer.post_checkout(key="x" * 256), 422, "validation-error")
    refused(await buyer.post_checkout(key="tab\tkey"), 422, "validation-error")
    anonymous = await client.post(
        CHECKOUT, json={"cart_id": str(buyer.cart_id)}, headers={"Idempotency-Key": "k"}
    )
    refused(anonymous, 401, "unauthorized")
    await nothing_created(runtime)
    assert await count(runtime, IdempotencyKey) == 0
    # A key of 255 printable characters is fine.
    ok(await buyer.post_checkout(key="k" * 254 + "~"), 201)


async def test_an_empty_cart_cannot_be_checked_out(runtime: Runtime, make_buyer: MakeBuyer) -> None:
    buyer = await make_buyer()
    refused(await buyer.post_checkout(), 409, "checkout-cart-empty")
    await nothing_created(runtime)


async def test_someone_elses_cart_or_a_closed_one_is_not_found(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    variant_id = await market.variant()
    owner, other = await make_buyer(variant_id), await make_buyer()
    other.cart_id = owner.cart_id
    refused(await other.post_checkout(), 404, "not-found")
    await owner.checkout()
    # The cart is converted: checking it out again finds no open cart.
    refused(await owner.post_checkout(), 404, "not-found")
    assert await count(runtime, CheckoutGroup) == 1


async def test_items_of_a_suspended_store_cannot_be_bought(
    client: httpx2.AsyncClient, runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    open_shop, closing = await market.open_shop(), await market.open_shop()
    fine = (await open_shop.list_product(500)).variant_id
    gone = (await closing.list_product(700)).variant_id
    buyer = await make_buyer(fine, gone)
    ok(
        await client.post(
            f"{ADMIN}/sellers/{closing.seller_id}/suspend",
            json={"reason": "fraud report"},
            headers=(await market.admin()).headers,
        )
    )
    before = await available(runtime, fine, gone)

    problem = refused(await buyer.post_checkout(), 409, "checkout-items-unavailable")

    assert problem["unavailable"] == [{"variant_id": str(gone), "reason": "seller_not_selling"}]
    await nothing_created(runtime)
    assert await available(runtime, fine, gone) == before
    assert await cart_is_open(runtime, buyer.cart_id, buyer.user_id)


async def test_an_archived_variant_cannot_be_bought(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    shop = await market.open_shop()
    listing = await shop.list_product(500, 600)
    buyer = await make_buyer(*listing.variant_ids)
    await shop.archive_variant(listing.variant_ids[1])

    problem = refused(await buyer.post_checkout(), 409, "checkout-items-unavailable")

    assert problem["unavailable"] == [
        {"variant_id": str(listing.variant_ids[1]), "reason": "not_for_sale"}
    ]
    await nothing_created(runtime)


async def test_changed_prices_are_refused_unless_accepted(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    shop = await market.open_shop()
    cheap, steady = (await shop.list_product(1000, 300)).variant_ids
    buyer = await make_buyer((cheap, 2), steady)
    await shop.set_price(cheap, 1250)

    problem = refused(await buyer.post_checkout(), 409, "cart-prices-changed")
    assert problem["lines"] == [
        {"variant_id": str(cheap), "price_when_added": 1000, "price_now": 1250}
    ]
    await nothing_created(runtime)

    group = await buyer.checkout(accept_price_changes=True)
    assert group["total"]["amount"] == 2 * 1250 + 300
    assert group["orders"][0]["lines"][0]["unit_price"]["amount"] == 1250


async def test_the_expected_total_must_match(market: Market, make_buyer: MakeBuyer) -> None:
    buyer = await make_buyer((await market.variant(450), 2))
    problem = refused(
        await buyer.post_checkout(expected_total_minor=800), 409, "checkout-total-changed"
    )
    assert (problem["total_minor"], problem["currency"]) == (900, "KES")
    assert (await buyer.checkout(expected_total_minor=900))["total"]["amount"] == 900


async def test_a_total_beyond_what_one_checkout_can_take_is_refused(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    # Each price is within bounds, the sum is not: stored, it would overflow the
    # ledger's sums (SQLite refused the number itself with a 500).
    dearest = await market.variant(MAX_AMOUNT_MINOR, stock=50)
    other = await market.variant(MAX_AMOUNT_MINOR, stock=50)
    buyer = await make_buyer((dearest, 7), (other, 5))
    problem = refused(await buyer.post_checkout(), 422, "checkout-total-too-large")
    assert problem["total_minor"] == 12 * MAX_AMOUNT_MINOR
    assert (problem["max_total_minor"], problem["currency"]) == (MAX_AMOUNT_MINOR, "KES")
    await nothing_created(runtime)
    assert await available(runtime, dearest, other) == {dearest: 50, other: 50}
    # At the bound itself, a checkout goes through.
    buyer = await make_buyer((dearest, 1))
    assert (await buyer.checkout())["total"]["amount"] == MAX_AMOUNT_MINOR


async def test_out_of_stock_creates_nothing_and_says_what_is_short(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer
) -> None:
    shop = await market.open_shop()
    plenty, scarce = (await shop.list_product(100, 200, stock=(10, 2))).variant_ids
    buyer = await make_buyer((plenty, 1), (scarce, 3))

    response = await buyer.post_checkout(key="too-many")

    problem = refused(response, 409, OutOfStock.slug)
    assert problem["shortages"] == [{"variant_id": str(scarce), "requested": 3, "available": 2}]
    await nothing_created(runtime)
    assert await available(runtime, plenty, scarce) == {plenty: 10, scarce: 2}
    assert await cart_is_open(runtime, buyer.cart_id, buyer.user_id)
    # The refusal is the key's answer: a retry gets it again, marked as a replay.
    again = await buyer.post_checkout(key="too-many")
    assert again.status_code == 409
    assert again.headers["idempotency-replayed"] == "true"
    assert again.json() == response.json()


@pytest.mark.parametrize("field", ["cart_id", "expected_total_minor"])
async def test_a_malformed_body_is_a_validation_error_and_frees_the_key(
    runtime: Runtime, market: Market, make_buyer: MakeBuyer, field: str
) -> None:
    buyer = await make_buyer(await market.variant())
    bad = {"cart_id": "not-an-id"} if field == "cart_id" else {"expected_total_minor": -1}
    response = await buyer.client.post(
        CHECKOUT,
        json={"cart_id": str(buyer.cart_id), **bad},
        headers={**buyer.headers, "Idempotency-Key": "fix-me"},
    )
    refused(response, 422, "validation-error")
    async with runtime.db.transaction(read_only=True) as session:
        assert (await session.scalars(select(IdempotencyKey))).all() == []


async def test_an_expected_total_beyond_any_amount_is_a_field_error(
    client: httpx2.AsyncClient, make_buyer: MakeBuyer
) -> None:
    buyer = await make_buyer()
    answer = await client.post(
        "/api/v1/checkout",
        json={"cart_id": str(buyer.cart_id), "expected_total_minor": 10**40},
        headers={**buyer.headers, "Idempotency-Key": "total-beyond-any-amount"},
    )
    assert answer.status_code == 422, answer.text
    assert [error["field"] for error in answer.json()["errors"]] == ["expected_total_minor"]
    assert "0" * 40 not in answer.text  # the value is not echoed
