"""Endpoints over HTTP: registration, secrets shown once and encrypted at rest, updates,
rotation, and who may see or touch what (another owner's endpoint answers 404)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Awaitable, Callable

import httpx2
import pytest

from soko.platform.config import Environment
from soko.platform.crypto import DecryptionError
from soko.platform.runtime import Runtime
from soko.webhooks.errors import WebhookUrlRefused
from soko.webhooks.event_types import EVENT_TYPES
from soko.webhooks.service import MAX_ENDPOINTS_PER_OWNER, SECRET_COLUMN, checked_url, http_allowed
from tests.cart.catalog_support import Market, Shop
from tests.identity.conftest import MakeUser
from tests.orders.conftest import ok, problem_type
from tests.webhooks.conftest import ENDPOINTS, Hooks, endpoint_row, secret_free

ShopHooks = Callable[[], Awaitable[tuple[Shop, Hooks]]]
URL = "https://hooks.example.com/soko"


async def test_registering_shows_the_secret_once(shop_hooks: ShopHooks, runtime: Runtime) -> None:
    shop, hooks = await shop_hooks()
    created = await hooks.create(URL, "order.placed", "order.paid", description="ERP")
    secret = created["secret"]
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) >= 24
    assert created["seller_id"] == str(shop.seller_id)
    assert created["event_types"] == ["order.paid", "order.placed"]
    assert (created["enabled"], created["url"], created["description"]) == (True, URL, "ERP")

    listed = secret_free(await hooks.get())
    assert [item["id"] for item in listed["items"]] == [created["id"]]
    one = secret_free(await hooks.get(f"/{created['id']}"))
    assert "secret" not in one

    # At rest: a ciphertext bound to its row and column, not the secret.
    row = await endpoint_row(runtime, created["id"])
    assert secret not in row.secret_ciphertext
    keyring = runtime.data_keys.keyring
    assert keyring.decrypt(row.secret_ciphertext, context=f"{SECRET_COLUMN}:{row.id}") == secret
    with pytest.raises(DecryptionError):
        keyring.decrypt(row.secret_ciphertext, context=f"{SECRET_COLUMN}:{uuid.uuid4()}")


async def test_the_event_types_are_listed(admin_hooks: Hooks) -> None:
    response = await admin_hooks.client.get(
        "/api/v1/webhooks/event-types", headers=admin_hooks.headers
    )
    assert ok(response)["event_types"] == list(EVENT_TYPES)
    assert "order.paid" in EVENT_TYPES


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "https://10.1.2.3/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
        "https://localhost/hook",
        "https://user:pass@hooks.example.com/",
        "ftp://hooks.example.com/",
    ],
)
async def test_unsafe_urls_are_refused_at_registration(shop_hooks: ShopHooks, url: str) -> None:
    _, hooks = await shop_hooks()
    response = await hooks.client.post(
        ENDPOINTS, json={"url": url, "event_types": ["order.paid"]}, headers=hooks.headers
    )
    assert (response.status_code, problem_type(response)) == (422, "webhook-url-refused")
    assert ok(await hooks.get())["items"] == []


async def test_event_types_are_checked(shop_hooks: ShopHooks) -> None:
    _, hooks = await shop_hooks()
    for types in (["order.exploded"], []):
        response = await hooks.client.post(
            ENDPOINTS, json={"url": URL, "event_types": types}, headers=hooks.headers
        )
        assert response.status_code == 422, response.text


def test_https_is_required_in_production(settings: object) -> None:
    from soko.platform.config import Settings

    assert isinstance(settings, Settings)
    production = settings.model_copy(update={"env": Environment.production})
    assert http_allowed(settings) and not http_allowed(production)
    with pytest.raises(WebhookUrlRefused):
        checked_url(production, "http://hooks.example.com/soko")
    assert checked_url(production, URL) == URL
    relaxed = production.model_copy(update={"webhooks_allow_http": True})
    with pytest.raises(WebhookUrlRefused):
        checked_url(relaxed, "http://hooks.example.com/soko")


async def test_update_disable_enable_and_delete(shop_hooks: ShopHooks) -> None:
    _, hooks = await shop_hooks()
    created = await hooks.create(URL, "order.placed")
    path = f"/{created['id']}"
    changed = secret_free(
        await hooks.patch(
            path, {"url": "https://other.example.com/in", "event_types": ["order.shipped"]}
        )
    )
    assert (changed["url"], changed["event_types"]) == (
        "https://other.example.com/in",
        ["order.shipped"],
    )
    disabled = ok(await hooks.patch(path, {"enabled": False}))
    assert (disabled["enabled"], disabled["disabled_reason"]) == (False, "disabled by its owner")
    enabled = ok(await hooks.patch(path, {"enabled": True}))
    assert (enabled["enabled"], enabled["disabled_reason"]) == (True, None)
    refused = await hooks.patch(path, {"url": "https://192.168.0.10/"})
    assert problem_type(refused) == "webhook-url-refused"
    assert ok(await hooks.get(path))["url"] == "https://other.example.com/in"
    assert (await hooks.delete(path)).status_code == 204
    assert (await hooks.get(path)).status_code == 404


async def test_rotation_shows_a_new_secret_and_keeps_the_old_for_the_overlap(
    shop_hooks: ShopHooks, runtime: Runtime
) -> None:
    _, hooks = await shop_hooks()
    created = await hooks.create(URL, "order.placed")
    rotated_response = await hooks.post(f"/{created['id']}/rotate-secret")
    rotated = ok(rotated_response)
    assert rotated_response.headers["cache-control"] == "no-store"
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != created["secret"]
    assert rotated["previous_secret_until"] is not None
    assert created["secret"] not in (await hooks.get(f"/{created['id']}")).text


async def test_a_store_cannot_see_or_touch_another_stores_endpoints(
    shop_hooks: ShopHooks, admin_hooks: Hooks
) -> None:
    _, mine = await shop_hooks()
    _, theirs = await shop_hooks()
    endpoint = await mine.create(URL, "order.placed")
    marketplace = await admin_hooks.create(URL, "order.placed", "order.paid")
    fake_delivery = uuid.uuid4()
    for other, target in ((theirs, endpoint), (admin_hooks, endpoint), (mine, marketplace)):
        path = f"/{target['id']}"
        calls = [
            await other.get(path),
            await other.patch(path, {"enabled": False}),
            await other.post(f"{path}/rotate-secret"),
            await other.get(f"{path}/deliveries"),
            await other.get(f"{path}/attempts"),
            await other.post(f"{path}/deliveries/{fake_delivery}/redeliver"),
            await other.post(f"{path}/redeliver-failed", {"since": "2030-01-01T00:00:00Z"}),
            await other.delete(path),
        ]
        assert [(r.status_code, problem_type(r)) for r in calls] == [(404, "not-found")] * 8
    assert [item["id"] for item in ok(await theirs.get())["items"]] == []
    assert [item["id"] for item in ok(await admin_hooks.get())["items"]] == [marketplace["id"]]
    assert ok(await mine.get(f"/{endpoint['id']}"))["enabled"] is True


async def test_callers_who_are_not_owners_or_managers_are_refused(
    client: httpx2.AsyncClient, make_user: MakeUser, market: Market
) -> None:
    customer = await make_user()
    response = await client.get(ENDPOINTS, headers=customer.headers)
    assert (response.status_code, problem_type(response)) == (403, "not-a-seller")
    anonymous = await client.get(ENDPOINTS)
    assert anonymous.status_code == 401
    shop = await market.open_shop()
    other = await make_user()
    header = {**other.headers, "X-Seller-Id": str(shop.seller_id)}
    assert problem_type(await client.get(ENDPOINTS, headers=header)) == "not-a-seller"


async def test_an_admin_acting_for_a_store_manages_the_stores_endpoints(
    client: httpx2.AsyncClient, market: Market
) -> None:
    admin = await market.admin()
    shop = await market.open_shop(owner=admin)
    as_store = Hooks(client, {**admin.headers, "X-Seller-Id": str(shop.seller_id)})
    created = await as_store.create(URL, "order.paid")
    assert created["seller_id"] == str(shop.seller_id)
    as_marketplace = Hooks(client, admin.headers)
    assert ok(await as_marketplace.get())["items"] == []


async def test_endpoints_per_owner_are_limited(shop_hooks: ShopHooks) -> None:
    _, hooks = await shop_hooks()
    for number in range(MAX_ENDPOINTS_PER_OWNER):
        await hooks.create(f"https://hooks.example.com/{number}", "order.paid")
    response = await hooks.client.post(
        ENDPOINTS, json={"url": URL, "event_types": ["order.paid"]}, headers=hooks.headers
    )
    assert (response.status_code, problem_type(response)) == (409, "webhook-endpoint-limit")
    first = ok(await hooks.get(limit=5))
    assert len(first["items"]) == 5 and first["next_cursor"]
