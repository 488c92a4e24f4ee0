"""CPU per request, one request at a time through the ASGI app in this process: what each
answer costs the API process, the figure that decides how many answers two cores hold.

Throughput on a shared virtual machine moves with its neighbours (time the hypervisor
gives other guests, a busy host); the process CPU of one request at a time moves far
less, so a change that saves a tenth of a millisecond shows here when the load
benchmarks cannot tell it from noise. For each kind of request it prints the median and
p90 of the process CPU (``time.process_time``), the SQL statements and the Redis
commands each request sent (with the background work the requests start, which the
in-process dispatcher runs between them: a sign-in's events, for one), and the Python
function calls each request made (counted by cProfile in a pass of its own: the work
done, which a busy machine does not move):

- ``GET /api/v1/products?limit=20``, uncached (the runtime's cache calls through, as in
  the catalog benchmark), cached (a near copy), and cached for a client that accepts
  gzip, as browsers and mobile HTTP libraries do;
- ``GET /api/v1/me`` with one access token, as a client sends it all its life;
- ``POST /api/v1/auth/login``: the API process's share only, the Argon2id verification
  runs in a hashing worker process of its own (``SOKO_PASSWORD_HASH_POOL=process``);
- ``POST /api/v1/checkout`` of a one-line cart, answered 201 (in a database of its own,
  loaded as the checkout benchmark loads it, every buyer new to the process), with no job
  run in between; then the background work one order leaves behind (its ``order.placed``
  event and the jobs that follow), run by the outbox dispatcher after each checkout and
  measured alone.

The app is configured as ``soko serve`` with several processes configures it: PostgreSQL
(a database of its own, dropped and created again: ``BENCH_DATABASE_URL``, default
``soko_bench_cpu``) and Redis for the cache, the rate limits and the change channel
(``BENCH_REDIS_URL``, default database 11, emptied). ``BENCH_REQUESTS`` (default 1000) of
each kind after a warm-up; ``BENCH_PRODUCTS`` (default 2000) in the catalog.
``BENCH_PROFILE_DIR`` names a directory to write the counting pass of each kind to, as
``<kind>.pstats``, ``get-me.pstats`` say (read it with ``python -m pstats``).

The access tokens of ``GET /api/v1/me`` and of the checkouts are issued 34 s after
their app started listening for changes (``TRUST_AFTER``: the leeway, the issuer's
delay and a margin), as a client's token is in a process that has run a while: the app
takes their claims as issued, with no read of the session's state (ADR 0019). The run
waits for that.

    .venv/bin/python -m bench request_cpu
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import os
import pstats
import re
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.catalog import CallThroughCache, load_catalog
from bench.checkout import TRUST_AFTER, mint_tokens
from bench.signin import PASSWORD, create_customers

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/soko_bench_cpu"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/11"
USERS = 50
USER_AGENT = b"Mozilla/5.0 (Linux; Android 13; bench) Chrome/120.0 Mobile"


@dataclass
class Config:
    requests: int = 1000
    products: int = 2000
    url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    # Seconds from the app's start after which its tokens are issued (see _trusted_from).
    trust_after: float = TRUST_AFTER

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ.get
        return cls(
            requests=int(env("BENCH_REQUESTS", "1000")),
            products=int(env("BENCH_PRODUCTS", "2000")),
            url=env("BENCH_DATABASE_URL") or DEFAULT_DATABASE_URL,
            redis_url=env("BENCH_REDIS_URL") or DEFAULT_REDIS_URL,
        )


@dataclass
class Measured:
    name: str
    cpu_ms: list[float]
    statements: float
    redis_commands: float
    python_calls: float
    statuses: set[int]


class _Asgi:
    """Calls the app the way uvicorn does, without a socket."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(
        self, method: str, path: str, *, body: bytes = b"", headers: tuple[Any, ...] = ()
    ) -> tuple[int, bytes]:
        sent: list[dict[str, Any]] = []
        target, _, query = path.partition("?")

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": target,
            "raw_path": target.encode(),
            "query_string": query.encode(),
            "headers": [
                (b"host", b"127.0.0.1:8000"),
                (b"user-agent", USER_AGENT),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "root_path": "",
            "state": {},
        }
        await self.app(scope, receive, send)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return status, content


async def _redis_commands(redis: Any) -> int:
    stats = await redis.info("commandstats")
    # Everything Redis ran, the commands inside scripts included; minus this INFO itself.
    return sum(int(entry["calls"]) for entry in stats.values())


Request = Callable[[int], Awaitable[tuple[int, bytes]]]

# Passes of each measurement besides the measured one: a warm-up (statements prepared,
# copies kept) and the pass cProfile counts calls in; for requests, then for the
# background work they leave.
WARM_UP, PROFILED = 50, 200
BACKGROUND_WARM_UP, BACKGROUND_PROFILED = 20, 100


@contextmanager
def _counting_statements(runtime: Any) -> Iterator[list[int]]:
    """``[n]``: the SQL statements the runtime's engine sends while the block runs."""
    from sqlalchemy import event

    counter = [0]

    def counted(*_args: Any) -> None:
        counter[0] += 1

    engine = runtime.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", counted)
    try:
        yield counter
    finally:
        event.remove(engine, "before_cursor_execute", counted)


async def _measure(name: str, runtime: Any, count: int, request: Request) -> Measured:
    for number in range(min(WARM_UP, count)):
        await request(number)
    commands_before = await _redis_commands(runtime.redis)
    cpu: list[float] = []
    statuses: set[int] = set()
    with _counting_statements(runtime) as statements:
        for number in range(count):
            began = time.process_time()
            status, _ = await request(number)
            cpu.append((time.process_time() - began) * 1000)
            statuses.add(status)
    commands = await _redis_commands(runtime.redis) - commands_before - 1
    # Python function calls per request, counted by cProfile in a pass of its own (it
    # slows what it counts): a figure of the work done that a busy machine does not move.
    profiled = max(1, min(PROFILED, count))
    profile = cProfile.Profile()
    profile.enable()
    try:
        for number in range(profiled):
            await request(number)
    finally:
        profile.disable()
    calls = pstats.Stats(profile).total_calls / profiled  # type: ignore[attr-defined]
    _keep_profile(name, profile)
    return Measured(name, cpu, statements[0] / count, commands / count, calls, statuses)


async def _create_users(runtime: Any) -> list[str]:
    from soko.identity.passwords import password_hasher

    emails = [f"cpu-{index}@example.com" for index in range(USERS)]
    await create_customers(runtime, emails, await password_hasher(runtime).hash(PASSWORD))
    return emails


def _login_body(email: str) -> bytes:
    return json.dumps({"identifier": email, "password": PASSWORD}).encode()


def _app_with_environment(env: dict[str, str]) -> Any:
    """Soko's app with its settings read from ``env`` (the environment is put back
    afterwards, so benchmarks run after this one do not inherit it)."""
    from soko.app import create_app_from_env

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return create_app_from_env()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _keep_profile(name: str, profile: cProfile.Profile) -> None:
    """Write ``profile`` to ``BENCH_PROFILE_DIR``, when set (created if missing), as
    ``<kind>.pstats``."""
    if directory := os.environ.get("BENCH_PROFILE_DIR"):
        kind = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")  # get-me, ...
        Path(directory).mkdir(parents=True, exist_ok=True)
        profile.dump_stats(Path(directory) / f"{kind}.pstats")


async def _trusted_from(runtime: Any, at: float) -> None:
    """Wait until ``at``, the process listening for changes meanwhile: a token issued
    from then on, more than the leeway after the listening began, is taken as issued
    (ADR 0019), as a client's token is in a process that has run for a while."""
    runtime.cache.listen()  # the app's start did; a cache swapped in since may not have
    await asyncio.sleep(max(0.0, at - time.time()))


async def _measure_background(name: str, runtime: Any, count: int, place: Request) -> Measured:
    """The CPU, statements, Redis commands and Python calls of the background work one
    request leaves: ``place`` runs unmeasured, then the outbox dispatcher runs until
    nothing is due, measured alone."""
    dispatcher = runtime.dispatcher
    for number in range(min(BACKGROUND_WARM_UP, count)):
        await place(number)
        await dispatcher.run_until_idle()
    cpu: list[float] = []
    statements = commands = 0
    for number in range(count):
        await place(number)
        before = await _redis_commands(runtime.redis)
        with _counting_statements(runtime) as counted:
            began = time.process_time()
            await dispatcher.run_until_idle()
            cpu.append((time.process_time() - began) * 1000)
        statements += counted[0]
        commands += await _redis_commands(runtime.redis) - before - 1
    profiled = max(1, min(BACKGROUND_PROFILED, count))
    profile = cProfile.Profile()
    for number in range(profiled):
        await place(number)
        profile.enable()
        try:
            await dispatcher.run_until_idle()
        finally:
            profile.disable()
    calls = pstats.Stats(profile).total_calls / profiled  # type: ignore[attr-defined]
    _keep_profile(name, profile)
    return Measured(name, cpu, statements / count, commands / count, calls, set())


async def _checkouts(config: Config, workdir: Path) -> list[Measured]:
    """A checkout answered 201, and the background work of its order, in a database of
    their own (``<BENCH_DATABASE_URL>_checkout``, dropped afterwards)."""
    from bench import checkout as checkout_bench
    from soko.platform.config import Settings

    url = f"{config.url}_checkout"
    count = max(1, config.requests // 4)
    # A buyer for every checkout of every pass of both kinds: each places one order.
    passes = (WARM_UP, PROFILED, BACKGROUND_WARM_UP, BACKGROUND_PROFILED)
    buyers = 2 * count + sum(min(extra, count) for extra in passes)
    ttl = "86400"
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, data_dir=workdir, database_url=url, secret_key=loadgen.SECRET_KEY,
        access_token_ttl_seconds=int(ttl),
    )  # fmt: skip
    await loadgen.recreate_database(url)
    try:
        store = await checkout_bench.load(url, settings, buyers=buyers, units=buyers)
        cart_ids = await checkout_bench.reset(url, store, "hot")
        env = loadgen.server_env(
            workdir, url, workers=2, redis_url=config.redis_url,
            extra={"SOKO_OUTBOX_DISPATCH": "worker", "SOKO_ACCESS_TOKEN_TTL_SECONDS": ttl},
        )  # fmt: skip
        app = _app_with_environment(env)
        call = _Asgi(app)
        unused = iter(range(buyers))

        def checkout(_number: int) -> Awaitable[tuple[int, bytes]]:
            index = next(unused)
            headers = (
                (b"authorization", f"Bearer {store.buyers[index].token}".encode()),
                (b"idempotency-key", f"cpu-{index}".encode()),
            )
            body = json.dumps({"cart_id": cart_ids[index]}).encode()
            return call("POST", "/api/v1/checkout", body=body, headers=headers)

        async def placed(number: int) -> tuple[int, bytes]:
            status, body = await checkout(number)
            if status != 201:
                raise SystemExit(f"checkout answered {status}: {body[:200]!r}")
            return status, body

        async with app.router.lifespan_context(app):
            runtime = app.state.runtime
            await _trusted_from(runtime, time.time() + config.trust_after)
            await mint_tokens(settings, store.buyers)
            answered = await _measure("checkout (201, API)", runtime, count, checkout)
            background = await _measure_background(
                "an order's background work", runtime, count, placed
            )
        if answered.statuses != {201}:
            raise SystemExit(f"checkouts answered {sorted(answered.statuses)}, not only 201")
        return [answered, background]
    finally:
        await loadgen.drop_database(url)


async def main(_argv: list[str]) -> None:
    await run(Config.from_env())


async def run(config: Config) -> list[Measured]:
    if not config.url.startswith("postgresql"):
        raise SystemExit("the request CPU benchmark runs on PostgreSQL (BENCH_DATABASE_URL)")
    workdir = Path(tempfile.mkdtemp(prefix="soko-bench-cpu-"))
    await loadgen.recreate_database(config.url)
    await loadgen.flush_redis(config.redis_url)
    try:
        await load_catalog(config.url, config.products)
        env = loadgen.server_env(workdir, config.url, workers=2, redis_url=config.redis_url)
        env["SOKO_LOGIN_RATE_LIMIT"] = "1000000/minute"
        # The in-process dispatcher still runs at once when a request's writes wake it (a
        # sign-in's events); it does not poll an idle outbox every second in the middle
        # of a measurement, a statement no request caused.
        env["SOKO_OUTBOX_POLL_SECONDS"] = "60"
        app = _app_with_environment(env)
        call = _Asgi(app)
        results: list[Measured] = []
        async with app.router.lifespan_context(app):
            runtime = app.state.runtime
            trusted_from = time.time() + config.trust_after
            emails = await _create_users(runtime)
            page = "/api/v1/products?limit=20"
            count = config.requests

            def get(path: str, headers: tuple[Any, ...] = ()) -> Request:
                return lambda _number: call("GET", path, headers=headers)

            def sign_in(number: int) -> Awaitable[tuple[int, bytes]]:
                email = emails[number % len(emails)]
                return call("POST", "/api/v1/auth/login", body=_login_body(email))

            shared = runtime.cache
            runtime.cache = CallThroughCache()
            try:
                results.append(await _measure("catalog page, uncached", runtime, count, get(page)))
            finally:
                runtime.cache = shared
            results.append(await _measure("catalog page, cached", runtime, count, get(page)))
            gzip = ((b"accept-encoding", b"gzip, deflate, br"),)
            results.append(
                await _measure("catalog page, cached, gzip", runtime, count, get(page, gzip))
            )
            await _trusted_from(runtime, trusted_from)
            status, body = await call("POST", "/api/v1/auth/login", body=_login_body(emails[0]))
            if status != 200:
                raise SystemExit(f"sign-in answered {status}: {body[:200]!r}")
            bearer = ((b"authorization", f"Bearer {json.loads(body)['access_token']}".encode()),)
            me = get("/api/v1/me", bearer)
            results.append(await _measure("GET /me", runtime, count, me))
            quarter = max(1, count // 4)
            results.append(await _measure("sign-in (API process only)", runtime, quarter, sign_in))
        results.extend(await _checkouts(config, workdir))
    finally:
        await loadgen.drop_database(config.url)
        await loadgen.flush_redis(config.redis_url)
    report(results)
    return results


def report(results: list[Measured]) -> None:
    print(
        f"{'request':<28} {'CPU median':>10} {'p90':>8} {'SQL':>6} {'Redis':>6} "
        f"{'Python calls':>12}  statuses"
    )
    for measured in results:
        ordered = sorted(measured.cpu_ms)
        p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
        print(
            f"{measured.name:<28} {statistics.median(ordered):>7.2f} ms {p90:>5.2f} ms "
            f"{measured.statements:>6.1f} {measured.redis_commands:>6.1f} "
            f"{measured.python_calls:>12,.0f}  {sorted(measured.statuses)}"
        )
    print("(CPU of this process per request, one at a time; SQL statements and Redis commands")
    print(" per request, with the background work the requests start and the commands inside")
    print(" Redis scripts included; Python function calls per request, counted by cProfile)")
