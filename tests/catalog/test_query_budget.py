"""The listing's query budget: a 50-product page with several variants each costs two SQL
statements whatever the filters and order (the issue allows three), and a cached page
costs none."""

from __future__ import annotations

import httpx2
import pytest

from soko.catalog.public import CATALOG_TAG
from soko.platform.runtime import Runtime
from tests.catalog.support import PRODUCTS, Catalog, count_statements

PAGE = 50
VARIANTS = 4


@pytest.fixture
async def big_catalog(catalog: Catalog) -> dict[str, str]:
    """Two stores, a two-level category tree, 55 published products of four variants,
    every other product with stock; answers the filters to try."""
    root = await catalog.category("Market")
    leaf = await catalog.category("Stalls", parent=root)
    stores = [await catalog.store(), await catalog.store()]
    for index in range(PAGE + 5):
        store = stores[index % 2]
        product = await store.product(
            *(1000 + index * 10 + step for step in range(VARIANTS)),
            title=f"Kikapu {index:03}",
            category_id=leaf["id"],
        )
        if index % 2 == 0:
            await store.set_stock(product["variants"][index % VARIANTS]["id"], 3)
    return {"category": root["slug"], "seller": str(stores[0].seller_id)}


FILTERS = [
    {},
    {"sort": "price"},
    {"sort": "-price"},
    {"sort": "title"},
    {"category": "CATEGORY"},
    {"min_price": 1000, "max_price": 900_000, "currency": "KES"},
    {"q": "kikapu"},
    {"in_stock": "true"},
    {"seller": "SELLER", "in_stock": "true", "category": "CATEGORY", "q": "kikapu"},
]


async def test_a_fifty_product_page_costs_two_statements_whatever_the_filters(
    runtime: Runtime, client: httpx2.AsyncClient, big_catalog: dict[str, str]
) -> None:
    for raw in FILTERS:
        params = {
            key: big_catalog[value.lower()] if value in ("CATEGORY", "SELLER") else value
            for key, value in raw.items()
        }
        params["limit"] = PAGE
        await runtime.cache.invalidate_tags(CATALOG_TAG)  # a cold cache for this page
        with count_statements(runtime) as statements:
            answer = await client.get(PRODUCTS, params=params)
        assert answer.status_code == 200, answer.text
        items = answer.json()["items"]
        expected = PAGE // 2 if "seller" in params or "in_stock" in params else PAGE
        assert len(items) >= min(expected, 25), params
        assert all(len(item["variants"]) == VARIANTS for item in items)
        assert statements.count == 2, (params, statements.sent)

        with count_statements(runtime) as statements:
            again = await client.get(PRODUCTS, params=params)
        assert again.content == answer.content
        assert statements.count == 0, (params, statements.sent)


async def test_the_next_page_costs_the_same(
    runtime: Runtime, client: httpx2.AsyncClient, big_catalog: dict[str, str]
) -> None:
    first = (await client.get(PRODUCTS, params={"limit": PAGE})).json()
    assert len(first["items"]) == PAGE and first["next_cursor"]
    with count_statements(runtime) as statements:
        second = await client.get(PRODUCTS, params={"limit": PAGE, "cursor": first["next_cursor"]})
    assert len(second.json()["items"]) == 5
    assert statements.count == 2, statements.sent


async def test_the_page_statement_carries_its_limit_and_statuses_in_its_sql(
    runtime: Runtime, client: httpx2.AsyncClient, big_catalog: dict[str, str]
) -> None:
    """Sent as parameters, they made PostgreSQL plan the statement again on every page."""
    with count_statements(runtime) as statements:
        answer = await client.get(PRODUCTS, params={"limit": 7})
    assert answer.status_code == 200
    page = statements.sent[0]
    assert "LIMIT 8" in page, page
    assert "'published'" in page and "'active'" in page, page
