"""On PostgreSQL, what a listing page reads does not grow with the products it passes
over: ``in_stock`` reads the stocked products' indexes, ``q`` the trigram index."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import pytest
from sqlalchemy import text

from soko.catalog.storefront import ProductSort, _page_statement, _Shape
from soko.platform.runtime import Runtime
from tests.catalog.support import Catalog

pytestmark = [
    pytest.mark.postgresql,
    pytest.mark.parametrize("backend", ["postgresql"], indirect=True),
    pytest.mark.usefixtures("settings"),
]


def _largest_row_count(plan: dict[str, Any]) -> int:
    """The most rows any node of an ``EXPLAIN (ANALYZE, FORMAT JSON)`` plan read: those
    it produced and those its filter or an index recheck threw away."""
    read = plan["Actual Rows"] + sum(
        plan.get(removed, 0)
        for removed in ("Rows Removed by Filter", "Rows Removed by Index Recheck")
    )
    rows = int(read * plan["Actual Loops"])
    return max([rows, *(_largest_row_count(child) for child in plan.get("Plans", []))])


async def _catalog_of_copies(runtime: Runtime, catalog: Catalog, copies: int) -> None:
    """One store's product and ``copies`` published copies of it, none stocked."""
    store = await catalog.store()
    template = await store.product(description="Hand-woven cotton from Lamu")
    async with runtime.db.transaction() as session:
        await session.execute(
            text(
                "INSERT INTO catalog_products (id, seller_id, title, description, category_id,"
                " attributes, images, status, currency, min_price_minor, search_text,"
                " published_at, created_at, updated_at, version, stocked)"
                " SELECT gen_random_uuid(), seller_id, title || n, description, category_id,"
                " attributes, images, status, currency, min_price_minor + n,"
                " search_text || n, published_at, created_at, updated_at, 1, false"
                " FROM catalog_products, generate_series(1, :copies) AS n WHERE id = :id"
            ),
            {"id": template["id"], "copies": copies},
        )
        await session.execute(text("ANALYZE catalog_products"))


async def _plan(runtime: Runtime, shape: _Shape, parameters: dict[str, Any]) -> dict[str, Any]:
    async with runtime.db.engine.connect() as connection:
        compiled = _page_statement(shape, 21).compile(dialect=connection.dialect)
        values = compiled.construct_params(parameters)
        assert compiled.positiontup is not None
        explained = await connection.exec_driver_sql(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + compiled.string,
            tuple(values[name] for name in compiled.positiontup),
        )
        [[document]] = explained.all()
    plan: dict[str, Any] = (document if isinstance(document, list) else json.loads(document))[0][
        "Plan"
    ]
    return plan


@pytest.mark.parametrize("sort", list(ProductSort))
async def test_an_in_stock_page_reads_no_product_without_units(
    runtime: Runtime, client: httpx2.AsyncClient, catalog: Catalog, sort: ProductSort
) -> None:
    """With none of 3,000 products stocked, a page of the ``in_stock`` listing used to
    test each product's stock in turn (seconds on a large catalog)."""
    await _catalog_of_copies(runtime, catalog, 3000)
    shape = _Shape(sort, None, None, False, False, False, True, False, False)
    plan = await _plan(runtime, shape, {"now": runtime.clock.now()})
    assert plan["Actual Rows"] == 0
    assert _largest_row_count(plan) <= 25, plan
    assert await catalog.listed_ids(in_stock="true", sort=sort.value) == []


async def test_words_nobody_used_read_no_product(
    runtime: Runtime, client: httpx2.AsyncClient, catalog: Catalog
) -> None:
    """``q`` is a LIKE '%words%': without the trigram index, words no product contains
    read the text of every product. (More products here: a small table costs
    PostgreSQL less to read whole than through any index.)"""
    await _catalog_of_copies(runtime, catalog, 20_000)
    shape = _Shape(ProductSort.newest, None, None, False, False, False, False, True, False)
    plan = await _plan(runtime, shape, {"q": "%zanzibar spice%"})
    assert plan["Actual Rows"] == 0
    assert _largest_row_count(plan) <= 25, plan
    assert await catalog.listed_ids(q="zanzibar spice") == []
    assert len(await catalog.listed_ids(q="lamu", limit=50)) == 50
