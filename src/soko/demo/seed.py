"""Seeding the demo marketplace through the HTTP API, in process.

Everything but the administrator goes through the same routes a client would use
(register, apply for a store, approve it, add products and stock, publish), over an
``httpx2.ASGITransport`` into an app built on the caller's runtime: the demo data obeys
every rule of the API and proves the routes work together. The administrator is made
with ``identity.public.create_account``, since nobody can sign up as one.

The app is passed in as a factory (``soko.cli`` hands over ``soko.app.create_app``):
a domain package does not import the entry points.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx2

from soko.demo.catalogue import (
    ADMIN_EMAIL,
    ADMIN_NAME,
    BUYER_EMAIL,
    BUYER_NAME,
    CATEGORIES,
    STORES,
    DemoCategory,
    DemoProduct,
    DemoStore,
    category_count,
    product_count,
)
from soko.identity.public import create_account
from soko.identity.public import has_accounts as identity_has_accounts
from soko.platform.money import minor_units
from soko.platform.runtime import Runtime

API = "/api/v1"
# The name the in-process client calls the app by; it never leaves the process.
BASE_URL = "http://soko.demo"

AppFactory = Callable[[Runtime], Any]


class SeedFailed(Exception):
    """A call of the seed was refused; the message names the call and the answer."""


@dataclass(frozen=True)
class DemoPasswords:
    """The passwords of the demo accounts: fixed and documented in development, random
    when an operator forces the demo onto a production database."""

    admin: str = "baobab-admin-demo"
    seller: str = "mango-seller-demo"
    buyer: str = "chai-buyer-demo"

    @classmethod
    def random(cls) -> DemoPasswords:
        return cls(*(secrets.token_urlsafe(12) for _ in range(3)))


@dataclass(frozen=True)
class DemoLogin:
    """An account of the demo and how to sign in with it."""

    who: str
    email: str
    password: str


class Progress(Protocol):
    def __call__(self, done: str) -> None:
        """One step of the seed is done; ``done`` says which."""


def step_count() -> int:
    """How many times :func:`seed_demo` reports progress."""
    return 1 + category_count() + len(STORES) + product_count() + 1


async def has_accounts(runtime: Runtime) -> bool:
    """Whether anyone has an account yet: the demo goes only into a new marketplace."""
    async with runtime.db.transaction(read_only=True) as session:
        return await identity_has_accounts(session)


class _Api:
    """The seed's client: each call must answer one of the statuses it expects."""

    def __init__(self, client: httpx2.AsyncClient) -> None:
        self.client = client

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        body: dict[str, Any] | None = None,
        expect: Iterable[int] = (200, 201),
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await self.client.request(method, API + path, json=body, headers=headers)
        if response.status_code not in set(expect):
            raise SeedFailed(f"{method} {API}{path} answered {_describe(response)}")
        answer: dict[str, Any] = response.json()
        return answer

    async def sign_up(self, email: str, password: str, name: str) -> str:
        tokens = await self.call(
            "POST",
            "/auth/register",
            body={"email": email, "password": password, "display_name": name},
        )
        return _access_token(tokens, email)

    async def sign_in(self, email: str, password: str) -> str:
        tokens = await self.call(
            "POST", "/auth/login", body={"identifier": email, "password": password}
        )
        return _access_token(tokens, email)


def _describe(response: httpx2.Response) -> str:
    text = f"{response.status_code}"
    if response.headers.get("content-type", "").startswith("application/problem+json"):
        problem = response.json()
        text += f" {problem.get('type', '')}: {problem.get('detail', '')}"
        for error in problem.get("errors", ()):
            text += f"; {error.get('field')}: {error.get('detail')}"
    return text


def _access_token(answer: dict[str, Any], email: str) -> str:
    token = answer.get("access_token")
    if not isinstance(token, str):
        # An MFA challenge: the operator requires a second factor, which a script cannot
        # give. The demo is for new marketplaces, where nobody has set that up yet.
        raise SeedFailed(f"signing in {email} asked for a second factor")
    return token


async def seed_demo(
    runtime: Runtime,
    app_factory: AppFactory,
    *,
    passwords: DemoPasswords | None = None,
    progress: Progress | None = None,
) -> list[DemoLogin]:
    """Seed the demo marketplace into ``runtime``'s database, which must hold no
    account yet (the caller checks with :func:`has_accounts`). Returns the demo
    accounts. Raises :class:`SeedFailed` when a call is refused; what was created
    before stays."""
    passwords = passwords or DemoPasswords()
    report = progress or (lambda done: None)
    currency = runtime.settings.default_currency
    app = app_factory(runtime)
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        api = _Api(client)

        async with runtime.db.transaction() as session:
            await create_account(
                session,
                runtime,
                email=ADMIN_EMAIL,
                password=passwords.admin,
                display_name=ADMIN_NAME,
                roles=("admin",),
            )
        admin = await api.sign_in(ADMIN_EMAIL, passwords.admin)
        report(f"administrator {ADMIN_EMAIL}")

        categories: dict[str, uuid.UUID] = {}
        await _add_categories(api, admin, CATEGORIES, None, categories, report)

        for store in STORES:
            owner = await _open_store(api, admin, store, passwords.seller)
            report(f"store {store.store_name} approved")
            location = await api.call(
                "POST",
                "/seller/locations",
                token=owner,
                body=dict(zip(("name", "kind", "address"), store.location, strict=True)),
            )
            for product in store.products:
                await _list_product(api, owner, product, categories, location["id"], currency)
                report(f"{store.store_name}: {product.title}")

        await api.sign_up(BUYER_EMAIL, passwords.buyer, BUYER_NAME)
        report(f"buyer {BUYER_EMAIL}")

    return [
        DemoLogin("administrator", ADMIN_EMAIL, passwords.admin),
        *(
            DemoLogin(f"seller ({store.store_name})", store.owner_email, passwords.seller)
            for store in STORES
        ),
        DemoLogin("buyer", BUYER_EMAIL, passwords.buyer),
    ]


async def _add_categories(
    api: _Api,
    admin: str,
    categories: tuple[DemoCategory, ...],
    parent: uuid.UUID | None,
    ids: dict[str, uuid.UUID],
    report: Progress,
) -> None:
    for position, category in enumerate(categories):
        created = await api.call(
            "POST",
            "/admin/categories",
            token=admin,
            body={
                "name": category.name,
                "slug": category.slug,
                "parent_id": str(parent) if parent else None,
                "position": position,
            },
        )
        ids[category.slug] = uuid.UUID(created["id"])
        report(f"category {category.name}")
        await _add_categories(api, admin, category.children, ids[category.slug], ids, report)


async def _open_store(api: _Api, admin: str, store: DemoStore, password: str) -> str:
    """The owner signs up and applies; the administrator approves. The owner's token."""
    owner = await api.sign_up(store.owner_email, password, store.owner_name)
    applied = await api.call(
        "POST",
        "/sellers",
        token=owner,
        body={
            "slug": store.slug,
            "store_name": store.store_name,
            "description": store.description,
            "contact_email": store.owner_email,
            "contact_phone": store.contact_phone,
        },
    )
    await api.call(
        "POST",
        f"/admin/sellers/{applied['id']}/approve",
        token=admin,
        body={"reason": "Demo store"},
    )
    return owner


async def _list_product(
    api: _Api,
    owner: str,
    product: DemoProduct,
    categories: dict[str, uuid.UUID],
    location_id: str,
    currency: str,
) -> None:
    """Create the product with its variants, stock each variant, then publish."""
    scale = 10 ** minor_units(currency)

    def money(whole_units: int) -> dict[str, Any]:
        return {"amount": whole_units * scale, "currency": currency}

    created = await api.call(
        "POST",
        "/seller/products",
        token=owner,
        body={
            "title": product.title,
            "description": product.description,
            "category_id": str(categories[product.category]),
            "attributes": [
                {"key": key, "type": kind, "value": value}
                for key, kind, value in product.attributes
            ],
            # Placeholder photos, one per product, from a free image service.
            "images": [f"https://picsum.photos/seed/soko-{product.variants[0].sku.lower()}/800"],
            "currency": currency,
            "variants": [
                {
                    "sku": variant.sku,
                    "options": dict(variant.options),
                    "price": money(variant.price),
                    "compare_at_price": money(variant.compare_at) if variant.compare_at else None,
                    "weight_grams": variant.weight_grams,
                    "position": position,
                }
                for position, variant in enumerate(product.variants)
            ],
        },
    )
    variant_ids = {variant["sku"]: variant["id"] for variant in created["variants"]}
    for variant in product.variants:
        await api.call(
            "PUT",
            f"/seller/stock/{variant_ids[variant.sku]}/{location_id}",
            token=owner,
            body={"on_hand": variant.stock, "reason": "opening stock"},
        )
    await api.call("POST", f"/seller/products/{created['id']}/publish", token=owner)
