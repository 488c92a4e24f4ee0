"""A webhook URL naming a loopback or private address in a legacy numeric spelling
(``2130706433``, ``127.1``, ``0x7f000001``, ``0177.0.0.1``, ``0``) is refused when the
endpoint is registered, as ``127.0.0.1`` is; nothing is stored."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from tests.cart.catalog_support import Shop
from tests.orders.conftest import ok, problem_type
from tests.webhooks.conftest import ENDPOINTS, Hooks

ShopHooks = Callable[[], Awaitable[tuple[Shop, Hooks]]]


@pytest.mark.parametrize(
    "url",
    [
        "https://2130706433/",
        "https://127.1/",
        "https://0x7f000001:9999/",
        "https://0177.0.0.1/",
        "https://0/",
        "https://[::ffff:127.0.0.1]/",
    ],
)
async def test_numeric_loopback_urls_are_refused_at_registration(
    shop_hooks: ShopHooks, url: str
) -> None:
    _, hooks = await shop_hooks()
    response = await hooks.client.post(
        ENDPOINTS, json={"url": url, "event_types": ["order.paid"]}, headers=hooks.headers
    )
    assert (response.status_code, problem_type(response)) == (422, "webhook-url-refused")
    assert "address" in response.json()["detail"]  # refused for where it points
    assert ok(await hooks.get())["items"] == []
