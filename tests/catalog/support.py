"""Stores, categories and products for the catalog tests, made the way their owners make
them: over HTTP (stores applied for and approved by an admin, stock set through
inventory's seller routes)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx2

from soko.identity.models import Role
from soko.platform.runtime import Runtime
from tests.conftest import sql_statements
from tests.identity.conftest import MakeUser, SignedInUser
from tests.sellers.conftest import join_store

API = "/api/v1"
PRODUCTS = f"{API}/products"
CATEGORIES = f"{API}/categories"
ADMIN_CATEGORIES = f"{API}/admin/categories"
SELLER_PRODUCTS = f"{API}/seller/products"
SELLER_VARIANTS = f"{API}/seller/variants"

_numbers = itertools.count(1)


def ok(response: httpx2.Response, *statuses: int) -> Any:
    assert response.status_code in (statuses or (200, 201)), (
        f"{response.request.method} {response.request.url.path}: "
        f"{response.status_code} {response.text}"
    )
    return response.json() if response.content else None


def problem_type(response: httpx2.Response) -> str:
    if response.headers.get("content-type", "").startswith("application/problem+json"):
        return str(response.json().get("type", "")).removeprefix("/problems/")
    return ""


def money(amount: int, currency: str = "KES") -> dict[str, Any]:
    return {"amount": amount, "currency": currency}


def variant_body(
    price: int = 1000, *, sku: str | None = None, currency: str = "KES", **fields: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "sku": sku or f"SKU-{next(_numbers)}-{uuid.uuid4().hex[:6]}",
        "options": {"size": "M"},
        "price": money(price, currency),
    }
    body.update(fields)
    return body


@dataclass
class Store:
    """An approved store, acted for by its owner (or another member)."""

    client: httpx2.AsyncClient
    owner: SignedInUser
    seller_id: uuid.UUID
    slug: str
    _location_id: uuid.UUID | None = None

    @property
    def headers(self) -> dict[str, str]:
        return self.as_member(self.owner)

    def as_member(self, user: SignedInUser) -> dict[str, str]:
        return {**user.headers, "X-Seller-Id": str(self.seller_id)}

    async def product(
        self,
        *prices: int,
        title: str | None = None,
        description: str = "Hand-woven cotton",
        category_id: Any = None,
        publish: bool = True,
        currency: str = "KES",
        **fields: Any,
    ) -> dict[str, Any]:
        """A product with one variant per price (one at 1,000 when none given),
        published unless told otherwise; answers the seller's view of it."""
        body: dict[str, Any] = {
            "title": title or f"Kikoi {next(_numbers)}",
            "description": description,
            "currency": currency,
            "variants": [
                variant_body(price, currency=currency, position=index)
                for index, price in enumerate(prices or (1000,))
            ],
        }
        if category_id is not None:
            body["category_id"] = str(category_id)
        body.update(fields)
        product: dict[str, Any] = ok(
            await self.client.post(SELLER_PRODUCTS, json=body, headers=self.headers), 201
        )
        if publish:
            product = ok(
                await self.client.post(
                    f"{SELLER_PRODUCTS}/{product['id']}/publish", headers=self.headers
                )
            )
        return product

    async def location_id(self) -> uuid.UUID:
        if self._location_id is None:
            location = ok(
                await self.client.post(
                    f"{API}/seller/locations",
                    json={"name": "Main warehouse", "kind": "warehouse", "address": "Nairobi"},
                    headers=self.headers,
                ),
                201,
            )
            self._location_id = uuid.UUID(location["id"])
        return self._location_id

    async def set_stock(self, variant_id: Any, on_hand: int) -> None:
        await self._stock_write("PUT", variant_id, "", {"on_hand": on_hand})

    async def adjust_stock(self, variant_id: Any, delta: int) -> None:
        await self._stock_write("POST", variant_id, "/adjustments", {"delta": delta})

    async def _stock_write(
        self, method: str, variant_id: Any, suffix: str, body: dict[str, Any]
    ) -> None:
        location = await self.location_id()
        ok(
            await self.client.request(
                method,
                f"{API}/seller/stock/{variant_id}/{location}{suffix}",
                json={**body, "reason": "stock count"},
                headers=self.headers,
            )
        )

    async def add_member(self, role: str, make_user: MakeUser) -> SignedInUser:
        member = await make_user()
        await join_store(self.client, self.headers, member, role)
        return member


@dataclass
class Catalog:
    """Opens stores and curates categories through the API."""

    client: httpx2.AsyncClient
    make_user: MakeUser
    _admin: SignedInUser | None = field(default=None, repr=False)

    async def admin(self) -> SignedInUser:
        if self._admin is None:
            self._admin = await self.make_user(Role.admin)
        return self._admin

    async def store(self, *, approve: bool = True) -> Store:
        owner = await self.make_user()
        number = next(_numbers)
        slug = f"duka-{number}-{uuid.uuid4().hex[:6]}"
        created = ok(
            await self.client.post(
                f"{API}/sellers",
                json={"slug": slug, "store_name": f"Duka {number}"},
                headers=owner.headers,
            ),
            201,
        )
        seller_id = uuid.UUID(created["id"])
        if approve:
            await self.decide(seller_id, "approve")
        return Store(self.client, owner, seller_id, slug)

    async def decide(self, seller_id: uuid.UUID, action: str) -> None:
        ok(
            await self.client.post(
                f"{API}/admin/sellers/{seller_id}/{action}",
                json={"reason": f"{action} in a test"},
                headers=(await self.admin()).headers,
            )
        )

    async def category(
        self, name: str, *, parent: dict[str, Any] | None = None, position: int = 0
    ) -> dict[str, Any]:
        slug = f"{name.lower().replace(' ', '-')}-{next(_numbers)}"
        body: dict[str, Any] = {"name": name, "slug": slug, "position": position}
        if parent is not None:
            body["parent_id"] = parent["id"]
        created: dict[str, Any] = ok(
            await self.client.post(
                ADMIN_CATEGORIES, json=body, headers=(await self.admin()).headers
            ),
            201,
        )
        return created

    async def listing(self, **params: Any) -> dict[str, Any]:
        result: dict[str, Any] = ok(await self.client.get(PRODUCTS, params=params))
        return result

    async def listed_ids(self, **params: Any) -> list[str]:
        return [item["id"] for item in (await self.listing(**params))["items"]]


@dataclass
class Statements:
    """The SQL statements one block sent, transaction control left out."""

    sent: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.sent)


# BEGIN/COMMIT are not queries: SQLite's BEGIN DEFERRED goes through the cursor while
# asyncpg's does not, and neither reads anything.
_TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")


@contextmanager
def count_statements(runtime: Runtime) -> Iterator[Statements]:
    with sql_statements(runtime, leaving_out=_TRANSACTION_CONTROL) as sent:
        yield Statements(sent)
