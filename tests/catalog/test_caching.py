"""Public catalog reads are cached, and every write that changes what they show makes them
stale at once: product, variant, stock, store and category changes, in memory and in
Redis. A cached answer costs no SQL at all."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest
from sqlalchemy import update

from soko.app import create_app
from soko.catalog.models import Product
from soko.platform import compression
from soko.platform.cache import RedisCache
from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from tests.catalog.support import (
    ADMIN_CATEGORIES,
    PRODUCTS,
    SELLER_PRODUCTS,
    SELLER_VARIANTS,
    Catalog,
    count_statements,
    money,
    ok,
    variant_body,
)
from tests.conftest import make_settings
from tests.identity.conftest import MakeUser


@pytest.fixture(params=["memory-cache", "redis-cache"])
async def cached_runtime(
    request: pytest.FixtureRequest, runtime: Runtime, tmp_path: Path, database_url: str
) -> AsyncIterator[Runtime]:
    """The test runtime with its cache in memory, then a runtime caching in Redis."""
    if request.param == "memory-cache":
        yield runtime
        return
    redis_url = request.getfixturevalue("redis_url")
    # Keys of this test only (the server is shared with other test runs), removed after.
    namespace = f"sokotest:{uuid.uuid4().hex[:12]}:cache:"
    settings = make_settings(
        tmp_path,
        database_url=database_url,
        redis_url=redis_url,
        cache_backend="redis",
        ratelimit_enabled=False,
    )
    shared = Runtime(settings, clock=runtime.clock)
    shared.cache = RedisCache(shared.redis, namespace=namespace, clock=shared.clock)
    try:
        yield shared
    finally:
        async for key in shared.redis.scan_iter(match=f"{namespace}*", count=500):
            await shared.redis.delete(key)
        await shared.stop()


@pytest.fixture
async def cached_client(cached_runtime: Runtime) -> AsyncIterator[httpx2.AsyncClient]:
    transport = httpx2.ASGITransport(app=create_app(runtime=cached_runtime))
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture
def shop(cached_client: httpx2.AsyncClient, make_user: MakeUser) -> Catalog:
    return Catalog(cached_client, make_user)


async def _cached(runtime: Runtime, client: httpx2.AsyncClient, url: str) -> httpx2.Response:
    """``url`` read twice: the second read must come from the cache, without SQL."""
    first = await client.get(url)
    with count_statements(runtime) as statements:
        second = await client.get(url)
    assert statements.sent == [], f"{url} was not served from the cache"
    assert second.status_code == first.status_code
    if first.status_code == 200:  # a problem carries its own request id
        assert second.content == first.content
    return second


async def test_a_cached_read_costs_no_sql(
    cached_runtime: Runtime, cached_client: httpx2.AsyncClient, shop: Catalog
) -> None:
    store = await shop.store()
    product = await store.product(1000, 2000)
    await shop.category("Crafts")
    for url in (PRODUCTS, f"{PRODUCTS}?sort=price&in_stock=true", f"{PRODUCTS}/{product['id']}"):
        await _cached(cached_runtime, cached_client, url)
    await _cached(cached_runtime, cached_client, "/api/v1/categories")


async def test_a_cached_read_is_compressed_once_for_every_client_that_takes_gzip(
    cached_runtime: Runtime,
    cached_client: httpx2.AsyncClient,
    shop: Catalog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = await shop.store()
    for number in range(3):
        await store.product(1000 + number, title=f"Kikapu {number}")
    compressed: list[int] = []
    original = compression._compress

    def counted(body: bytes, level: int) -> bytes:
        compressed.append(level)
        return original(body, level)

    monkeypatch.setattr(compression, "_compress", counted)
    plain = await cached_client.get(PRODUCTS, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert len(plain.content) >= cached_runtime.settings.gzip_min_bytes
    for _ in range(3):
        with count_statements(cached_runtime) as statements:
            zipped = await cached_client.get(PRODUCTS, headers={"Accept-Encoding": "gzip"})
        assert statements.sent == []
        assert zipped.headers["content-encoding"] == "gzip"
        assert "accept-encoding" in zipped.headers["vary"].lower()
        assert zipped.headers["etag"] == plain.headers["etag"]
        assert zipped.content == plain.content  # decoded by the client
    assert compressed == [cached_runtime.settings.gzip_level]
    unchanged = await cached_client.get(
        PRODUCTS, headers={"Accept-Encoding": "gzip", "If-None-Match": plain.headers["etag"]}
    )
    assert unchanged.status_code == 304


async def test_product_and_variant_changes_are_seen_at_once(
    cached_runtime: Runtime, cached_client: httpx2.AsyncClient, shop: Catalog
) -> None:
    client, store = cached_client, await shop.store()
    product = await store.product(1000, title="Kikapu")
    page = f"{PRODUCTS}/{product['id']}"
    await _cached(cached_runtime, client, PRODUCTS)
    await _cached(cached_runtime, client, page)

    ok(
        await client.patch(
            f"{SELLER_PRODUCTS}/{product['id']}",
            json={"title": "Kikapu kipya"},
            headers=store.headers,
        )
    )
    assert (await client.get(PRODUCTS)).json()["items"][0]["title"] == "Kikapu kipya"
    assert (await client.get(page)).json()["title"] == "Kikapu kipya"

    variant_id = product["variants"][0]["id"]
    ok(
        await client.patch(
            f"{SELLER_VARIANTS}/{variant_id}", json={"price": money(750)}, headers=store.headers
        )
    )
    assert (await client.get(PRODUCTS)).json()["items"][0]["min_price"] == money(750)
    assert (await client.get(page)).json()["variants"][0]["price"] == money(750)

    added = ok(
        await client.post(
            f"{SELLER_PRODUCTS}/{product['id']}/variants",
            json=variant_body(500),
            headers=store.headers,
        )
    )
    assert [v["id"] for v in (await client.get(page)).json()["variants"]] == [
        variant_id,
        added["id"],
    ]
    ok(await client.post(f"{SELLER_VARIANTS}/{added['id']}/archive", headers=store.headers))
    assert len((await client.get(page)).json()["variants"]) == 1

    second = await store.product(300, title="Mkeka")
    assert [i["id"] for i in (await client.get(PRODUCTS)).json()["items"]] == [
        second["id"],
        product["id"],
    ]
    ok(await client.post(f"{SELLER_PRODUCTS}/{product['id']}/archive", headers=store.headers))
    assert [i["id"] for i in (await client.get(PRODUCTS)).json()["items"]] == [second["id"]]
    assert (await client.get(page)).status_code == 404
    ok(await client.post(f"{SELLER_PRODUCTS}/{product['id']}/publish", headers=store.headers))
    assert (await client.get(page)).status_code == 200


async def test_stock_changes_are_seen_at_once(
    cached_runtime: Runtime, cached_client: httpx2.AsyncClient, shop: Catalog
) -> None:
    client, store = cached_client, await shop.store()
    product = await store.product(1000)
    variant_id = product["variants"][0]["id"]
    page = f"{PRODUCTS}/{product['id']}"
    in_stock = f"{PRODUCTS}?in_stock=true"
    assert (await _cached(cached_runtime, client, in_stock)).json()["items"] == []
    assert (await _cached(cached_runtime, client, page)).json()["variants"][0]["available"] == 0

    await store.set_stock(variant_id, 4)
    assert [i["id"] for i in (await client.get(in_stock)).json()["items"]] == [product["id"]]
    assert (await client.get(page)).json()["variants"][0]["available"] == 4
    assert (await client.get(PRODUCTS)).json()["items"][0]["variants"][0]["available"] == 4

    await store.set_stock(variant_id, 0)
    assert (await client.get(in_stock)).json()["items"] == []
    assert (await client.get(page)).json()["in_stock"] is False


async def test_store_suspension_is_seen_at_once(
    cached_runtime: Runtime, cached_client: httpx2.AsyncClient, shop: Catalog
) -> None:
    client, store = cached_client, await shop.store()
    product = await store.product()
    page = f"{PRODUCTS}/{product['id']}"
    await _cached(cached_runtime, client, PRODUCTS)
    await _cached(cached_runtime, client, page)
    await shop.decide(store.seller_id, "suspend")
    assert (await client.get(PRODUCTS)).json()["items"] == []
    assert (await client.get(page)).status_code == 404
    await _cached(cached_runtime, client, page)  # the 404 is cached too...
    await shop.decide(store.seller_id, "reinstate")
    assert (await client.get(page)).status_code == 200  # ...until the store changes


async def test_category_changes_are_seen_at_once(
    cached_runtime: Runtime, cached_client: httpx2.AsyncClient, shop: Catalog
) -> None:
    client = cached_client
    parent, other = await shop.category("Fashion"), await shop.category("Home")
    child = await shop.category("Dresses", parent=parent)
    store = await shop.store()
    product = await store.product(category_id=child["id"])
    by_parent = f"{PRODUCTS}?category={parent['slug']}"
    page = f"{PRODUCTS}/{product['id']}"
    assert len((await _cached(cached_runtime, client, by_parent)).json()["items"]) == 1
    await _cached(cached_runtime, client, page)
    await _cached(cached_runtime, client, "/api/v1/categories")

    admin = (await shop.admin()).headers
    ok(
        await client.patch(
            f"{ADMIN_CATEGORIES}/{child['id']}",
            json={"parent_id": other["id"], "name": "Curtains"},
            headers=admin,
        )
    )
    assert (await client.get(by_parent)).json()["items"] == []
    assert (await client.get(page)).json()["category"]["name"] == "Curtains"
    tree = (await client.get("/api/v1/categories")).json()["items"]
    assert [(n["name"], [c["name"] for c in n["children"]]) for n in tree] == [
        ("Fashion", []),
        ("Home", ["Curtains"]),
    ]


async def test_the_cache_does_serve_until_its_time_runs_out(
    runtime: Runtime, client: httpx2.AsyncClient, catalog: Catalog, clock: ManualClock
) -> None:
    """A change made behind the catalog's back (no invalidation) shows only once the
    entry expires: proof that reads are cached, and that the TTL is a safety net."""
    store = await catalog.store()
    product = await store.product(title="Old title")
    assert (await catalog.listing())["items"][0]["title"] == "Old title"
    async with runtime.db.transaction() as session:
        await session.execute(
            update(Product)
            .where(Product.id == uuid.UUID(product["id"]))
            .values(title="Changed in SQL")
        )
    assert (await catalog.listing())["items"][0]["title"] == "Old title"
    clock.advance(31)
    assert (await catalog.listing())["items"][0]["title"] == "Changed in SQL"
