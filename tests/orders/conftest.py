"""Fixtures for the orders tests: stores with something to sell (over HTTP, through
tests.cart.catalog_support), buyers with carts, and checkouts."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest
from sqlalchemy import func, select

from soko.identity.models import Role, User
from soko.identity.sessions import start_session
from soko.inventory.public import available_for
from soko.platform.outbox import MessageKind, OutboxMessage
from soko.platform.runtime import Runtime
from tests.cart.catalog_support import Market, Shop, market  # noqa: F401
from tests.identity.conftest import TEST_DEVICE, MakeUser, SignedInUser, make_user  # noqa: F401

API = "/api/v1"
CHECKOUT = f"{API}/checkout"
ORDERS = f"{API}/orders"
SELLER_ORDERS = f"{API}/seller/orders"
ADMIN = f"{API}/admin"


def problem_type(response: httpx2.Response) -> str:
    if response.headers.get("content-type", "").startswith("application/problem+json"):
        return str(response.json().get("type", "")).removeprefix("/problems/")
    return ""


def ok(response: httpx2.Response, *statuses: int) -> dict[str, Any]:
    assert response.status_code in (statuses or (200,)), (
        f"{response.request.method} {response.request.url.path}: "
        f"{response.status_code} {response.text}"
    )
    data: dict[str, Any] = response.json() if response.content else {}
    return data


def refused(response: httpx2.Response, status: int, slug: str) -> dict[str, Any]:
    assert (response.status_code, problem_type(response)) == (status, slug), response.text
    data: dict[str, Any] = response.json()
    return data


@dataclass
class Buyer:
    """A signed-in buyer with their open cart."""

    client: httpx2.AsyncClient
    user: SignedInUser
    cart_id: uuid.UUID

    @property
    def headers(self) -> dict[str, str]:
        return self.user.headers

    @property
    def user_id(self) -> uuid.UUID:
        return self.user.user_id

    async def add(self, variant_id: uuid.UUID, quantity: int = 1) -> None:
        ok(
            await self.client.post(
                f"{API}/carts/{self.cart_id}/items",
                json={"variant_id": str(variant_id), "quantity": quantity},
                headers=self.headers,
            ),
            200,
            201,
        )

    async def new_cart(self) -> None:
        response = await self.client.post(f"{API}/carts", headers=self.headers)
        self.cart_id = uuid.UUID(ok(response, 200, 201)["cart"]["id"])

    async def post_checkout(self, key: str | None = "fresh", **body: Any) -> httpx2.Response:
        headers = dict(self.headers)
        if key == "fresh":
            key = uuid.uuid4().hex
        if key is not None:
            headers["Idempotency-Key"] = key
        return await self.client.post(
            CHECKOUT, json={"cart_id": str(self.cart_id), **body}, headers=headers
        )

    async def checkout(self, **body: Any) -> dict[str, Any]:
        return ok(await self.post_checkout(**body), 201)


MakeBuyer = Callable[..., Awaitable[Buyer]]


@pytest.fixture
def make_buyer(client: httpx2.AsyncClient, make_user: MakeUser) -> MakeBuyer:  # noqa: F811
    async def factory(*items: tuple[uuid.UUID, int] | uuid.UUID, verified: bool = True) -> Buyer:
        user = await make_user(email_verified=verified)
        response = await client.post(f"{API}/carts", headers=user.headers)
        buyer = Buyer(client, user, uuid.UUID(ok(response, 200, 201)["cart"]["id"]))
        for item in items:
            variant_id, quantity = item if isinstance(item, tuple) else (item, 1)
            await buyer.add(variant_id, quantity)
        return buyer

    return factory


@dataclass
class Placed:
    """A checkout of one item from one store, as far as a test wants it moved."""

    buyer: Buyer
    shop: Shop
    variant_id: uuid.UUID
    group_id: uuid.UUID
    order_id: uuid.UUID

    async def sign_in_again(self, runtime: Runtime) -> None:
        """New access tokens for the buyer and the store's owner, after the clock moved
        past the old ones' lifetime."""
        self.buyer.user = await sign_in_again(runtime, self.buyer.user)
        self.shop.owner = await sign_in_again(runtime, self.shop.owner)


async def sign_in_again(runtime: Runtime, user: SignedInUser) -> SignedInUser:
    """``user`` with a new session, as if they signed in now."""
    async with runtime.db.transaction() as session:
        account = await session.get(User, user.user_id)
        assert account is not None
        tokens = await start_session(session, runtime, account, method="test", device=TEST_DEVICE)
    return SignedInUser(user.user_id, user.email, tokens)


PlaceOrder = Callable[..., Awaitable[Placed]]


@pytest.fixture
def place_order(
    client: httpx2.AsyncClient,
    runtime: Runtime,
    market: Market,  # noqa: F811
    make_buyer: MakeBuyer,
) -> PlaceOrder:
    """A buyer checks out ``quantity`` of one item of a new store; ``to`` moves the order
    on to that state through the API (and orders.public for the payment)."""

    async def factory(to: str = "pending_payment", *, quantity: int = 2, stock: int = 10) -> Placed:
        shop = await market.open_shop()
        variant_id = (await shop.list_product(1500, stock=stock)).variant_id
        buyer = await make_buyer((variant_id, quantity))
        group = await buyer.checkout()
        placed = Placed(
            buyer, shop, variant_id, uuid.UUID(group["id"]), uuid.UUID(group["orders"][0]["id"])
        )
        await advance(client, runtime, placed, to)
        return placed

    return factory


PATH = ["pending_payment", "paid", "processing", "shipped", "delivered"]


async def pay(runtime: Runtime, group_id: uuid.UUID) -> bool:
    from soko.orders.public import mark_group_paid

    async with runtime.db.transaction() as session:
        return await mark_group_paid(session, runtime, group_id)


async def advance(client: httpx2.AsyncClient, runtime: Runtime, placed: Placed, to: str) -> None:
    steps = PATH[1 : PATH.index(to) + 1] if to in PATH else []
    seller = f"{SELLER_ORDERS}/{placed.order_id}"
    for step in steps:
        if step == "paid":
            assert await pay(runtime, placed.group_id)
        elif step == "processing":
            ok(await client.post(f"{seller}/accept", headers=placed.shop.headers))
        elif step == "shipped":
            ok(
                await client.post(
                    f"{seller}/ship",
                    json={"carrier": "G4S", "tracking_number": "TRK-1"},
                    headers=placed.shop.headers,
                )
            )
        elif step == "delivered":
            ok(
                await client.post(
                    f"{ORDERS}/{placed.order_id}/confirm-delivery", headers=placed.buyer.headers
                )
            )


async def events(runtime: Runtime, name: str) -> list[dict[str, Any]]:
    """The payloads of the events ``name`` published so far (the outbox rows as written,
    not their deliveries)."""
    async with runtime.db.transaction(read_only=True) as session:
        rows = await session.scalars(
            select(OutboxMessage.payload)
            .where(
                OutboxMessage.kind == MessageKind.event.value,
                OutboxMessage.name == name,
                OutboxMessage.handler.is_(None),
            )
            .order_by(OutboxMessage.created_at, OutboxMessage.id)
        )
        return list(rows.all())


async def count(runtime: Runtime, model: Any) -> int:
    async with runtime.db.transaction(read_only=True) as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def available(runtime: Runtime, *variant_ids: uuid.UUID) -> dict[uuid.UUID, int]:
    async with runtime.db.transaction(read_only=True) as session:
        return await available_for(session, runtime, variant_ids)


async def staff(make_user: MakeUser, role: Role = Role.admin) -> SignedInUser:  # noqa: F811
    return await make_user(role)


def ids(items: Iterable[dict[str, Any]]) -> set[str]:
    return {item["id"] for item in items}


async def stock(client: httpx2.AsyncClient, shop: Shop, variant_id: uuid.UUID) -> dict[str, int]:
    """The variant's stock at the shop's warehouse, as its seller sees it."""
    page = ok(
        await client.get(
            f"{API}/seller/stock", params={"variant_id": str(variant_id)}, headers=shop.headers
        )
    )
    [level] = page["items"]
    return {name: level[name] for name in ("on_hand", "reserved", "allocated", "available")}
