"""Catalog read: one 20-product page of ``GET /api/v1/products``, uncached through the ORM,
cached, and the same page's SQL issued with asyncpg behind a bare Starlette app.

Loads a catalog into a database of its own (``soko_bench_catalog``, dropped and created
again), then, against real servers with ``BENCH_WORKERS`` processes each:

a. ``uncached``: ``soko serve`` with the cache switched off (the app's runtime cache is
   replaced by one that always calls through, so every request runs the page's queries
   through the ORM): capacity, closed loop (``BENCH_CONNECTIONS`` clients back to back);
b. ``cached``: plain ``soko serve`` (Redis cache with more than one process): capacity;
c. ``uncached at 70%``: open loop at 70% of (a)'s capacity, latency counted from each
   request's scheduled send time: p50/p99/max; the same for (b) at 70% of its capacity;
d. ``raw``: ``bench/raw_catalog_app.py`` under uvicorn, same processes, same page:
   capacity, and the ratio of (a) to it; then open loop at the rate of (c), so that a
   tail both servers show can be told from one of Soko's own.

Each phase prints the CPU each party used (server, PostgreSQL backends of this database,
Redis, the generator, the machine, and what the rest of the machine used: a test run
beside the benchmark shows up there) and the load average, and the end prints each goal
with PASS or FAIL. Invariants checked: every answer is 200; the page is the expected 20
products (published, of active sellers, newest first, computed from the loaded data), and
is the same from all three servers.

    .venv/bin/python -m bench catalog

Settings: ``BENCH_SECONDS`` (10 a phase), ``BENCH_WORKERS`` (2), ``BENCH_CONNECTIONS``
(16), ``BENCH_PRODUCTS`` (10000, 3 variants each), ``BENCH_DATABASE_URL`` (default
``postgresql+asyncpg://postgres@127.0.0.1:5432/soko_bench_catalog``; a database whose name
starts with ``soko_bench`` is dropped and created), ``BENCH_REDIS_URL``
(``redis://127.0.0.1:6379/13``, emptied), ``BENCH_KEEP_DATABASE=1`` to keep it afterwards.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.loadgen import LoadSpec, percentile

PAGE_SIZE = 20
PAGE_PATH = f"/api/v1/products?limit={PAGE_SIZE}"
DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/soko_bench_catalog"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
GOALS = {"uncached": 1200.0, "cached": 3000.0, "p99_ms": 50.0, "raw_ratio": 0.5}


# -- "cache disabled": the app with a runtime cache that always calls through ---------------


class CallThroughCache:
    """A cache that stores nothing: every read runs its factory. Only for measuring what
    a page costs without the cache; writes and invalidations are no-ops."""

    async def get(self, key: str) -> Any | None:
        return None

    async def set(self, key: str, value: Any, ttl: float, tags: Sequence[str] = ()) -> None:
        return None

    async def delete(self, key: str) -> None:
        return None

    async def invalidate_tags(self, *tags: str) -> None:
        return None

    async def get_or_set(
        self,
        key: str,
        factory: Callable[[], Awaitable[Any]],
        ttl: float,
        tags: Sequence[str] = (),
        *,
        near: bool = False,
    ) -> Any:
        return await factory()

    async def get_or_set_raw(
        self,
        key: str,
        factory: Callable[[], Awaitable[bytes]],
        ttl: float,
        tags: Sequence[str] = (),
        *,
        near: bool = False,
    ) -> bytes:
        return await factory()

    def unchanged_since(self, tags: Sequence[str], since: float) -> bool:
        return False  # it hears of nothing, so it vouches for nothing

    def listen(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


def uncached_app() -> Any:
    """Soko's app from the environment, its runtime's cache switched off once started
    (served by ``soko serve`` through ``soko.cli.APP_FACTORY``)."""
    from soko.app import create_app_from_env

    app = create_app_from_env()
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(application: Any) -> Any:
        async with inner(application) as state:
            application.state.runtime.cache = CallThroughCache()
            yield state

    app.router.lifespan_context = lifespan
    return app


# -- the catalog -------------------------------------------------------------------------------


@dataclass
class Loaded:
    products: int
    variants: int
    sellers: int
    suspended: int
    expected_page: list[str]  # product ids, newest first


async def load_catalog(url: str, products: int, *, seed: int = 7) -> Loaded:
    """Sellers (two of them suspended), a two-level category tree, ``products`` products
    with three variants each, one location per seller and a stock level per variant,
    inserted through the domains' models (the schema from ``Base.metadata``)."""
    from sqlalchemy import insert

    from soko.app import load_models
    from soko.catalog.models import Category, Product, Variant
    from soko.inventory.models import InventoryItem, Location, StockLevel
    from soko.platform.db import Base, create_engine
    from soko.platform.ids import uuid7
    from soko.platform.schema import create_current_schema
    from soko.sellers.models import Seller

    load_models()
    rng = random.Random(seed)
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(create_current_schema)
    now = dt.datetime.now(dt.UTC)
    active_sellers, suspended_sellers = 20, 2
    sellers = []
    for index in range(active_sellers + suspended_sellers):
        suspended = index >= active_sellers
        sellers.append(
            {
                "id": uuid7(),
                "slug": f"bench-store-{index}",
                "store_name": f"Bench Store {index}",
                "description": "A store of the catalog benchmark.",
                "contact_email": f"store-{index}@example.com",
                "status": "suspended" if suspended else "active",
                "created_by": uuid7(),
                "created_at": now,
                "updated_at": now,
                "reviewed_at": now,
            }
        )
    categories = []
    for root in range(5):
        root_id = uuid7()
        categories.append(
            {
                "id": root_id,
                "parent_id": None,
                "slug": f"bench-root-{root}",
                "name": f"Department {root}",
                "path": f"/{root_id}/",
                "position": root,
                "created_at": now,
                "updated_at": now,
            }
        )
        for child in range(4):
            child_id = uuid7()
            categories.append(
                {
                    "id": child_id,
                    "parent_id": root_id,
                    "slug": f"bench-cat-{root}-{child}",
                    "name": f"Aisle {root}.{child}",
                    "path": f"/{root_id}/{child_id}/",
                    "position": child,
                    "created_at": now,
                    "updated_at": now,
                }
            )
    leaves = [c for c in categories if c["parent_id"] is not None]
    locations = {
        seller["id"]: {
            "id": uuid7(),
            "seller_id": seller["id"],
            "name": "Main warehouse",
            "kind": "warehouse",
            "address": "Industrial Area, Nairobi",
            "created_at": now,
            "updated_at": now,
        }
        for seller in sellers
    }
    product_rows, variant_rows, item_rows, stock_rows = [], [], [], []
    published: list[tuple[dt.datetime, uuid.UUID, uuid.UUID]] = []
    adjectives = ["Sturdy", "Light", "Classic", "Handmade", "Organic", "Woven", "Smart"]
    nouns = ["basket", "kettle", "lamp", "backpack", "sandal", "kikoi", "mug", "radio"]
    for index in range(products):
        seller = sellers[index % len(sellers)]
        product_id = uuid7()
        status = "draft" if index % 20 == 7 else "published"
        published_at = now - dt.timedelta(seconds=(products - index) * 37)
        title = f"{rng.choice(adjectives)} {rng.choice(nouns)} {index}"
        description = f"{title}: made to last, shipped from {seller['store_name']}. " * 3
        prices = sorted(rng.randrange(500, 50_000) * 100 for _ in range(3))
        product_rows.append(
            {
                "id": product_id,
                "seller_id": seller["id"],
                "title": title,
                "description": description,
                "category_id": rng.choice(leaves)["id"],
                "attributes": [
                    {"key": "material", "type": "text", "value": "cotton"},
                    {"key": "weight_kg", "type": "number", "value": 1.5},
                    {"key": "handmade", "type": "boolean", "value": True},
                ],
                "images": [
                    f"https://img.example.com/{product_id}/1.jpg",
                    f"https://img.example.com/{product_id}/2.jpg",
                ],
                "status": status,
                "currency": "KES",
                "min_price_minor": prices[0],
                "search_text": f"{title}\n{description}".lower(),
                "stocked": False,
                "published_at": published_at if status == "published" else None,
                "created_at": published_at,
                "updated_at": published_at,
            }
        )
        if status == "published" and seller["status"] == "active":
            published.append((published_at, product_id, seller["id"]))
        for position, (size, price) in enumerate(zip(("S", "M", "L"), prices, strict=True)):
            variant_id = uuid7()
            sku = f"SKU-{index}-{size}"
            variant_rows.append(
                {
                    "id": variant_id,
                    "product_id": product_id,
                    "seller_id": seller["id"],
                    "sku": sku,
                    "options": {"size": size, "colour": rng.choice(["red", "blue", "green"])},
                    "price_minor": price,
                    "currency": "KES",
                    "compare_at_minor": price + 10_000 if position == 0 else None,
                    "weight_grams": 500 + position * 250,
                    "status": "active",
                    "position": position,
                    "created_at": published_at,
                    "updated_at": published_at,
                }
            )
            item_rows.append(
                {"variant_id": variant_id, "seller_id": seller["id"], "sku": sku, "created_at": now}
            )
            stock_rows.append(
                {
                    "variant_id": variant_id,
                    "location_id": locations[seller["id"]]["id"],
                    "seller_id": seller["id"],
                    "on_hand": rng.choice([0, 3, 10, 25, 100]),
                    "updated_at": now,
                }
            )
            # What inventory's presence listener keeps: units on hand at an active location.
            product_rows[-1]["stocked"] |= stock_rows[-1]["on_hand"] > 0
    async with engine.begin() as conn:
        await conn.execute(insert(Seller), sellers)
        await conn.execute(insert(Category), categories)
        await conn.execute(insert(Location), list(locations.values()))
        for table, rows in (
            (Product, product_rows),
            (Variant, variant_rows),
            (InventoryItem, item_rows),
            (StockLevel, stock_rows),
        ):
            for start in range(0, len(rows), 2000):
                await conn.execute(insert(table), rows[start : start + 2000])
        if engine.dialect.name == "postgresql":
            await conn.exec_driver_sql("ANALYZE")
    await engine.dispose()
    published.sort(key=lambda row: (row[0], row[1]), reverse=True)
    return Loaded(
        products=products,
        variants=len(variant_rows),
        sellers=active_sellers,
        suspended=suspended_sellers,
        expected_page=[str(product_id) for _, product_id, _ in published[:PAGE_SIZE]],
    )


# -- phases ------------------------------------------------------------------------------------


@dataclass
class Measured:
    name: str
    rate: float  # answers a second
    latencies: list[float]  # seconds
    statuses: dict[str, int]
    cpu: dict[str, float]
    generator_cpu: float
    load: str
    late_p99: float
    first_error: str | None

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)

    @property
    def answers(self) -> int:
        return sum(self.statuses.values())


async def _measure(
    name: str, meter: loadgen.CpuMeter, workdir: Path, port: int, *, mode: str, seconds: float,
    connections: int, rate: float = 0.0,
) -> Measured:  # fmt: skip
    spec = LoadSpec(
        port=port,
        mode=mode,
        requests=[loadgen.get_request(PAGE_PATH).decode("latin-1")],
        start=time.time() + 1.0,
        seconds=seconds,
        rate=rate,
        connections=connections if mode == "closed" else 512,
    )
    (result,), cpu = await loadgen.run_phase([spec], meter, workdir, name.replace(" ", "-"))
    records = result["records"]
    statuses: dict[str, int] = {}
    first_error = result["errors"][0] if result["errors"] else None
    for _, status, problem, _, _ in records:
        key = str(status)
        statuses[key] = statuses.get(key, 0) + 1
        if status != 200 and first_error is None:
            first_error = f"{status} {problem}"
    return Measured(
        name=name,
        rate=len(records) / result["wall"],
        latencies=[done - due for _, _, _, due, done in records],
        statuses=statuses,
        cpu=cpu,
        generator_cpu=result["cpu"],
        load=loadgen.load_average(),
        late_p99=result["late_p99"],
        first_error=first_error,
    )


def _print(measured: Measured, *, closed: bool) -> None:
    lat = measured.latencies
    count = max(1, measured.answers)
    cpu = measured.cpu
    shape = "closed loop, service time" if closed else "open loop, from scheduled send"
    print(f"-- {measured.name}")
    print(
        f"   {measured.rate:8.0f} answers/s   {measured.answers} answers, statuses "
        f"{json.dumps(measured.statuses)}; {measured.load}"
    )
    print(
        f"   latency ({shape}) p50/p99/max {percentile(lat, 50) * 1000:.1f} / "
        f"{percentile(lat, 99) * 1000:.1f} / {max(lat, default=0) * 1000:.1f} ms"
        + ("" if closed else f"; generator late p99 {measured.late_p99 * 1000:.1f} ms")
    )
    print(f"   CPU (cores)  {loadgen.describe_cpu(cpu, measured.generator_cpu)}")
    print(
        f"   CPU per answer  server {cpu['server'] / count * 1000:.2f} ms, postgres "
        f"{cpu['postgres'] / count * 1000:.2f} ms, redis {cpu['redis'] / count * 1000:.2f} ms"
    )
    if measured.first_error:
        print(f"   first error  {measured.first_error}")


async def _page(port: int) -> list[dict[str, Any]]:
    response = await loadgen.fetch(port, loadgen.get_request(PAGE_PATH))
    if response.status != 200:
        raise SystemExit(f"the page answered {response.status}: {response.body[:300]!r}")
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def _serve(
    server: Any, port: int, name: str, pages: dict[str, Any], work: Callable[[], Any]
) -> None:
    try:
        await loadgen.wait_ready(port, server)
        pages[name] = await _page(port)
        await work()
    finally:
        loadgen.stop_server(server)


@dataclass
class Config:
    seconds: float = 10.0
    workers: int = 2
    connections: int = 16
    products: int = 10_000
    url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    keep: bool = False

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ.get
        return cls(
            seconds=float(env("BENCH_SECONDS", "10")),
            workers=int(env("BENCH_WORKERS", "2")),
            connections=int(env("BENCH_CONNECTIONS", "16")),
            products=int(env("BENCH_PRODUCTS", "10000")),
            url=env("BENCH_DATABASE_URL") or DEFAULT_DATABASE_URL,
            redis_url=env("BENCH_REDIS_URL") or DEFAULT_REDIS_URL,
            keep=env("BENCH_KEEP_DATABASE") == "1",
        )


@dataclass
class Outcome:
    invariants_held: bool
    goals_met: bool
    results: dict[str, Measured]


async def main(_argv: list[str]) -> None:
    await run(Config.from_env())


async def run(config: Config) -> Outcome:
    seconds, workers, connections = config.seconds, config.workers, config.connections
    url, redis_url = config.url, config.redis_url
    warm = min(3.0, seconds)
    if not url.startswith("postgresql"):
        raise SystemExit("the catalog benchmark runs on PostgreSQL (BENCH_DATABASE_URL)")
    workdir = Path(tempfile.mkdtemp(prefix="soko-bench-catalog-"))
    database = loadgen.database_name(url)
    print(
        f"setup         PostgreSQL database {database}, {workers} server process(es), "
        f"{os.cpu_count()} cores, {connections} closed-loop clients, {seconds:.0f} s a phase; "
        f"{loadgen.load_average()}"
    )
    await loadgen.recreate_database(url)
    started = time.perf_counter()
    loaded = await load_catalog(url, config.products)
    print(
        f"catalog       {loaded.products} products, {loaded.variants} variants, "
        f"{loaded.sellers} active sellers + {loaded.suspended} suspended, loaded in "
        f"{time.perf_counter() - started:.1f} s; the page: {PAGE_PATH}"
    )
    results: dict[str, Measured] = {}
    pages: dict[str, list[dict[str, Any]]] = {}
    try:
        env = loadgen.server_env(workdir, url, workers=workers, redis_url=redis_url)
        log = workdir / "server.log"

        # (a) and (c): uncached through the ORM.
        if workers > 1:
            await loadgen.flush_redis(redis_url)
        port = loadgen.free_port()
        server = loadgen.start_soko(
            env, port, workers, log=log, factory="bench.catalog:uncached_app"
        )
        meter = loadgen.CpuMeter(server.pid, database)

        async def uncached() -> None:
            await _measure("warm-up", meter, workdir, port, mode="closed", seconds=warm,
                           connections=connections)  # fmt: skip
            results["uncached"] = await _measure(
                "(a) uncached capacity", meter, workdir, port, mode="closed", seconds=seconds,
                connections=connections,
            )  # fmt: skip
            results["uncached70"] = await _measure(
                "(c) uncached at 70% of capacity", meter, workdir, port, mode="open",
                seconds=seconds, connections=connections, rate=0.7 * results["uncached"].rate,
            )  # fmt: skip

        await _serve(server, port, "uncached", pages, uncached)

        # (b): cached.
        if workers > 1:
            await loadgen.flush_redis(redis_url)
        port = loadgen.free_port()
        server = loadgen.start_soko(env, port, workers, log=log)
        meter = loadgen.CpuMeter(server.pid, database)

        async def cached() -> None:
            await _measure("warm-up", meter, workdir, port, mode="closed", seconds=warm,
                           connections=connections)  # fmt: skip
            results["cached"] = await _measure(
                "(b) cached capacity", meter, workdir, port, mode="closed", seconds=seconds,
                connections=connections,
            )  # fmt: skip
            results["cached70"] = await _measure(
                "(b') cached at 70% of capacity", meter, workdir, port, mode="open",
                seconds=seconds, connections=connections, rate=0.7 * results["cached"].rate,
            )  # fmt: skip

        await _serve(server, port, "cached", pages, cached)

        # (d): the same SQL with asyncpg behind a bare Starlette app.
        port = loadgen.free_port()
        server = start_raw(url, port, workers, log=log)
        meter = loadgen.CpuMeter(server.pid, database)

        async def raw() -> None:
            await _measure("warm-up", meter, workdir, port, mode="closed", seconds=warm,
                           connections=connections)  # fmt: skip
            results["raw"] = await _measure(
                "(d) raw asyncpg + Starlette capacity", meter, workdir, port, mode="closed",
                seconds=seconds, connections=connections,
            )  # fmt: skip
            # The same open-loop load as (c): a tail both servers show is the machine's
            # (PostgreSQL backends or the generator held off the CPU), not Soko's.
            results["raw70"] = await _measure(
                "(d') raw at the rate of (c)", meter, workdir, port, mode="open",
                seconds=seconds, connections=connections, rate=results["uncached70"].rate,
            )  # fmt: skip

        await _serve(server, port, "raw", pages, raw)
    finally:
        if not config.keep:
            await loadgen.drop_database(url)
    for key in ("uncached", "uncached70", "cached", "cached70", "raw", "raw70"):
        _print(results[key], closed=not key.endswith("70"))
    held, met = report(results, pages, loaded, workers=workers)
    return Outcome(held, met, results)


def start_raw(url: str, port: int, workers: int, *, log: Path) -> Any:
    import subprocess
    import sys

    env = {**os.environ, "BENCH_RAW_DSN": url.replace("postgresql+asyncpg://", "postgresql://")}
    # The same uvicorn serving as `soko serve` (a listening socket per process), so the
    # two differ only in what answers the request.
    command = [
        sys.executable, "-c",
        "import sys; from soko.platform import serving; "
        "serving.run_workers(serving.ReusePortConfig('bench.raw_catalog_app:app', "
        "host='127.0.0.1', port=int(sys.argv[1]), workers=int(sys.argv[2]), "
        "access_log=False, log_level='warning', server_header=False))",
        str(port), str(workers),
    ]  # fmt: skip
    with log.open("ab") as sink:
        return subprocess.Popen(command, env=env, cwd=loadgen.ROOT, stdout=sink, stderr=sink)


def report(
    results: dict[str, Measured],
    pages: dict[str, list[dict[str, Any]]],
    loaded: Loaded,
    *,
    workers: int,
) -> tuple[bool, bool]:
    """Print the invariants and the goals; whether the invariants held, whether the goals
    were met."""
    print("invariants")
    checks: list[tuple[str, bool]] = []
    for key, measured in results.items():
        non_ok = measured.answers - measured.ok
        checks.append((f"{key}: every answer 200 ({non_ok} others)", non_ok == 0))
    for name, items in pages.items():
        checks.append(
            (
                f"{name}: the page is the expected {PAGE_SIZE} products (published, of "
                "active sellers, newest first)",
                [str(item["id"]) for item in items] == loaded.expected_page,
            )
        )
    reference = pages.get("uncached")
    for name, items in pages.items():
        if name != "uncached" and reference is not None:
            checks.append((f"{name}: the same items as uncached, field for field",
                           items == reference))  # fmt: skip
    for label, passed in checks:
        print(f"   {'ok  ' if passed else 'FAIL'} {label}")
    uncached = results["uncached"].rate
    cached = results["cached"].rate
    p99 = percentile(results["uncached70"].latencies, 99) * 1000
    raw = results["raw"].rate
    ratio = uncached / raw if raw else 0.0
    goals = [
        (f"uncached through the ORM   {uncached:7.0f} req/s", uncached >= GOALS["uncached"],
         f">= {GOALS['uncached']:.0f}"),
        (f"cached                     {cached:7.0f} req/s", cached >= GOALS["cached"],
         f">= {GOALS['cached']:.0f}"),
        (f"p99 at 70% of uncached     {p99:7.1f} ms", p99 < GOALS["p99_ms"],
         f"< {GOALS['p99_ms']:.0f} ms"),
        (f"ORM / raw asyncpg          {ratio:7.2f}x ({raw:.0f} req/s raw)",
         ratio >= GOALS["raw_ratio"], f">= {GOALS['raw_ratio']}"),
    ]  # fmt: skip
    print(f"goals ({workers} process(es), {os.cpu_count()} cores; {loadgen.load_average()})")
    for label, passed, goal in goals:
        print(f"   {'PASS' if passed else 'FAIL'} {label}   (goal {goal})")
    if "raw70" in results:
        raw_p99 = percentile(results["raw70"].latencies, 99) * 1000
        print(
            f"   note: the raw baseline's p99 at the same rate was {raw_p99:.1f} ms"
            + (
                " (over the goal as well: the machine stalled; rerun on a quieter one)"
                if p99 >= GOALS["p99_ms"] and raw_p99 >= GOALS["p99_ms"]
                else ""
            )
        )
    return all(passed for _, passed in checks), all(passed for _, passed, _ in goals)
