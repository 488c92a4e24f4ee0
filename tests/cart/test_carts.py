"""Carts over HTTP: who may open and use one, lines, bounds, versions."""

from __future__ import annotations

import uuid

import httpx2
from sqlalchemy import select

from soko.cart.models import Cart
from soko.cart.service import hash_cart_token
from soko.platform.runtime import Runtime
from tests.cart.catalog_support import Market
from tests.cart.conftest import (
    CARTS,
    CartHandle,
    add,
    anonymous_cart,
    line_of,
    problem_type,
    quantities,
    user_cart,
    view,
)
from tests.identity.conftest import MakeUser, SignedInUser


async def test_anonymous_cart_answers_to_its_token_only(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    created = await client.post(CARTS)
    assert created.status_code == 201, created.text
    body = created.json()
    token = body["token"]
    cart = body["cart"]
    assert token.startswith("ct_") and len(token) >= 40
    assert cart["status"] == "open" and cart["currency"] == "KES"
    assert cart["lines"] == [] and cart["total"] == {"amount": 0, "currency": "KES"}
    assert cart["signed_in"] is False
    assert created.headers["location"] == f"{CARTS}/{cart['id']}"
    assert created.headers["etag"].startswith(f'"v{cart["version"]}.')

    url = f"{CARTS}/{cart['id']}"
    assert (await client.get(url, headers={"X-Cart-Token": token})).status_code == 200
    without = await client.get(url)
    assert without.status_code == 404 and problem_type(without) == "not-found"
    other = await client.post(CARTS)
    wrong = await client.get(url, headers={"X-Cart-Token": other.json()["token"]})
    assert wrong.status_code == 404
    garbage = await client.get(url, headers={"X-Cart-Token": "not-a-token"})
    assert garbage.status_code == 404

    # Only the token's hash is kept.
    async with runtime.db.transaction(read_only=True) as session:
        stored = await session.get(Cart, uuid.UUID(cart["id"]))
    assert stored is not None and stored.token_hash == hash_cart_token(token)
    assert token not in repr(stored.__dict__)


async def test_each_anonymous_create_is_a_new_cart_in_the_currency_asked(
    client: httpx2.AsyncClient,
) -> None:
    first = await anonymous_cart(client)
    second = await anonymous_cart(client, currency="UGX")
    assert first.id != second.id
    assert (await view(client, second))["currency"] == "UGX"
    unknown = await client.post(CARTS, json={"currency": "XXY"})
    assert unknown.status_code == 422
    assert unknown.json()["errors"][0]["field"] == "currency"


async def test_signed_in_user_gets_one_open_cart(
    client: httpx2.AsyncClient, customer: SignedInUser, make_user: MakeUser
) -> None:
    created = await client.post(CARTS, headers=customer.headers)
    assert created.status_code == 201, created.text
    assert created.json()["token"] is None
    assert created.json()["cart"]["signed_in"] is True
    again = await client.post(CARTS, headers=customer.headers)
    assert again.status_code == 200
    assert again.json()["cart"]["id"] == created.json()["cart"]["id"]

    url = f"{CARTS}/{created.json()['cart']['id']}"
    assert (await client.get(url, headers=customer.headers)).status_code == 200
    assert (await client.get(url)).status_code == 404
    stranger = await make_user()
    theirs = await client.get(url, headers=stranger.headers)
    assert theirs.status_code == 404 and problem_type(theirs) == "not-found"
    stranger_cart = await user_cart(client, stranger)
    assert stranger_cart.id != uuid.UUID(created.json()["cart"]["id"])


async def test_another_users_cart_cannot_be_changed(
    client: httpx2.AsyncClient, market: Market, customer: SignedInUser, make_user: MakeUser
) -> None:
    variant = await market.variant()
    cart = await user_cart(client, customer)
    stranger = await make_user()
    as_stranger = CartHandle(cart.id, stranger.headers)
    assert (await add(client, as_stranger, variant)).status_code == 404
    assert (await add(client, cart, variant)).status_code == 200
    changed = await client.patch(
        f"{cart.url}/items/{variant}", json={"quantity": 3}, headers=stranger.headers
    )
    assert changed.status_code == 404
    removed = await client.delete(f"{cart.url}/items/{variant}", headers=stranger.headers)
    assert removed.status_code == 404
    # Nor through a token: a user's cart answers to the user only.
    anonymous = await anonymous_cart(client)
    borrowed = CartHandle(cart.id, anonymous.headers)
    assert (await add(client, borrowed, variant)).status_code == 404
    assert quantities(await view(client, cart)) == {str(variant): 1}


async def test_add_change_and_remove_lines(client: httpx2.AsyncClient, market: Market) -> None:
    shop = await market.open_shop()
    listing = await shop.list_product(1500, 2500, stock=5)
    first, second = listing.variant_ids
    cart = await anonymous_cart(client)

    added = await add(client, cart, first, 2)
    assert added.status_code == 200, added.text
    written = added.json()
    assert written["version"] == 2 and added.headers["etag"] == '"v2"'
    assert written["line"]["quantity"] == 2
    assert written["line"]["price_when_added"] == {"amount": 1500, "currency": "KES"}

    # The same variant again adds to its line: one line per variant.
    again = await add(client, cart, first, 3)
    assert again.json()["line"]["quantity"] == 5 and again.json()["version"] == 3
    await add(client, cart, second)
    assert quantities(await view(client, cart)) == {str(first): 5, str(second): 1}

    changed = await client.patch(
        f"{cart.url}/items/{first}", json={"quantity": 4}, headers=cart.headers
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["line"]["quantity"] == 4

    zero = await client.patch(
        f"{cart.url}/items/{second}", json={"quantity": 0}, headers=cart.headers
    )
    assert zero.status_code == 200 and zero.json()["line"] is None
    removed = await client.delete(f"{cart.url}/items/{first}", headers=cart.headers)
    assert removed.status_code == 204
    assert removed.headers["etag"] == f'"v{zero.json()["version"] + 1}"'
    final = await view(client, cart)
    assert final["lines"] == [] and final["version"] == 7

    missing = await client.delete(f"{cart.url}/items/{first}", headers=cart.headers)
    assert missing.status_code == 404
    missing_patch = await client.patch(
        f"{cart.url}/items/{first}", json={"quantity": 2}, headers=cart.headers
    )
    assert missing_patch.status_code == 404
    # A refused change leaves the version alone.
    assert (await view(client, cart))["version"] == 7


async def test_quantity_bounds(client: httpx2.AsyncClient, market: Market) -> None:
    variant = await market.variant()
    cart = await anonymous_cart(client)
    for quantity in (0, -1, 1000):
        response = await add(client, cart, variant, quantity)
        assert response.status_code == 422, quantity
        assert response.json()["errors"][0]["field"] == "quantity"
    assert (await add(client, cart, variant, 999)).status_code == 200
    over = await add(client, cart, variant, 1)
    assert over.status_code == 422 and over.json()["errors"][0]["field"] == "quantity"
    too_many = await client.patch(
        f"{cart.url}/items/{variant}", json={"quantity": 1000}, headers=cart.headers
    )
    assert too_many.status_code == 422
    line = line_of(await view(client, cart), variant)
    assert line["quantity"] == 999


async def test_unknown_and_unpurchasable_variants_are_refused(
    client: httpx2.AsyncClient, market: Market
) -> None:
    shop = await market.open_shop()
    draft = await shop.list_product(1200, publish=False)
    listed = await shop.list_product(1200, 1300)
    await shop.archive_variant(listed.variant_ids[1])
    cart = await anonymous_cart(client)
    for variant in (uuid.uuid4(), draft.variant_id, listed.variant_ids[1]):
        response = await add(client, cart, variant)
        assert response.status_code == 422, response.text
        assert response.json()["errors"][0]["field"] == "variant_id"
    assert (await add(client, cart, listed.variant_id)).status_code == 200
    assert (await view(client, cart))["version"] == 2


async def test_a_variant_in_another_currency_is_refused(
    client: httpx2.AsyncClient, market: Market
) -> None:
    shop = await market.open_shop()
    shillings = await shop.list_product(1000, currency="UGX")
    cart = await anonymous_cart(client)  # KES
    response = await add(client, cart, shillings.variant_id)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "variant_id"
    ugx_cart = await anonymous_cart(client, currency="UGX")
    assert (await add(client, ugx_cart, shillings.variant_id)).status_code == 200


async def test_if_match_guards_each_write(client: httpx2.AsyncClient, market: Market) -> None:
    variant = await market.variant()
    cart = await anonymous_cart(client)
    read = await client.get(cart.url, headers=cart.headers)
    etag = read.headers["etag"]
    assert etag.startswith('"v1.') and read.headers["cache-control"] == "private, no-cache"
    unchanged = await client.get(cart.url, headers={**cart.headers, "If-None-Match": etag})
    assert unchanged.status_code == 304

    first = await add(client, cart, variant, 1, **{"If-Match": etag})
    assert first.status_code == 200
    stale = await add(client, cart, variant, 1, **{"If-Match": etag})
    assert stale.status_code == 412 and problem_type(stale) == "precondition-failed"
    assert stale.json()["current_etag"] == first.headers["etag"]
    weak = await add(client, cart, variant, 1, **{"If-Match": f"W/{first.headers['etag']}"})
    assert weak.status_code == 412
    stale_patch = await client.patch(
        f"{cart.url}/items/{variant}",
        json={"quantity": 5},
        headers={**cart.headers, "If-Match": etag},
    )
    assert stale_patch.status_code == 412
    stale_delete = await client.delete(
        f"{cart.url}/items/{variant}", headers={**cart.headers, "If-Match": etag}
    )
    assert stale_delete.status_code == 412

    current = first.headers["etag"]
    listed = await add(client, cart, variant, 1, **{"If-Match": f'"v99", {current}'})
    assert listed.status_code == 200
    anything = await add(client, cart, variant, 1, **{"If-Match": "*"})
    assert anything.status_code == 200
    assert line_of(await view(client, cart), variant)["quantity"] == 3
    # A stale If-Match on someone else's cart is still a 404: the version says nothing.
    stranger = CartHandle(cart.id, {})
    assert (await add(client, stranger, variant, 1, **{"If-Match": etag})).status_code == 404


async def test_a_closed_cart_takes_no_changes(
    client: httpx2.AsyncClient, market: Market, runtime: Runtime
) -> None:
    variant = await market.variant()
    cart = await anonymous_cart(client)
    async with runtime.db.transaction() as session:
        stored = (await session.scalars(select(Cart).where(Cart.id == cart.id))).one()
        stored.status = "expired"
    refused = await add(client, cart, variant)
    assert refused.status_code == 409 and problem_type(refused) == "cart-closed"
    assert refused.json()["cart_status"] == "expired"
    assert (await view(client, cart))["status"] == "expired"


async def test_a_cart_read_is_not_answered_304_once_prices_or_stock_changed(
    client: httpx2.AsyncClient, market: Market
) -> None:
    """The cart shows today's prices and availability: its read's tag covers them, so a
    client revalidating its copy gets the new view, while writes still go by version."""
    shop = await market.open_shop()
    listed = await shop.list_product(1000, stock=10)
    cart = await anonymous_cart(client)
    assert (await add(client, cart, listed.variant_id, 2)).status_code == 200
    first = await client.get(cart.url, headers=cart.headers)
    tag = first.headers["etag"]
    same = await client.get(cart.url, headers={**cart.headers, "If-None-Match": tag})
    assert same.status_code == 304

    await shop.set_price(listed.variant_id, 1200)
    repriced = await client.get(cart.url, headers={**cart.headers, "If-None-Match": tag})
    assert repriced.status_code == 200
    assert line_of(repriced.json(), listed.variant_id)["price_changed"] is True
    assert repriced.headers["etag"] != tag

    await shop.set_stock(listed.variant_id, 1)
    short = await client.get(
        cart.url, headers={**cart.headers, "If-None-Match": repriced.headers["etag"]}
    )
    assert short.status_code == 200
    # The read's tag still guards a write: its version is the cart's.
    changed = await client.patch(
        f"{cart.url}/items/{listed.variant_id}",
        json={"quantity": 1},
        headers={**cart.headers, "If-Match": short.headers["etag"]},
    )
    assert changed.status_code == 200, changed.text


async def test_a_version_no_cart_can_have_is_a_412_not_a_500(
    client: httpx2.AsyncClient, market: Market
) -> None:
    variant = await market.variant()
    cart = await anonymous_cart(client)
    # A read's tag names its version before a dot: the write goes by the version.
    first = await add(client, cart, variant, 1, **{"If-Match": '"v1.anything"'})
    assert first.status_code == 200, first.text
    for tag in ('"v2147483648"', '"v3000000000"', '"v99999999999999999999"'):
        headers = {**cart.headers, "If-Match": tag}
        for response in (
            await client.post(
                f"{cart.url}/items",
                json={"variant_id": str(variant), "quantity": 1},
                headers=headers,
            ),
            await client.patch(
                f"{cart.url}/items/{variant}", json={"quantity": 2}, headers=headers
            ),
            await client.delete(f"{cart.url}/items/{variant}", headers=headers),
        ):
            assert response.status_code == 412, (tag, response.text)
    assert line_of(await view(client, cart), variant)["quantity"] == 1
