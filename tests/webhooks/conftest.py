"""Fixtures for the webhooks tests: settings with the address guard on (a test relaxes
it with ``@pytest.mark.parametrize("allow_private_addresses", [True])``), a receiver,
stores, administrators and endpoints registered over HTTP."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import select

from soko.platform.clock import ManualClock, SystemClock
from soko.platform.config import Settings
from soko.platform.outbox import publish
from soko.platform.runtime import Runtime
from soko.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from tests.cart.catalog_support import Market, Shop, market  # noqa: F401
from tests.conftest import make_settings
from tests.identity.conftest import MakeUser, SignedInUser, make_user  # noqa: F401
from tests.orders.conftest import make_buyer, ok, place_order, problem_type  # noqa: F401
from tests.webhooks.receiver import Receiver, running_receiver

ENDPOINTS = "/api/v1/webhooks/endpoints"


@pytest.fixture
def allow_private_addresses() -> bool:
    return False


@pytest.fixture
def settings(tmp_path: Path, database_url: str, allow_private_addresses: bool) -> Settings:
    return make_settings(
        tmp_path,
        database_url=database_url,
        webhooks_allow_private_addresses=allow_private_addresses,
        webhooks_timeout_seconds=5,
    )


@pytest.fixture
def clock() -> ManualClock:
    # Receivers check webhook-timestamp against their own clock (five minutes either
    # way in the standardwebhooks libraries): start the test's clock at the real time.
    return ManualClock(SystemClock().now())


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as started:
        yield started


def secret_free(response: httpx2.Response) -> dict[str, Any]:
    data = ok(response)
    assert "whsec_" not in response.text
    return data


@dataclass
class Hooks:
    """Registers and reads endpoints through the API as one caller."""

    client: httpx2.AsyncClient
    headers: dict[str, str]

    async def create(self, url: str, *event_types: str, **extra: Any) -> dict[str, Any]:
        response = await self.client.post(
            ENDPOINTS,
            json={"url": url, "event_types": list(event_types) or ["order.placed"], **extra},
            headers=self.headers,
        )
        return ok(response, 201)

    async def get(self, path: str = "", **params: Any) -> httpx2.Response:
        return await self.client.get(f"{ENDPOINTS}{path}", params=params, headers=self.headers)

    async def post(self, path: str, body: Any = None) -> httpx2.Response:
        return await self.client.post(f"{ENDPOINTS}{path}", json=body, headers=self.headers)

    async def patch(self, path: str, body: Any) -> httpx2.Response:
        return await self.client.patch(f"{ENDPOINTS}{path}", json=body, headers=self.headers)

    async def delete(self, path: str) -> httpx2.Response:
        return await self.client.delete(f"{ENDPOINTS}{path}", headers=self.headers)


@pytest.fixture
def shop_hooks(
    client: httpx2.AsyncClient,
    market: Market,  # noqa: F811
) -> Callable[[], Awaitable[tuple[Shop, Hooks]]]:
    async def factory() -> tuple[Shop, Hooks]:
        shop = await market.open_shop()
        return shop, Hooks(client, shop.headers)

    return factory


@pytest.fixture
async def admin_hooks(client: httpx2.AsyncClient, market: Market) -> Hooks:  # noqa: F811
    admin: SignedInUser = await market.admin()
    return Hooks(client, admin.headers)


async def publish_event(runtime: Runtime, name: str, payload: dict[str, Any]) -> uuid.UUID:
    async with runtime.db.transaction() as session:
        return await publish(session, name, payload)


def order_payload(seller_id: uuid.UUID, **extra: Any) -> dict[str, Any]:
    return {
        "order_id": str(uuid.uuid4()),
        "group_id": str(uuid.uuid4()),
        "number": "SK-TEST-1",
        "buyer_id": str(uuid.uuid4()),
        "seller_id": str(seller_id),
        "from_status": "paid",
        "to_status": "processing",
        "actor_id": None,
        "actor_kind": "seller",
        "at": "2030-01-01T00:00:00+00:00",
        "currency": "KES",
        **extra,
    }


async def deliveries(runtime: Runtime, endpoint_id: str | uuid.UUID) -> list[WebhookDelivery]:
    async with runtime.db.transaction(read_only=True) as session:
        rows = await session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.endpoint_id == uuid.UUID(str(endpoint_id)))
            .order_by(WebhookDelivery.queue_key)
        )
        return list(rows.all())


async def attempts(runtime: Runtime, endpoint_id: str | uuid.UUID) -> list[WebhookAttempt]:
    async with runtime.db.transaction(read_only=True) as session:
        rows = await session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.endpoint_id == uuid.UUID(str(endpoint_id)))
            .order_by(WebhookAttempt.at, WebhookAttempt.attempt, WebhookAttempt.id)
        )
        return list(rows.all())


async def endpoint_row(runtime: Runtime, endpoint_id: str | uuid.UUID) -> WebhookEndpoint:
    async with runtime.db.transaction(read_only=True) as session:
        row = await session.get(WebhookEndpoint, uuid.UUID(str(endpoint_id)))
        assert row is not None
        return row


async def run_jobs(runtime: Runtime) -> int:
    """Everything due now, including follow-ups due now."""
    return await runtime.dispatcher.run_until_idle()
