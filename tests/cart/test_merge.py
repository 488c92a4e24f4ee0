"""An anonymous cart follows the buyer when they sign up or sign in: adopted when they
have no cart, merged (quantities summed, capped at what is available) when they do."""

from __future__ import annotations

import asyncio
import uuid

import httpx2
import pytest

from soko.cart import service as cart_service
from soko.identity.models import Role
from soko.identity.passwords import password_hasher
from soko.platform.otp import decode_secret, totp
from soko.platform.runtime import Runtime
from tests.cart.catalog_support import Market
from tests.cart.conftest import (
    CARTS,
    CartHandle,
    add,
    anonymous_cart,
    problem_type,
    quantities,
    user_cart,
    view,
)
from tests.identity import mfa_support
from tests.identity.conftest import MakeUser, SignedInUser
from tests.identity.mfa_support import code_now, enable_mfa, make_holder, require_mfa_for

PASSWORD = "marula-trees-at-dusk-17"
AUTH = "/api/v1/auth"


async def _shopper(make_user: MakeUser, runtime: Runtime) -> SignedInUser:
    """A user who can sign in with :data:`PASSWORD`."""
    return await make_user(password_hash=await password_hasher(runtime).hash(PASSWORD))


async def _login(
    client: httpx2.AsyncClient, user: SignedInUser, cart: CartHandle | None
) -> CartHandle:
    """Sign in with a password (and the anonymous cart's token); the user's cart."""
    response = await client.post(
        f"{AUTH}/login",
        json={"identifier": user.email, "password": PASSWORD},
        headers=cart.headers if cart is not None else {},
    )
    assert response.status_code == 200, response.text
    headers = {"Authorization": f"Bearer {response.json()['access_token']}"}
    mine = await client.post(CARTS, headers=headers)
    assert mine.status_code == 200, mine.text  # the merge left an open cart
    return CartHandle(uuid.UUID(mine.json()["cart"]["id"]), headers)


async def test_sign_up_adopts_the_anonymous_cart(
    client: httpx2.AsyncClient, market: Market
) -> None:
    variant = await market.variant(stock=5)
    cart = await anonymous_cart(client)
    await add(client, cart, variant, 2)

    response = await client.post(
        f"{AUTH}/register",
        json={
            "email": f"amani-{uuid.uuid4().hex[:8]}@example.com",
            "password": PASSWORD,
            "display_name": "Amani",
        },
        headers=cart.headers,
    )
    assert response.status_code == 201, response.text
    headers = {"Authorization": f"Bearer {response.json()['access_token']}"}
    mine = await client.post(CARTS, headers=headers)
    assert mine.status_code == 200
    assert mine.json()["cart"]["id"] == str(cart.id)  # the same cart, now the account's
    assert mine.json()["cart"]["signed_in"] is True
    assert quantities(mine.json()["cart"]) == {str(variant): 2}
    # The token no longer opens it: the cart answers to its owner now.
    assert (await client.get(cart.url, headers=cart.headers)).status_code == 404


async def test_sign_in_merges_summing_and_capping_at_stock(
    client: httpx2.AsyncClient, market: Market, make_user: MakeUser, runtime: Runtime
) -> None:
    shop = await market.open_shop()
    listing = await shop.list_product(1000, 1100, 1200, 1300, 1400, stock=(5, 10, 2, 0, 3))
    summed, new, capped, sold_out, already_over = listing.variant_ids
    user = await _shopper(make_user, runtime)
    own = await user_cart(client, user)
    await add(client, own, summed, 2)
    await add(client, own, capped, 1)
    await add(client, own, already_over, 5)  # more than the 3 in stock: left as it is
    anonymous = await anonymous_cart(client)
    await add(client, anonymous, summed, 2)
    await add(client, anonymous, new, 3)
    await add(client, anonymous, capped, 3)
    await add(client, anonymous, sold_out, 1)
    await add(client, anonymous, already_over, 1)

    mine = await _login(client, user, anonymous)
    assert mine.id == own.id
    assert quantities(await view(client, mine)) == {
        str(summed): 4,
        str(new): 3,
        str(capped): 2,
        str(already_over): 5,
    }
    # The anonymous cart is closed, pointing at the cart that took its lines.
    closed = await view(client, anonymous)
    assert closed["status"] == "merged" and closed["merged_into"] == str(own.id)
    refused = await add(client, anonymous, new)
    assert refused.status_code == 409 and problem_type(refused) == "cart-closed"
    assert refused.json()["merged_into"] == str(own.id)


async def test_merge_happens_once(
    client: httpx2.AsyncClient, market: Market, make_user: MakeUser, runtime: Runtime
) -> None:
    variant = await market.variant(stock=50)
    user = await _shopper(make_user, runtime)
    own = await user_cart(client, user)
    await add(client, own, variant, 1)
    anonymous = await anonymous_cart(client)
    await add(client, anonymous, variant, 4)

    mine = await _login(client, user, anonymous)
    after_first = await view(client, mine)
    assert quantities(after_first) == {str(variant): 5}
    again = await _login(client, user, anonymous)
    after_second = await view(client, again)
    assert quantities(after_second) == {str(variant): 5}
    assert after_second["version"] == after_first["version"]

    # The explicit merge agrees, and changes nothing either.
    merged = await client.post(
        f"{anonymous.url}/merge", headers={**user.headers, **anonymous.headers}
    )
    assert merged.status_code == 200, merged.text
    assert merged.json()["cart"]["id"] == str(own.id)
    assert quantities(merged.json()["cart"]) == {str(variant): 5}
    assert merged.json()["cart"]["version"] == after_first["version"]


async def test_explicit_merge(
    client: httpx2.AsyncClient, market: Market, make_user: MakeUser
) -> None:
    shop = await market.open_shop()
    listing = await shop.list_product(900, 800, stock=(4, 0))
    in_stock, sold_out = listing.variant_ids
    user = await make_user()
    own = await user_cart(client, user)
    await add(client, own, in_stock, 3)
    anonymous = await anonymous_cart(client)
    await add(client, anonymous, in_stock, 3)
    await add(client, anonymous, sold_out, 2)

    url = f"{anonymous.url}/merge"
    assert (await client.post(url, headers=anonymous.headers)).status_code == 401
    assert (await client.post(url, headers=user.headers)).status_code == 404
    other = await anonymous_cart(client)
    mismatched = await client.post(url, headers={**user.headers, **other.headers})
    assert mismatched.status_code == 404

    merged = await client.post(url, headers={**user.headers, **anonymous.headers})
    assert merged.status_code == 200, merged.text
    body = merged.json()
    assert body["adopted"] is False
    assert body["cart"]["id"] == str(own.id)
    assert quantities(body["cart"]) == {str(in_stock): 4}
    assert sorted(
        (item["variant_id"], item["requested"], item["quantity"], item["reason"])
        for item in body["adjustments"]
    ) == sorted(
        [
            (str(in_stock), 6, 4, "out_of_stock"),
            (str(sold_out), 2, 0, "out_of_stock"),
        ]
    )
    assert merged.headers["etag"].startswith(f'"v{body["cart"]["version"]}.')

    # Someone else holding the token cannot take the cart over now.
    stranger = await make_user()
    taken = await client.post(url, headers={**stranger.headers, **anonymous.headers})
    assert taken.status_code == 404


async def test_a_merge_stops_adding_lines_when_the_cart_is_full(
    client: httpx2.AsyncClient,
    market: Market,
    make_user: MakeUser,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shop = await market.open_shop()
    listing = await shop.list_product(*range(700, 705), stock=10)
    # Added in id order, so the oldest lines are the same whether the clock ticked or not.
    kept, summed, first_new, second_new, third_new = sorted(listing.variant_ids)
    user = await make_user()
    own = await user_cart(client, user)
    await add(client, own, kept, 1)
    await add(client, own, summed, 1)
    anonymous = await anonymous_cart(client)
    for variant in (summed, first_new, second_new, third_new):
        await add(client, anonymous, variant, 2)

    monkeypatch.setattr(cart_service, "MAX_CART_LINES", 3)
    url = f"{anonymous.url}/merge"
    merged = await client.post(url, headers={**user.headers, **anonymous.headers})
    assert merged.status_code == 200, merged.text
    body = merged.json()
    # More of a line already there always fits; of the new lines, only the oldest did.
    assert quantities(body["cart"]) == {str(kept): 1, str(summed): 3, str(first_new): 2}
    assert sorted(
        (item["variant_id"], item["requested"], item["quantity"], item["reason"])
        for item in body["adjustments"]
    ) == sorted([(str(second_new), 2, 0, "cart_full"), (str(third_new), 2, 0, "cart_full")])
    # The full cart still takes more of what it holds, and refuses a new item.
    assert (await add(client, own, first_new, 1)).status_code == 200
    full = await add(client, own, second_new, 1)
    assert full.status_code == 409 and problem_type(full) == "cart-full"


async def test_explicit_merge_without_a_cart_of_ones_own_adopts(
    client: httpx2.AsyncClient, market: Market, make_user: MakeUser
) -> None:
    variant = await market.variant()
    user = await make_user()
    anonymous = await anonymous_cart(client)
    await add(client, anonymous, variant, 2)
    url = f"{anonymous.url}/merge"
    merged = await client.post(url, headers={**user.headers, **anonymous.headers})
    assert merged.status_code == 200, merged.text
    assert merged.json()["adopted"] is True
    assert merged.json()["cart"]["id"] == str(anonymous.id)
    repeat = await client.post(url, headers={**user.headers, **anonymous.headers})
    assert repeat.status_code == 200 and repeat.json()["cart"]["id"] == str(anonymous.id)
    assert (await user_cart(client, user)).id == anonymous.id


async def test_sign_in_with_a_useless_token_still_signs_in(
    client: httpx2.AsyncClient, make_user: MakeUser, runtime: Runtime
) -> None:
    user = await _shopper(make_user, runtime)
    for token in ("ct_" + "x" * 43, "nonsense"):
        response = await client.post(
            f"{AUTH}/login",
            json={"identifier": user.email, "password": PASSWORD},
            headers={"X-Cart-Token": token},
        )
        assert response.status_code == 200, response.text


async def test_concurrent_merges_count_the_anonymous_cart_once(
    client: httpx2.AsyncClient, market: Market, make_user: MakeUser
) -> None:
    variant = await market.variant(stock=100)
    user = await make_user()
    own = await user_cart(client, user)
    await add(client, own, variant, 1)
    anonymous = await anonymous_cart(client)
    await add(client, anonymous, variant, 10)

    url = f"{anonymous.url}/merge"
    answers = await asyncio.gather(
        *(client.post(url, headers={**user.headers, **anonymous.headers}) for _ in range(4))
    )
    assert [answer.status_code for answer in answers] == [200] * 4
    assert quantities(await view(client, own)) == {str(variant): 11}


async def test_a_two_factor_sign_in_merges_on_the_request_that_answers_the_challenge(
    client: httpx2.AsyncClient, market: Market, runtime: Runtime
) -> None:
    variant = await market.variant(stock=5)
    holder = await enable_mfa(
        client, runtime, await make_holder(runtime, password=mfa_support.PASSWORD)
    )
    assert holder.email is not None
    anonymous = await anonymous_cart(client)
    await add(client, anonymous, variant, 2)

    challenge = await client.post(
        f"{AUTH}/login",
        json={"identifier": holder.email, "password": mfa_support.PASSWORD},
        headers=anonymous.headers,
    )
    assert challenge.status_code == 200 and challenge.json()["mfa_required"] is True
    # No session yet, so nothing merged: the cart still answers to its token.
    assert (await view(client, anonymous))["status"] == "open"

    answer = await client.post(
        mfa_support.VERIFY,
        json={
            "challenge_token": challenge.json()["challenge_token"],
            "code": code_now(runtime, holder),
        },
        headers=anonymous.headers,
    )
    assert answer.status_code == 200, answer.text
    mine = await client.post(
        CARTS, headers={"Authorization": f"Bearer {answer.json()['access_token']}"}
    )
    assert mine.json()["cart"]["id"] == str(anonymous.id)  # adopted: the account had none
    assert mine.json()["cart"]["signed_in"] is True
    assert quantities(mine.json()["cart"]) == {str(variant): 2}


async def test_enrolling_an_authenticator_at_sign_in_merges_the_anonymous_cart(
    client: httpx2.AsyncClient, market: Market, make_user: MakeUser, runtime: Runtime
) -> None:
    variant = await market.variant(stock=5)
    user = await _shopper(make_user, runtime)
    own = await user_cart(client, user)
    await add(client, own, variant, 1)
    await require_mfa_for(runtime, Role.customer)
    anonymous = await anonymous_cart(client)
    await add(client, anonymous, variant, 3)

    challenge = await client.post(
        f"{AUTH}/login", json={"identifier": user.email, "password": PASSWORD}
    )
    assert challenge.status_code == 200 and challenge.json()["methods"] == ["enroll"]
    token = challenge.json()["challenge_token"]
    secret = await client.post(mfa_support.ENROLL, json={"challenge_token": token})
    assert secret.status_code == 201, secret.text
    answer = await client.post(
        mfa_support.ENROLL_CONFIRM,
        json={
            "challenge_token": token,
            "code": totp(decode_secret(secret.json()["secret"]), runtime.clock.now()),
        },
        headers=anonymous.headers,
    )
    assert answer.status_code == 200, answer.text
    mine = await client.post(
        CARTS, headers={"Authorization": f"Bearer {answer.json()['access_token']}"}
    )
    assert mine.json()["cart"]["id"] == str(own.id)
    assert quantities(mine.json()["cart"]) == {str(variant): 4}
    assert (await view(client, anonymous))["status"] == "merged"
