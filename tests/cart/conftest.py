"""Fixtures for the cart tests: users, stores with something to sell, and carts."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest

from tests.cart.catalog_support import Market, market  # noqa: F401
from tests.identity.conftest import MakeUser, SignedInUser, make_user  # noqa: F401

CARTS = "/api/v1/carts"


def problem_type(response: httpx2.Response) -> str:
    if response.headers.get("content-type", "").startswith("application/problem+json"):
        return str(response.json().get("type", "")).removeprefix("/problems/")
    return ""


@dataclass(frozen=True)
class CartHandle:
    """A cart and how to address it: a token for an anonymous cart, an access token for
    a user's."""

    id: uuid.UUID
    headers: dict[str, str]

    @property
    def url(self) -> str:
        return f"{CARTS}/{self.id}"


async def anonymous_cart(client: httpx2.AsyncClient, **body: Any) -> CartHandle:
    response = await client.post(CARTS, json=body or None)
    assert response.status_code == 201, response.text
    data = response.json()
    assert data["token"].startswith("ct_")
    return CartHandle(uuid.UUID(data["cart"]["id"]), {"X-Cart-Token": data["token"]})


async def user_cart(client: httpx2.AsyncClient, user: SignedInUser) -> CartHandle:
    response = await client.post(CARTS, headers=user.headers)
    assert response.status_code in (200, 201), response.text
    assert response.json()["token"] is None
    return CartHandle(uuid.UUID(response.json()["cart"]["id"]), user.headers)


async def add(
    client: httpx2.AsyncClient,
    cart: CartHandle,
    variant_id: uuid.UUID,
    quantity: int = 1,
    **headers: str,
) -> httpx2.Response:
    return await client.post(
        f"{cart.url}/items",
        json={"variant_id": str(variant_id), "quantity": quantity},
        headers={**cart.headers, **headers},
    )


async def view(client: httpx2.AsyncClient, cart: CartHandle) -> dict[str, Any]:
    response = await client.get(cart.url, headers=cart.headers)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


def line_of(cart: dict[str, Any], variant_id: uuid.UUID) -> dict[str, Any]:
    [line] = [line for line in cart["lines"] if line["variant_id"] == str(variant_id)]
    return line


def quantities(cart: dict[str, Any]) -> dict[str, int]:
    return {line["variant_id"]: line["quantity"] for line in cart["lines"]}


@pytest.fixture
async def customer(make_user: MakeUser) -> SignedInUser:  # noqa: F811
    return await make_user()
