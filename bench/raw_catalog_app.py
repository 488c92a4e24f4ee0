"""The baseline of the catalog benchmark: the public product page's SQL issued with asyncpg
behind a bare Starlette route, nothing else (no middleware, no ORM, no cache, no
validation beyond the limit).

It answers ``GET /api/v1/products?limit=20`` with the statements the catalog issues for
its first page in the default order (newest first), each in autocommit as the catalog
reads them on PostgreSQL: the page of products of active sellers (its limit written into
the SQL, as the catalog writes it), then their active variants, each with its
availability; and the same JSON items, its JSON columns read
and the page serialized by the same functions (``soko.platform.jsonbody.loads`` and
``dumps``, orjson), so the ratio of the two servers' throughput is what the ORM, FastAPI
and Soko's middleware cost. The catalog benchmark
serves it as `soko serve` serves Soko: uvicorn, the same number of processes, a
listening socket each (``soko.platform.serving``). By hand:

    BENCH_RAW_DSN=postgresql://postgres@127.0.0.1:5432/soko_bench_catalog \\
        uvicorn bench.raw_catalog_app:app --workers 2

``BENCH_RAW_POOL`` sets each process's pool size (default 20, Soko's
``SOKO_DATABASE_POOL_SIZE`` default).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from soko.platform import jsonbody

CURSOR_KEY = hashlib.sha256(b"bench raw catalog cursor").digest()

# The page: published products of active sellers, newest first, one more than the page
# to know whether there is a next one.
PAGE_SQL = """
SELECT p.id, p.seller_id, p.title, p.description, p.category_id, p.attributes, p.images,
       p.currency, p.min_price_minor, p.published_at
FROM catalog_products AS p
WHERE p.status = 'published'
  AND p.seller_id IN (SELECT s.id FROM sellers AS s WHERE s.status = 'active')
ORDER BY p.published_at DESC, p.id DESC
LIMIT {limit:d}
"""

# The active variants of the page's products, each with what is available: on hand -
# reserved - allocated at active locations, with the units of holds past their expiry
# (not yet released by the job) given back; NULL for a variant without stock.
_PAGE_VARIANT_IDS = """
    SELECT id FROM catalog_variants WHERE product_id = ANY($1::uuid[]) AND status = 'active'
"""
OFFERS_SQL = f"""
SELECT v.id, v.product_id, v.sku, v.options, v.price_minor, v.currency,
       v.compare_at_minor, v.weight_grams, availability.available
FROM catalog_variants AS v
LEFT JOIN (
    SELECT l.variant_id,
           SUM(l.on_hand - l.reserved - l.allocated + COALESCE(expired.quantity, 0))
               AS available
    FROM inventory_stock_levels AS l
    JOIN inventory_locations AS loc ON loc.id = l.location_id AND loc.active IS true
    LEFT JOIN (
        SELECT r.variant_id, r.location_id, SUM(r.quantity) AS quantity
        FROM inventory_reservations AS r
        WHERE r.status = 'held' AND r.expires_at <= $2
          AND r.variant_id IN ({_PAGE_VARIANT_IDS})
        GROUP BY r.variant_id, r.location_id
    ) AS expired ON expired.variant_id = l.variant_id AND expired.location_id = l.location_id
    WHERE l.variant_id IN ({_PAGE_VARIANT_IDS})
    GROUP BY l.variant_id
) AS availability ON availability.variant_id = v.id
WHERE v.product_id = ANY($1::uuid[]) AND v.status = 'active'
ORDER BY v.product_id, v.position, v.created_at, v.id
"""


def _cursor(published_at: dt.datetime, product_id: Any) -> str:
    payload = json.dumps([published_at.isoformat(), str(product_id)]).encode()
    mac = hmac.new(CURSOR_KEY, payload, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode()


def _money(amount: int | None, currency: str) -> dict[str, Any] | None:
    return None if amount is None else {"amount": amount, "currency": currency}


async def products(request: Request) -> Response:
    try:
        limit = int(request.query_params.get("limit", "20"))
    except ValueError:
        return JSONResponse({"detail": "limit must be a number"}, status_code=422)
    limit = max(1, min(limit, 100))
    pool: asyncpg.Pool = request.app.state.pool
    async with pool.acquire() as conn:
        rows = await conn.fetch(PAGE_SQL.format(limit=limit + 1))
        page = rows[:limit]
        variants = await conn.fetch(
            OFFERS_SQL, [row["id"] for row in page], dt.datetime.now(dt.UTC)
        )
    by_product: dict[Any, list[dict[str, Any]]] = {row["id"]: [] for row in page}
    for row in variants:
        count = max(0, int(row["available"] or 0))
        by_product[row["product_id"]].append(
            {
                "id": row["id"],
                "sku": row["sku"],
                "options": jsonbody.loads(row["options"]),
                "price": {"amount": row["price_minor"], "currency": row["currency"]},
                "compare_at_price": _money(row["compare_at_minor"], row["currency"]),
                "weight_grams": row["weight_grams"],
                "available": count,
                "in_stock": count > 0,
            }
        )
    items = []
    for row in page:
        offered = by_product[row["id"]]
        items.append(
            {
                "id": row["id"],
                "title": row["title"],
                "description": row["description"],
                "category_id": row["category_id"],
                "seller_id": row["seller_id"],
                "attributes": jsonbody.loads(row["attributes"]),
                "images": jsonbody.loads(row["images"]),
                "currency": row["currency"],
                "min_price": {"amount": row["min_price_minor"], "currency": row["currency"]},
                "in_stock": any(variant["in_stock"] for variant in offered),
                "published_at": row["published_at"],
                "variants": offered,
            }
        )
    next_cursor = _cursor(page[-1]["published_at"], page[-1]["id"]) if len(rows) > limit else None
    # The same serializer as Soko's listing, so the baseline is not slower for want of it.
    return Response(
        jsonbody.dumps({"items": items, "next_cursor": next_cursor}),
        media_type="application/json",
    )


async def health(_request: Request) -> Response:
    return JSONResponse({"status": "ok"})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    size = int(os.environ.get("BENCH_RAW_POOL", "20"))
    app.state.pool = await asyncpg.create_pool(
        os.environ["BENCH_RAW_DSN"], min_size=size, max_size=size
    )
    try:
        yield
    finally:
        await app.state.pool.close()


app = Starlette(
    routes=[Route("/api/v1/products", products), Route("/health", health)], lifespan=lifespan
)
