"""Hot-SKU checkout: one variant with 1,000 units and 2,000 buyers, for both reservation
strategies, against the same buyers spread over 1,000 SKUs of one unit each.

Loads a database of its own (``soko_bench_checkout``, dropped and created again): one
active seller, the hot variant, 1,000 spread variants, and 2,000 buyer accounts each
with a session and an access token, inserted through the identity models (no sign-in,
so no Argon2). Then, for each strategy (``SOKO_RESERVATION_STRATEGY=optimistic`` and
``pessimistic``, one ``soko serve`` with ``BENCH_WORKERS`` processes each) and each
shape (``hot``: every cart holds the hot variant; ``spread``: buyer i's cart holds spread
variant i mod 1,000, so the same 1,000 succeed and 1,000 find their SKU sold out, and only
the contention differs), two runs on fresh carts and stock, after an unmeasured warm-up
run on each new server (500 spread checkouts: see ``warm_up``):

* ``capacity``: ``BENCH_CHECKOUT_CONNECTIONS`` clients post the 2,000 checkouts back to
  back (closed loop): checkouts/s is the 201s divided by the time until the last one;
* ``at rate``: the 2,000 checkouts arrive at a fixed rate (open loop; latency counted
  from each request's scheduled send time): the goal's 250/s, or 70% of the capacity
  just measured when that is lower (``BENCH_CHECKOUT_RATE`` fixes it): p50/p99 of the
  201s and of the "sold out" answers (409 ``out-of-stock``).

Every ``POST /api/v1/checkout`` carries an ``Idempotency-Key`` and an access token. The
tokens are issued after each new server's warm-up, once its processes have heard every
change for longer than the leeway (``TRUST_AFTER``), as a buyer's token issued at sign-in
or refresh is: the server trusts their claims as issued, with no read of the session's
state (ADR 0019). ``BENCH_TOKENS=changed`` instead announces a change of every buyer's
authorization before each run (as blocking or a role change does), so every checkout
reads its session's state, cached nowhere yet. After each run it checks, in
the database: exactly 1,000 answers 201 and every other one is 409 ``out-of-stock``; the
reserved units of the run's variants sum to exactly 1,000, with on_hand - reserved -
allocated >= 0 on every stock row; 1,000 held reservations of 1,000 units; 1,000
checkout groups and carts converted; and that replaying some requests with their keys
answers the stored answer (``Idempotency-Replayed: true``) without reserving more; and,
by the servers' ``soko_access_token_states_total`` (summed over their processes through
``PROMETHEUS_MULTIPROC_DIR``), that every checkout's session state came from where the
run meant it to: its token, or a read.

    .venv/bin/python -m bench checkout

Settings: ``BENCH_WORKERS`` (2), ``BENCH_BUYERS`` (2000), ``BENCH_UNITS`` (1000),
``BENCH_CHECKOUT_CONNECTIONS`` (32), ``BENCH_CHECKOUT_RATE`` (0: see above),
``BENCH_TOKENS`` (``fresh`` or ``changed``: see above),
``BENCH_STRATEGIES`` (``optimistic,pessimistic``), ``BENCH_SHAPES`` (``hot,spread``),
``BENCH_DATABASE_URL`` (default
``postgresql+asyncpg://postgres@127.0.0.1:5432/soko_bench_checkout``, dropped and created
when its name starts with ``soko_bench``), ``BENCH_REDIS_URL``
(``redis://127.0.0.1:6379/12``, emptied), ``BENCH_KEEP_DATABASE=1``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.loadgen import LoadSpec, percentile

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/soko_bench_checkout"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"
CHECKOUT_PATH = "/api/v1/checkout"
# Checkouts of the unmeasured run each new server serves first (see warm_up).
WARM_UP_CHECKOUTS = 500
# Seconds after a server is ready from which the tokens it is sent were issued: the
# default leeway (30 s, the skew allowed between clocks), the issuer's delay (2 s) and a
# margin for the listener's confirmation. Tokens issued later are trusted as issued
# (ADR 0019).
TRUST_AFTER = 34.0
PRICE_MINOR = 150_000
GOALS = {"rate": 250.0, "spread_ratio": 0.8, "sold_out_ms": 50.0}
SOLD_OUT = "out-of-stock"
# Tables that hold the loaded accounts, store, catalog and stock; every other table
# (carts, orders, reservations, idempotency keys, the outbox...) is emptied between runs.
KEPT_TABLES = ("users", "user_roles", "auth_sessions", "inventory_items", "inventory_locations",
               "inventory_stock_levels")  # fmt: skip
KEPT_PREFIXES = ("sellers", "seller_", "catalog_")


@dataclass
class Buyer:
    user_id: uuid.UUID
    session_id: uuid.UUID
    token: str


@dataclass
class Store:
    seller_id: uuid.UUID
    location_id: uuid.UUID
    hot: uuid.UUID
    spread: list[uuid.UUID]
    buyers: list[Buyer]
    units: int


async def load(url: str, settings: Any, *, buyers: int, units: int) -> Store:
    """The store, its catalog and stock, and the buyers with their access tokens."""
    from sqlalchemy import insert

    from soko.app import load_models
    from soko.catalog.models import Product, Variant
    from soko.identity.models import AuthSession, User, UserRole
    from soko.inventory.models import InventoryItem, Location, StockLevel
    from soko.platform.db import Base, create_engine
    from soko.platform.ids import uuid7
    from soko.platform.schema import create_current_schema
    from soko.sellers.models import Seller, SellerMember

    load_models()
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(create_current_schema)
    now = dt.datetime.now(dt.UTC)
    owner = uuid7()
    seller_id, location_id = uuid7(), uuid7()
    products: list[dict[str, Any]] = []
    variants: list[dict[str, Any]] = []

    def product(title: str) -> uuid.UUID:
        product_id = uuid7()
        products.append(
            {
                "id": product_id, "seller_id": seller_id, "title": title,
                "description": f"{title}, sold by the checkout benchmark.", "status": "published",
                "currency": "KES", "min_price_minor": PRICE_MINOR, "search_text": title.lower(),
                "stocked": True,
                "published_at": now, "created_at": now, "updated_at": now,
            }
        )  # fmt: skip
        return product_id

    def variant(product_id: uuid.UUID, sku: str, position: int) -> uuid.UUID:
        variant_id = uuid7()
        variants.append(
            {
                "id": variant_id, "product_id": product_id, "seller_id": seller_id, "sku": sku,
                "options": {"size": "M"}, "price_minor": PRICE_MINOR, "currency": "KES",
                "status": "active", "position": position, "created_at": now, "updated_at": now,
            }
        )  # fmt: skip
        return variant_id

    hot = variant(product("The hot item"), "HOT-1", 0)
    spread = []
    for index in range(units):
        if index % 4 == 0:
            spread_product = product(f"Spread item {index // 4}")
        spread.append(variant(spread_product, f"SPREAD-{index}", index % 4))
    users, roles, sessions, accounts = [], [], [], []
    for index in range(buyers):
        user_id, session_id = uuid7(), uuid7()
        # Verified, as checkout requires (SOKO_CHECKOUT_REQUIRES_VERIFIED_CONTACT): a
        # blind index of its own stands for the address, which nothing here sends to.
        users.append(
            {"id": user_id, "display_name": f"Buyer {index}", "status": "active",
             "email_index": f"bench-buyer-{user_id.hex}", "email_verified_at": now,
             "created_at": now, "updated_at": now}
        )  # fmt: skip
        roles.append({"user_id": user_id, "role": "customer", "granted_at": now})
        sessions.append(
            {"id": session_id, "user_id": user_id, "device_name": "bench", "method": "password",
             "created_at": now, "last_seen_at": now, "expires_at": now + dt.timedelta(days=1)}
        )  # fmt: skip
        accounts.append(Buyer(user_id, session_id, ""))
    await mint_tokens(settings, accounts)
    async with engine.begin() as conn:
        await conn.execute(
            insert(Seller),
            [{"id": seller_id, "slug": "hot-store", "store_name": "Hot Store",
              "status": "active", "created_by": owner, "created_at": now, "updated_at": now,
              "reviewed_at": now}],
        )  # fmt: skip
        await conn.execute(
            insert(SellerMember),
            [{"seller_id": seller_id, "user_id": owner, "role": "owner", "added_at": now}],
        )
        await conn.execute(
            insert(Location),
            [{"id": location_id, "seller_id": seller_id, "name": "Main warehouse",
              "kind": "warehouse", "created_at": now, "updated_at": now}],
        )  # fmt: skip
        for table, rows in (
            (Product, products),
            (Variant, variants),
            (
                InventoryItem,
                [{"variant_id": v["id"], "seller_id": seller_id, "sku": v["sku"],
                  "created_at": now} for v in variants],
            ),
            (
                StockLevel,
                [{"variant_id": v["id"], "location_id": location_id, "seller_id": seller_id,
                  "on_hand": units if v["id"] == hot else 1, "updated_at": now}
                 for v in variants],
            ),
            (User, users),
            (UserRole, roles),
            (AuthSession, sessions),
        ):  # fmt: skip
            for start in range(0, len(rows), 2000):
                await conn.execute(insert(table), rows[start : start + 2000])
        await conn.exec_driver_sql("ANALYZE")
    await engine.dispose()
    return Store(seller_id, location_id, hot, spread, accounts, units)


def _expected_source(changed: bool, minted: float, starting: float, ready: float) -> str | None:
    """Where the server should find the state of tokens ``minted`` then, its processes
    listening from between ``starting`` and ``ready``: ``"token"`` when they were
    issued more than the (default) leeway after it was ready, ``"read"`` when announced
    changed or issued less than the leeway after it started, ``None`` in between."""
    from soko.identity.principals import ISSUE_DELAY_SECONDS
    from soko.platform.config import Settings

    margin = float(Settings.model_fields["token_leeway_seconds"].default) + ISSUE_DELAY_SECONDS
    if changed or minted - starting < margin - 1:
        return "read"
    if minted - ready > margin + 1:
        return "token"
    return None


async def mint_tokens(settings: Any, buyers: list[Buyer]) -> None:
    """A new access token for each buyer's session, as a sign-in or a refresh issues one
    (a customer, no second factor). A server trusts a token's claims as issued once it
    has heard every change since (ADR 0019): tokens minted more than the leeway after its
    processes began listening."""
    from soko.identity.sessions import issue_access_token
    from soko.platform.runtime import Runtime

    runtime = Runtime(settings)
    try:
        for buyer in buyers:
            buyer.token = issue_access_token(
                runtime, user_id=buyer.user_id, session_id=buyer.session_id,
                roles=frozenset({"customer"}), mfa_verified=False,
            )  # fmt: skip
    finally:
        await runtime.stop()


async def reset(url: str, store: Store, shape: str) -> list[str]:
    """Empty carts, orders, reservations and keys; stock back to its loaded level; a
    fresh open cart per buyer holding one unit of their variant. The cart ids, in buyer
    order."""
    from sqlalchemy import insert, text

    from soko.cart.models import Cart, CartLine
    from soko.platform.db import Base, create_engine
    from soko.platform.ids import uuid7

    engine = create_engine(url)
    emptied = [
        name
        for name in Base.metadata.tables
        if name not in KEPT_TABLES and not name.startswith(KEPT_PREFIXES)
    ]
    now = dt.datetime.now(dt.UTC)
    carts, lines = [], []
    for index, buyer in enumerate(store.buyers):
        cart_id = uuid7()
        variant_id = store.hot if shape == "hot" else store.spread[index % len(store.spread)]
        carts.append(
            {"id": cart_id, "user_id": buyer.user_id, "status": "open", "currency": "KES",
             "version": 1, "created_at": now, "updated_at": now}
        )  # fmt: skip
        lines.append(
            {"id": uuid7(), "cart_id": cart_id, "variant_id": variant_id, "quantity": 1,
             "unit_price_minor": PRICE_MINOR, "currency": "KES", "added_at": now,
             "updated_at": now}
        )  # fmt: skip
    async with engine.begin() as conn:
        quoted = ", ".join(f'"{name}"' for name in emptied)
        await conn.execute(text(f"TRUNCATE {quoted} CASCADE"))
        await conn.execute(
            text(
                "UPDATE inventory_stock_levels SET reserved = 0, allocated = 0, "
                "on_hand = CASE WHEN variant_id = :hot THEN :units ELSE 1 END"
            ),
            {"hot": store.hot, "units": store.units},
        )
        for table, rows in ((Cart, carts), (CartLine, lines)):
            for start in range(0, len(rows), 2000):
                await conn.execute(insert(table), rows[start : start + 2000])
        await conn.exec_driver_sql("ANALYZE")
    await engine.dispose()
    return [str(cart["id"]) for cart in carts]


def checkout_requests(store: Store, cart_ids: list[str], run: str) -> list[bytes]:
    return [
        loadgen.post_json(
            CHECKOUT_PATH,
            {"cart_id": cart_id},
            {"Authorization": f"Bearer {buyer.token}", "Idempotency-Key": f"{run}-{index}"},
        )
        for index, (buyer, cart_id) in enumerate(zip(store.buyers, cart_ids, strict=True))
    ]


# -- one run -------------------------------------------------------------------------------------


@dataclass
class Run:
    strategy: str
    shape: str
    kind: str  # "capacity" | "at rate"
    rate: float  # the offered rate of an "at rate" run
    records: list[list[Any]]
    wall: float
    cpu: dict[str, float]
    generator_cpu: float
    load: str
    late_p99: float
    checks: list[tuple[str, bool, bool]] = field(default_factory=list)
    # How long after the last answer the run's background work (its order.placed events
    # and their subscribers' jobs) was done, by the outbox's completion times.
    background_after: float = 0.0
    # Where the run's access tokens' session states came from, by the servers' count:
    # "token" (taken as issued) or "read".
    tokens: dict[str, int] = field(default_factory=dict)

    def by_outcome(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, status, problem, _, _ in self.records:
            key = f"{status} {problem}".strip()
            counts[key] = counts.get(key, 0) + 1
        return counts

    @property
    def created(self) -> list[list[Any]]:
        return [r for r in self.records if r[1] == 201]

    @property
    def sold_out(self) -> list[list[Any]]:
        return [r for r in self.records if r[1] == 409 and r[2] == SOLD_OUT]

    @property
    def checkout_rate(self) -> float:
        """201s a second, from the first send until the last 201 was answered."""
        created = self.created
        if not created:
            return 0.0
        first = min(r[3] for r in self.records)
        return len(created) / max(1e-9, max(r[4] for r in created) - first)

    @property
    def answer_rate(self) -> float:
        first = min(r[3] for r in self.records)
        return len(self.records) / max(1e-9, max(r[4] for r in self.records) - first)

    @property
    def sustained_rate(self) -> float:
        """Answers a second counting until their background work was done as well: the
        rate the server keeps up with for as long as it lasts. A closed loop answers
        faster than that while the jobs it leaves behind pile up."""
        first = min(r[3] for r in self.records)
        span = max(r[4] for r in self.records) - first + self.background_after
        return len(self.records) / max(1e-9, span)


async def _unmeasured(
    port: int, raws: list[bytes], workdir: Path, name: str, connections: int
) -> dict[int, int]:
    """``raws`` sent back to back by a generator of their own, outside any measured
    phase; how many answers had each status."""
    spec = LoadSpec(
        port=port,
        mode="closed",
        requests=[raw.decode("latin-1") for raw in raws],
        start=time.time() + 0.5,
        count=len(raws),
        connections=connections,
    )
    process = loadgen.spawn(spec, workdir, name)
    result = await asyncio.to_thread(loadgen.collect, process)
    statuses: dict[int, int] = {}
    for record in result["records"]:
        statuses[record[1]] = statuses.get(record[1], 0) + 1
    return statuses


async def warm_up(
    *, url: str, port: int, store: Store, workdir: Path, connections: int
) -> str:  # fmt: skip
    """An unmeasured run on a server just started: ``WARM_UP_CHECKOUTS`` spread
    checkouts, then their background work. A new server opens its pools' connections
    (asyncpg looks up the array types on each new one, a query that costs PostgreSQL
    about 10 ms to plan), prepares every statement on every connection, compiles its
    statements and notification templates; without this the first measured run paid for
    all of it (1.5 ms of server and 0.3 ms of PostgreSQL CPU more per answer than the
    same run measured again), and it was always the hot one. What it did, for the log."""
    began = time.perf_counter()
    cart_ids = await reset(url, store, "spread")
    raws = checkout_requests(store, cart_ids, "warm-up")[:WARM_UP_CHECKOUTS]
    statuses = await _unmeasured(port, raws, workdir, "warm-up", connections)
    if set(statuses) - {201, 409}:
        raise SystemExit(f"the warm-up's checkouts answered {statuses}")
    label, drained, _ = await _outbox_drained(url)
    if not drained:
        raise SystemExit(f"the warm-up's {label}")
    return (
        f"{len(raws)} spread checkouts and their background work, not measured "
        f"({statuses.get(201, 0)} answered 201), {time.perf_counter() - began:.1f} s"
    )


async def change_sessions(redis_url: str, store: Store) -> None:
    """Announce a change of every buyer's authorization, as blocking or a role change
    does: each server process then reads the session state behind every token instead of
    trusting its claims, and finds none cached (in Redis, or as near copies)."""
    from redis.asyncio import Redis

    from soko.identity.public import principal_tag
    from soko.platform.cache import RedisCache

    client = Redis.from_url(redis_url)
    try:
        await RedisCache(client).invalidate_tags(*(principal_tag(b.user_id) for b in store.buyers))
    finally:
        await client.aclose()


async def one_run(
    *, url: str, port: int, meter: loadgen.CpuMeter, store: Store, strategy: str, shape: str,
    kind: str, workdir: Path, connections: int, rate: float, changed: bool, redis_url: str,
    expect: str | None,
) -> Run:  # fmt: skip
    """One run; ``expect``: where every checkout's session state should come from,
    ``"token"`` or ``"read"`` (``None``: it cannot be told, not checked)."""
    name = f"{strategy}-{shape}-{kind.replace(' ', '-')}"
    cart_ids = await reset(url, store, shape)
    raws = checkout_requests(store, cart_ids, name)
    if changed:
        await change_sessions(redis_url, store)
    spec = LoadSpec(
        port=port,
        mode="closed" if kind == "capacity" else "open",
        requests=[raw.decode("latin-1") for raw in raws],
        start=time.time() + 1.0,
        count=len(raws),
        rate=rate,
        connections=connections if kind == "capacity" else 512,
        keep_bodies=[201, 409],
    )
    states_before = await token_states(port)
    (result,), cpu = await loadgen.run_phase([spec], meter, workdir, name)
    ended = time.time()  # within milliseconds of the last answer
    states_after = await token_states(port)
    run = Run(
        strategy, shape, kind, rate, result["records"], result["wall"], cpu, result["cpu"],
        loadgen.load_average(), result["late_p99"],
    )  # fmt: skip
    run.tokens = {
        source: round(states_after.get(source, 0) - states_before.get(source, 0))
        for source in ("token", "read")
    }
    run.checks = await check_run(url, port, store, shape, run, raws, result["bodies"])
    if expect is not None:
        other = "read" if expect == "token" else "token"
        run.checks.append(
            (
                f"every checkout's session state "
                f"{'taken from its token' if expect == 'token' else 'read'} "
                f"({run.tokens[expect]} of {len(raws)}; {run.tokens[other]} {other})",
                run.tokens[expect] == len(raws) and run.tokens[other] == 0,
                False,
            )
        )
    run.background_after = await _background_done_after(url, ended)
    return run


async def token_states(port: int) -> dict[str, float]:
    """The servers' ``soko_access_token_states_total`` by source, summed over their
    processes (``PROMETHEUS_MULTIPROC_DIR``)."""
    import urllib.request

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            return str(answer.read().decode())

    states: dict[str, float] = {}
    for line in (await asyncio.to_thread(scrape)).splitlines():
        if line.startswith("soko_access_token_states_total{"):
            labels, _, value = line.rpartition(" ")
            source = labels.partition('source="')[2].partition('"')[0]
            states[source] = states.get(source, 0.0) + float(value)
    return states


async def check_run(
    url: str, port: int, store: Store, shape: str, run: Run, raws: list[bytes],
    bodies: dict[str, str],
) -> list[tuple[str, bool, bool]]:  # fmt: skip
    """The invariants of one run, read from the answers and the database: (label,
    held, whether it is about overselling)."""
    units, buyers = store.units, len(store.buyers)
    outcomes = run.by_outcome()
    created, sold_out = len(run.created), len(run.sold_out)
    state = await _stock_state(url, store, shape)
    checks = [
        # Overselling: every unit reserved belongs to a 201, never more than there are.
        (f"at most {units} checkouts answered 201 ({created})", created <= units, True),
        (
            f"reserved units sum to the 201s ({state['reserved']} for {created})",
            state["reserved"] == created,
            True,
        ),
        (
            f"on_hand - reserved - allocated >= 0 on every stock row (lowest {state['lowest']})",
            state["lowest"] >= 0,
            True,
        ),
        (
            f"one held reservation of one unit per 201 ({state['holds']} holds of "
            f"{state['held_units']} units)",
            state["holds"] == created and state["held_units"] == created,
            True,
        ),
        (f"no units allocated yet ({state['allocated']})", state["allocated"] == 0, True),
        # The answers: exactly as many sales as units, everyone else told it is sold out.
        (f"exactly {units} checkouts answered 201 ({created})", created == units, False),
        (
            f"every other answer is 409 {SOLD_OUT} ({sold_out}; all: {json.dumps(outcomes)})",
            sold_out == buyers - units,
            False,
        ),
    ]
    for table in ("orders_checkout_groups", "orders"):
        if table in state["counts"]:
            found = state["counts"][table]
            checks.append((f"one row in {table} per 201 ({found})", found == created, False))
    checks.append(
        (f"one cart converted per 201 ({state['converted']})", state["converted"] == created,
         False)
    )  # fmt: skip
    # Replays: the stored answer comes back, marked, and nothing more is reserved.
    replayed_ok = 0
    samples = [r[0] for r in run.created[:10]]
    sold_samples = [r[0] for r in run.sold_out[:5]]
    for index in samples + sold_samples:
        first = bodies.get(str(index))
        response = await loadgen.fetch(port, raws[index])
        if (
            response.header("idempotency-replayed") == "true"
            and (first is None or json.loads(response.body) == json.loads(first))
            and response.status in (201, 409)
        ):
            replayed_ok += 1
    checks.append(
        (
            f"replays with the same key answer the stored answer ({replayed_ok} of "
            f"{len(samples) + len(sold_samples)})",
            replayed_ok == len(samples) + len(sold_samples),
            False,
        )
    )
    after = await _stock_state(url, store, shape)
    checks.append(
        (f"replays reserved nothing more ({after['reserved']})", after["reserved"] == created,
         True)
    )  # fmt: skip
    checks.append(await _outbox_drained(url))
    return checks


async def _background_done_after(url: str, ended: float) -> float:
    """Seconds from ``ended`` (the wall-clock time of the last answer) until the last
    outbox message of the run was done; 0 when it was all done before."""
    from sqlalchemy import text

    from soko.platform.db import create_engine

    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            last = (
                await conn.execute(text("SELECT max(completed_at) FROM outbox_messages"))
            ).scalar()
    finally:
        await engine.dispose()
    return max(0.0, last.timestamp() - ended) if last is not None else 0.0


async def _outbox_drained(url: str, *, limit_seconds: float = 300.0) -> tuple[str, bool, bool]:
    """Wait for the server to finish the run's background work (the events of the
    orders placed and their subscribers' jobs): nothing due left pending or running, and
    nothing dead. The next run starts on a drained outbox, so a backlog is neither
    thrown away by the reset nor counted against the next run."""
    from sqlalchemy import text

    from soko.platform.db import create_engine

    engine = create_engine(url)
    began = time.perf_counter()
    try:
        while True:
            async with engine.connect() as conn:
                counts = dict(
                    (
                        await conn.execute(
                            text(
                                "SELECT CASE WHEN status IN ('pending', 'running') AND "
                                "available_at > now() THEN 'later' ELSE status END, count(*) "
                                "FROM outbox_messages GROUP BY 1"
                            )
                        )
                    ).all()
                )
            waiting = counts.get("pending", 0) + counts.get("running", 0)
            waited = time.perf_counter() - began
            if not waiting or waited > limit_seconds:
                break
            await asyncio.sleep(0.25)
    finally:
        await engine.dispose()
    done, dead = counts.get("done", 0), counts.get("dead", 0)
    return (
        f"background work drained: {done} outbox messages done, {dead} dead, "
        f"{waiting} still due, {counts.get('later', 0)} retrying later ({waited:.1f} s after "
        "the last answer)",
        waiting == 0 and dead == 0 and done > 0,
        False,
    )


async def _stock_state(url: str, store: Store, shape: str) -> dict[str, Any]:
    from sqlalchemy import func, select

    from soko.cart.models import Cart
    from soko.inventory.models import Reservation, StockLevel
    from soko.platform.db import Base, create_engine

    variants = [store.hot] if shape == "hot" else store.spread
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    select(
                        func.coalesce(func.sum(StockLevel.reserved), 0),
                        func.coalesce(func.sum(StockLevel.allocated), 0),
                        func.min(StockLevel.on_hand - StockLevel.reserved - StockLevel.allocated),
                    ).where(StockLevel.variant_id.in_(variants))
                )
            ).one()
            holds = (
                await conn.execute(
                    select(func.count(), func.coalesce(func.sum(Reservation.quantity), 0)).where(
                        Reservation.status == "held"
                    )
                )
            ).one()
            converted = await conn.scalar(
                select(func.count()).select_from(Cart).where(Cart.status == "converted")
            )
            counts = {}
            for name in ("orders_checkout_groups", "orders"):
                table = Base.metadata.tables.get(name)
                if table is not None:
                    counts[name] = await conn.scalar(select(func.count()).select_from(table))
    finally:
        await engine.dispose()
    return {
        "reserved": int(row[0]),
        "allocated": int(row[1]),
        "lowest": int(row[2]),
        "holds": int(holds[0]),
        "held_units": int(holds[1]),
        "converted": int(converted or 0),
        "counts": counts,
    }


def print_run(run: Run) -> None:
    created = [r[4] - r[3] for r in run.created]
    sold = [r[4] - r[3] for r in run.sold_out]
    shape = "service time" if run.kind == "capacity" else "from scheduled send"
    offered = f" at {run.rate:.0f}/s" if run.kind == "at rate" else ""
    print(f"-- {run.strategy} / {run.shape} / {run.kind}{offered}")
    print(
        f"   checkouts {run.checkout_rate:7.1f}/s   answers {run.answer_rate:7.1f}/s   "
        f"outcomes {json.dumps(run.by_outcome())}; {run.load}"
    )
    if run.tokens:
        print(
            f"   tokens      {run.tokens['token']} taken as issued, {run.tokens['read']} "
            "with their session's state read"
        )
    print(
        f"   201 latency ({shape}) p50/p99/max {percentile(created, 50) * 1000:.1f} / "
        f"{percentile(created, 99) * 1000:.1f} / {max(created, default=0) * 1000:.1f} ms"
    )
    print(
        f"   sold out ({shape})    p50/p99/max {percentile(sold, 50) * 1000:.1f} / "
        f"{percentile(sold, 99) * 1000:.1f} / {max(sold, default=0) * 1000:.1f} ms"
        + ("" if run.kind == "capacity" else f"; generator late p99 {run.late_p99 * 1000:.1f} ms")
    )
    count = max(1, len(run.records))
    if run.kind == "capacity":
        print(
            f"   sustained {run.sustained_rate:7.1f}/s   (answers a second until their "
            f"background work was done too, {run.background_after:.1f} s after the last answer)"
        )
    print(f"   CPU (cores)  {loadgen.describe_cpu(run.cpu, run.generator_cpu)}")
    print(
        f"   CPU per request  server {run.cpu['server'] / count * 1000:.2f} ms, postgres "
        f"{run.cpu['postgres'] / count * 1000:.2f} ms, "
        f"redis {run.cpu['redis'] / count * 1000:.2f} ms"
    )
    for label, passed, _ in run.checks:
        print(f"   {'ok  ' if passed else 'FAIL'} {label}")


@dataclass
class Config:
    workers: int = 2
    buyers: int = 2000
    units: int = 1000
    connections: int = 32
    rate: float = 0.0  # 0: the goal rate, or 70% of the capacity when that is lower
    strategies: tuple[str, ...] = ("optimistic", "pessimistic")
    shapes: tuple[str, ...] = ("hot", "spread")
    kinds: tuple[str, ...] = ("capacity", "at rate")
    tokens: str = "fresh"
    trust_after: float = TRUST_AFTER
    url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    keep: bool = False

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ.get
        return cls(
            workers=int(env("BENCH_WORKERS", "2")),
            buyers=int(env("BENCH_BUYERS", "2000")),
            units=int(env("BENCH_UNITS", "1000")),
            connections=int(env("BENCH_CHECKOUT_CONNECTIONS", "32")),
            rate=float(env("BENCH_CHECKOUT_RATE", "0")),
            strategies=tuple(env("BENCH_STRATEGIES", "optimistic,pessimistic").split(",")),
            shapes=tuple(env("BENCH_SHAPES", "hot,spread").split(",")),
            kinds=tuple(env("BENCH_KINDS", "capacity,at rate").split(",")),
            tokens=env("BENCH_TOKENS", "fresh"),
            url=env("BENCH_DATABASE_URL") or DEFAULT_DATABASE_URL,
            redis_url=env("BENCH_REDIS_URL") or DEFAULT_REDIS_URL,
            keep=env("BENCH_KEEP_DATABASE") == "1",
        )


@dataclass
class Outcome:
    invariants_held: bool
    goals_met: bool
    runs: list[Run]


async def main(_argv: list[str]) -> None:
    await run(Config.from_env())


async def run(config: Config) -> Outcome:
    from soko.platform.config import Settings

    workers, buyers, units = config.workers, config.buyers, config.units
    connections, rate, changed = config.connections, config.rate, config.tokens == "changed"
    url, redis_url = config.url, config.redis_url
    if config.tokens not in ("fresh", "changed"):
        raise SystemExit("BENCH_TOKENS is fresh or changed")
    if changed and workers < 2:
        raise SystemExit("BENCH_TOKENS=changed announces changes through Redis: BENCH_WORKERS > 1")
    if not url.startswith("postgresql"):
        raise SystemExit("the checkout benchmark runs on PostgreSQL (BENCH_DATABASE_URL)")
    if buyers <= units:
        raise SystemExit("BENCH_BUYERS must exceed BENCH_UNITS: some buyers must find it sold out")
    workdir = Path(tempfile.mkdtemp(prefix="soko-bench-checkout-"))
    database = loadgen.database_name(url)
    ttl = "86400"
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=workdir, database_url=url, secret_key=loadgen.SECRET_KEY,
        access_token_ttl_seconds=int(ttl),
    )  # fmt: skip
    print(
        f"setup         PostgreSQL database {database}, {workers} server process(es), "
        f"{os.cpu_count()} cores; {buyers} buyers, {units} units; capacity with {connections} "
        f"clients, latency at {f'{rate:.0f}/s' if rate > 0 else 'min(250/s, 70% of capacity)'}"
        f"; {loadgen.load_average()}"
    )
    await loadgen.recreate_database(url)
    started = time.perf_counter()
    store = await load(url, settings, buyers=buyers, units=units)
    print(f"loaded        in {time.perf_counter() - started:.1f} s")
    runs: list[Run] = []
    try:
        for strategy in config.strategies:
            if workers > 1:
                await loadgen.flush_redis(redis_url)
            # Each server's counters, summed over its processes: a directory of its own.
            metrics = workdir / f"metrics-{strategy}"
            metrics.mkdir()
            env = loadgen.server_env(
                workdir, url, workers=workers, redis_url=redis_url,
                extra={"SOKO_RESERVATION_STRATEGY": strategy,
                       "SOKO_ACCESS_TOKEN_TTL_SECONDS": ttl,
                       "PROMETHEUS_MULTIPROC_DIR": str(metrics)},
            )  # fmt: skip
            port = loadgen.free_port()
            starting = time.time()
            server = loadgen.start_soko(env, port, workers, log=workdir / "server.log")
            meter = loadgen.CpuMeter(server.pid, database)
            try:
                await loadgen.wait_ready(port, server)
                # Its processes listen for changes from their start on.
                listening = time.time()
                done = await warm_up(
                    url=url, port=port, store=store, workdir=workdir, connections=connections
                )
                print(f"-- {strategy}: warm-up, {done}")
                await asyncio.sleep(max(0.0, listening + config.trust_after - time.time()))
                await mint_tokens(settings, store.buyers)
                expect = _expected_source(changed, time.time(), starting, listening)
                for shape in config.shapes:
                    capacity = 0.0
                    for kind in config.kinds:
                        # Latency under a load the server can sustain: the goal rate, or
                        # 70% of the sustained rate just measured (answers and their
                        # background work) when that is lower. Above it the queue only
                        # grows, and latency says nothing more.
                        offered = rate if rate > 0 else GOALS["rate"]
                        if rate <= 0 and capacity:
                            offered = min(offered, 0.7 * capacity)
                        run = await one_run(
                            url=url, port=port, meter=meter, store=store, strategy=strategy,
                            shape=shape, kind=kind, workdir=workdir, connections=connections,
                            rate=offered, changed=changed, redis_url=redis_url,
                            expect=expect,
                        )  # fmt: skip
                        if kind == "capacity":
                            capacity = run.sustained_rate
                        print_run(run)
                        runs.append(run)
            finally:
                loadgen.stop_server(server)
    finally:
        if not config.keep:
            await loadgen.drop_database(url)
    met = report(runs, workers=workers)
    held = all(passed for one in runs for _, passed, _ in one.checks)
    return Outcome(held, met, runs)


def report(runs: list[Run], *, workers: int) -> bool:
    def find(strategy: str, shape: str, kind: str) -> Run | None:
        for run in runs:
            if (run.strategy, run.shape, run.kind) == (strategy, shape, kind):
                return run
        return None

    print(f"goals ({workers} process(es), {os.cpu_count()} cores; {loadgen.load_average()})")
    verdicts = []
    for strategy in dict.fromkeys(run.strategy for run in runs):
        hot = find(strategy, "hot", "capacity")
        spread = find(strategy, "spread", "capacity")
        at_rate = find(strategy, "hot", "at rate")
        lines = []
        if hot is not None:
            lines.append(
                (f"hot-SKU checkouts            {hot.checkout_rate:7.1f}/s",
                 hot.checkout_rate >= GOALS["rate"], f">= {GOALS['rate']:.0f}/s")
            )  # fmt: skip
        if hot is not None and spread is not None:
            ratio = hot.checkout_rate / spread.checkout_rate if spread.checkout_rate else 0.0
            lines.append(
                (f"hot / spread                 {ratio:7.2f}x ({spread.checkout_rate:.1f}/s "
                 "spread)", ratio >= GOALS["spread_ratio"], f">= {GOALS['spread_ratio']}")
            )  # fmt: skip
        if at_rate is not None:
            p99 = percentile([r[4] - r[3] for r in at_rate.sold_out], 99) * 1000
            lines.append(
                (f"sold out p99 at {at_rate.rate:5.0f}/s     {p99:7.1f} ms",
                 p99 < GOALS["sold_out_ms"], f"< {GOALS['sold_out_ms']:.0f} ms")
            )  # fmt: skip
        mine = [run for run in runs if run.strategy == strategy]
        unsold = all(passed for run in mine for _, passed, oversell in run.checks if oversell)
        answers = all(passed for run in mine for _, passed, oversell in run.checks if not oversell)
        lines.append((f"0 oversold in {len(mine)} runs", unsold, "every run"))
        lines.append(
            (f"answers, orders, carts and replays right in {len(mine)} runs", answers,
             "every run")
        )  # fmt: skip
        for label, passed, goal in lines:
            print(f"   {'PASS' if passed else 'FAIL'} {strategy:11} {label}   (goal {goal})")
            verdicts.append(passed)
    return all(verdicts)
