"""Something to buy, made the way sellers make it: over HTTP.

A :class:`Market` opens approved stores (``POST /api/v1/sellers``, then an admin's
approve), each with a warehouse; a :class:`Shop` lists published products with variants
and stock, and changes prices and stock later. Carts and orders tests share it: import
the ``market`` fixture into a conftest (``from tests.cart.catalog_support import market
# noqa: F401``) next to ``make_user``.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx2
import pytest

from soko.identity.models import Role
from tests.identity.conftest import MakeUser, SignedInUser

API = "/api/v1"
_numbers = itertools.count(1)


def _ok(response: httpx2.Response, *statuses: int) -> dict[str, Any]:
    assert response.status_code in (statuses or (200, 201)), (
        f"{response.request.method} {response.request.url.path}: "
        f"{response.status_code} {response.text}"
    )
    data: dict[str, Any] = response.json() if response.content else {}
    return data


@dataclass(frozen=True)
class Listing:
    """A published product and its variants, in the order they were given."""

    product_id: uuid.UUID
    variant_ids: tuple[uuid.UUID, ...]

    @property
    def variant_id(self) -> uuid.UUID:
        return self.variant_ids[0]


@dataclass
class Shop:
    """An approved store with one warehouse, acted for by its owner."""

    client: httpx2.AsyncClient
    owner: SignedInUser
    seller_id: uuid.UUID
    location_id: uuid.UUID

    @property
    def headers(self) -> dict[str, str]:
        return {**self.owner.headers, "X-Seller-Id": str(self.seller_id)}

    async def list_product(
        self,
        *prices: int,
        stock: int | tuple[int, ...] = 10,
        currency: str = "KES",
        title: str | None = None,
        publish: bool = True,
    ) -> Listing:
        """A product with one variant per price (1,000 minor units when none given),
        each with ``stock`` units on hand (one number for all, or one per variant)."""
        prices = prices or (1000,)
        stocks = stock if isinstance(stock, tuple) else (stock,) * len(prices)
        number = next(_numbers)
        product = _ok(
            await self.client.post(
                f"{API}/seller/products",
                json={
                    "title": title or f"Kikoi wrap {number}",
                    "description": "Hand-woven cotton",
                    "currency": currency,
                },
                headers=self.headers,
            )
        )
        product_id = uuid.UUID(product["id"])
        variant_ids: list[uuid.UUID] = []
        for position, price in enumerate(prices):
            variant = _ok(
                await self.client.post(
                    f"{API}/seller/products/{product_id}/variants",
                    json={
                        "sku": f"KW-{number}-{position}-{uuid.uuid4().hex[:6]}",
                        "options": {"size": f"S{position}"},
                        "price": {"amount": price, "currency": currency},
                    },
                    headers=self.headers,
                )
            )
            variant_ids.append(uuid.UUID(variant["id"]))
        for variant_id, on_hand in zip(variant_ids, stocks, strict=True):
            await self.set_stock(variant_id, on_hand)
        if publish:
            _ok(
                await self.client.post(
                    f"{API}/seller/products/{product_id}/publish", headers=self.headers
                )
            )
        return Listing(product_id=product_id, variant_ids=tuple(variant_ids))

    async def set_stock(self, variant_id: uuid.UUID, on_hand: int) -> None:
        _ok(
            await self.client.put(
                f"{API}/seller/stock/{variant_id}/{self.location_id}",
                json={"on_hand": on_hand, "reason": "stock count"},
                headers=self.headers,
            )
        )

    async def set_price(
        self, variant_id: uuid.UUID, price_minor: int, currency: str = "KES"
    ) -> None:
        _ok(
            await self.client.patch(
                f"{API}/seller/variants/{variant_id}",
                json={"price": {"amount": price_minor, "currency": currency}},
                headers=self.headers,
            )
        )

    async def archive_product(self, product_id: uuid.UUID) -> None:
        _ok(
            await self.client.post(
                f"{API}/seller/products/{product_id}/archive", headers=self.headers
            )
        )

    async def archive_variant(self, variant_id: uuid.UUID) -> None:
        _ok(
            await self.client.post(
                f"{API}/seller/variants/{variant_id}/archive", headers=self.headers
            )
        )


@dataclass
class Market:
    """Opens stores through the API, reviewed by one administrator."""

    client: httpx2.AsyncClient
    make_user: MakeUser
    _admin: SignedInUser | None = field(default=None, repr=False)

    async def admin(self) -> SignedInUser:
        if self._admin is None:
            self._admin = await self.make_user(Role.admin)
        return self._admin

    async def open_shop(self, owner: SignedInUser | None = None) -> Shop:
        owner = owner or await self.make_user()
        number = next(_numbers)
        store = _ok(
            await self.client.post(
                f"{API}/sellers",
                json={
                    "slug": f"duka-{number}-{uuid.uuid4().hex[:6]}",
                    "store_name": f"Duka {number}",
                },
                headers=owner.headers,
            ),
            201,
        )
        seller_id = uuid.UUID(store["id"])
        _ok(
            await self.client.post(
                f"{API}/admin/sellers/{seller_id}/approve",
                json={"reason": "documents checked"},
                headers=(await self.admin()).headers,
            )
        )
        acting = {**owner.headers, "X-Seller-Id": str(seller_id)}
        location = _ok(
            await self.client.post(
                f"{API}/seller/locations",
                json={"name": "Main warehouse", "kind": "warehouse", "address": "Nairobi"},
                headers=acting,
            ),
            201,
        )
        return Shop(self.client, owner, seller_id, uuid.UUID(location["id"]))

    async def variant(self, price: int = 1000, *, stock: int = 10) -> uuid.UUID:
        """One purchasable variant of a new store's new product."""
        shop = await self.open_shop()
        return (await shop.list_product(price, stock=stock)).variant_id


@pytest.fixture
def market(client: httpx2.AsyncClient, make_user: MakeUser) -> Market:
    return Market(client, make_user)
