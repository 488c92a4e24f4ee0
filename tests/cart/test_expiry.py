"""Abandoned carts expire through the scheduled job, timed by the manual clock."""

from __future__ import annotations

import datetime as dt

import httpx2
import pytest

from soko.cart import handlers as cart_handlers
from soko.cart import service as cart_service
from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from tests.cart.catalog_support import Market
from tests.cart.conftest import CartHandle, add, anonymous_cart, problem_type, user_cart, view
from tests.identity.conftest import SignedInUser


async def _signed_in_again(client: httpx2.AsyncClient, user: SignedInUser) -> dict[str, str]:
    """Fresh credentials for ``user`` once hours have passed (access tokens are short)."""
    response = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": user.tokens.refresh_token}
    )
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def test_carts_untouched_past_the_expiry_time_expire(
    client: httpx2.AsyncClient,
    market: Market,
    runtime: Runtime,
    clock: ManualClock,
    customer: SignedInUser,
) -> None:
    variant = await market.variant()
    hours = runtime.settings.cart_expiry_hours
    left = await anonymous_cart(client)
    await add(client, left, variant)
    kept = await anonymous_cart(client)
    await add(client, kept, variant)
    own = await user_cart(client, customer)

    clock.advance(dt.timedelta(hours=hours - 1))
    await add(client, kept, variant)  # touched: its time starts again
    await runtime.dispatcher.run_until_idle()
    assert (await view(client, left))["status"] == "open"

    clock.advance(dt.timedelta(hours=1, minutes=16))
    await runtime.dispatcher.run_until_idle()
    expired = await view(client, left)
    assert expired["status"] == "expired"
    assert expired["version"] == 3  # created, one add, expired
    assert (await view(client, kept))["status"] == "open"
    refused = await add(client, left, variant)
    assert refused.status_code == 409 and problem_type(refused) == "cart-closed"

    # The user's untouched cart expired too; they start afresh with a new one.
    headers = await _signed_in_again(client, customer)
    assert (await view(client, CartHandle(own.id, headers)))["status"] == "expired"
    fresh = await client.post("/api/v1/carts", headers=headers)
    assert fresh.status_code == 201 and fresh.json()["cart"]["id"] != str(own.id)


async def test_expiry_goes_in_batches_oldest_first_until_none_is_left(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run closes a bounded batch (one short write lock), and a full batch asks for
    another run at once: every abandoned cart is closed in the same scheduled time."""
    monkeypatch.setattr(cart_handlers, "EXPIRY_BATCH", 2)
    monkeypatch.setattr(cart_service, "EXPIRY_BATCH", 2)
    carts = []
    for _ in range(5):
        carts.append(await anonymous_cart(client))
        clock.advance(dt.timedelta(minutes=1))

    clock.advance(dt.timedelta(hours=runtime.settings.cart_expiry_hours, minutes=-3))
    async with runtime.transaction() as session:  # one run, by hand: the oldest two
        closed = await cart_service.expire_abandoned_carts(
            session,
            now=clock.now(),
            older_than=dt.timedelta(hours=runtime.settings.cart_expiry_hours),
        )
    assert closed == 2
    assert [(await view(client, cart))["status"] for cart in carts] == ["expired"] * 2 + [
        "open"
    ] * 3

    clock.advance(dt.timedelta(minutes=15))
    fresh = await anonymous_cart(client)
    await runtime.dispatcher.run_until_idle()
    assert [(await view(client, cart))["status"] for cart in carts] == ["expired"] * 5
    assert (await view(client, fresh))["status"] == "open"
