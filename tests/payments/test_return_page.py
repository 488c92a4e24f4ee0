"""The page a buyer returns to after a provider's page: public, static, and never
claiming more than the provider's confirmed webhook will."""

from __future__ import annotations

import httpx2
import pytest

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


async def test_the_return_page_says_the_payment_is_being_confirmed(
    client: httpx2.AsyncClient,
) -> None:
    answer = await client.get("/payments/return", params={"status": "succeeded", "x": "<b>"})
    assert answer.status_code == 200
    assert "being confirmed" in answer.text
    assert "<b>" not in answer.text
    assert "default-src 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("status", ["failed", "abandoned", "cancelled", "FAILED"])
async def test_a_payment_that_did_not_go_through_says_so(
    client: httpx2.AsyncClient, status: str
) -> None:
    answer = await client.get("/payments/return", params={"status": status})
    assert answer.status_code == 200
    assert "did not go through" in answer.text
