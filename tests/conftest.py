"""Shared fixtures: every database test runs on SQLite and, when reachable, PostgreSQL.

Set ``SOKO_TEST_POSTGRES_URL`` / ``SOKO_TEST_REDIS_URL`` to point at other servers, and
``SOKO_TEST_REQUIRE_SERVICES=1`` (as CI does) to fail rather than skip when one of them
cannot be reached.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import httpx2
import hypothesis
import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from soko.app import create_app, load_handlers, load_models
from soko.platform.cache import RedisCache
from soko.platform.clock import ManualClock
from soko.platform.config import Settings
from soko.platform.db import Base, create_engine
from soko.platform.runtime import Runtime
from soko.platform.schema import create_current_schema

POSTGRES_URL = os.environ.get(
    "SOKO_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("SOKO_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REQUIRE_SERVICES = os.environ.get("SOKO_TEST_REQUIRE_SERVICES") == "1"
TEST_SECRET = "test-secret-key-that-is-long-enough-0123456789"

load_models()
load_handlers()

# Examples are judged by what they assert, never by how long they took: a test machine
# running two workers beside PostgreSQL and Redis stalls now and then, which is not a
# failure of the code under test.
hypothesis.settings.register_profile("soko", deadline=None)
hypothesis.settings.load_profile("soko")


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url.replace("+asyncpg", ""))
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 1
        ):
            return True
    except OSError:
        return False


POSTGRES_UP = _reachable(POSTGRES_URL, 5432)
REDIS_UP = _reachable(REDIS_URL, 6379)


def _unavailable(what: str) -> None:
    message = f"{what} is not reachable"
    if REQUIRE_SERVICES:
        pytest.fail(message + " and SOKO_TEST_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(message)


def _run_in_thread(factory: Any) -> None:
    """Run ``factory()``'s coroutine to completion on a fresh loop in another thread, so
    session fixtures can set up databases even when asked for from inside a running loop."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(factory())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def _worker_suffix() -> str:
    # The pid keeps two test runs on one machine (or one CI box) from sharing a database.
    return f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}_{os.getpid()}"


@pytest.fixture(scope="session")
def postgres_test_url() -> Iterator[str]:
    """A database of its own for this test process, with the schema created once."""
    if not POSTGRES_UP:
        _unavailable("PostgreSQL")
    name = f"soko_test_{_worker_suffix()}"
    admin_url = POSTGRES_URL

    async def setup() -> None:
        engine = create_engine(admin_url)
        async with engine.connect() as conn:
            auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await auto.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            await auto.execute(text(f'CREATE DATABASE "{name}"'))
        await engine.dispose()
        test_engine = create_engine(_with_database(admin_url, name))
        async with test_engine.begin() as conn:
            await conn.run_sync(create_current_schema)
        await test_engine.dispose()

    _run_in_thread(setup)
    yield _with_database(admin_url, name)

    async def teardown() -> None:
        engine = create_engine(admin_url)
        async with engine.connect() as conn:
            auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await auto.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await engine.dispose()

    _run_in_thread(teardown)


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def _filled_tables_query() -> str:
    """One statement naming, by position in ``Base.metadata.sorted_tables``, each table
    that holds a row."""
    return " UNION ALL ".join(
        f'SELECT {index} WHERE EXISTS (SELECT 1 FROM "{table.name}")'
        for index, table in enumerate(Base.metadata.sorted_tables)
    )


_FILLED = _filled_tables_query()


async def _empty_all(engine: AsyncEngine) -> None:
    """Delete every row of every table. A test fills a few tables of the fifty-odd, and
    emptying only those, children before parents, takes a millisecond or two where a
    TRUNCATE of every table took a few hundred (each truncated table gets new files);
    should that order fail (a cycle of foreign keys), everything is truncated."""
    tables = Base.metadata.sorted_tables
    try:
        async with engine.begin() as conn:
            filled = (await conn.scalars(text(_FILLED))).all()
            for index in sorted(filled, reverse=True):  # children before parents
                await conn.execute(text(f'DELETE FROM "{tables[index].name}"'))
    except DBAPIError:
        names = ", ".join(f'"{table.name}"' for table in tables)
        async with engine.begin() as conn:
            await conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite database file with the current schema, created once for this test
    process; each test gets a copy (creating the schema took a tenth of a second)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "schema.db"

    async def create() -> None:
        engine = create_engine(f"sqlite+aiosqlite:///{path.as_posix()}")
        async with engine.begin() as conn:
            await conn.run_sync(create_current_schema)
        await engine.dispose()

    _run_in_thread(create)
    # The last connection closed checkpoints the journal into the file: the file alone
    # is the whole database.
    leftovers = [p.name for p in path.parent.iterdir() if p != path]
    assert not leftovers, leftovers
    return path


def _backends() -> list[Any]:
    return ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]


@pytest.fixture(params=_backends())
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def database_url(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    """An empty database with the current schema, on the parametrized backend."""
    if backend == "sqlite":
        path = tmp_path / "test.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path.as_posix()}"
        return
    url = request.getfixturevalue("postgres_test_url")
    yield url
    engine = create_engine(url)
    try:
        await _empty_all(engine)
    finally:
        await engine.dispose()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def still_limiter_clock(monkeypatch: pytest.MonkeyPatch) -> float:
    """Holds the in-memory rate limiter's clock one second into the current minute.

    Its windows are minutes of the wall clock, and a sliding window weighs the last
    minute's hits down as the new one goes on: hits counted on both sides of a minute's
    turn would leave a request let through that a test expects refused. (Redis windows
    start at their first hit, so they need no holding.)"""
    import limits.aio.storage.memory
    import limits.aio.strategies

    frozen = float(int(time.time()) // 60 * 60 + 1)
    still = SimpleNamespace(time=lambda: frozen)
    for module in (limits.aio.storage.memory, limits.aio.strategies):
        monkeypatch.setattr(module, "time", still)
    return frozen


@contextmanager
def sql_statements(runtime: Runtime, *, leaving_out: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """Every statement sent to ``runtime``'s database inside the block (BEGIN included
    where the driver sends it as one), but those starting with one of ``leaving_out``
    (upper-case keywords, compared with the statement's own upper-cased start)."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not (leaving_out and statement.lstrip().upper().startswith(leaving_out)):
            sent.append(statement)

    engine = runtime.db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "test",
        "data_dir": tmp_path / "data",
        "secret_key": TEST_SECRET,
        "log_format": "json",
        "outbox_poll_seconds": 0.05,
        # In-process hashing: a runtime per test would otherwise start a worker process
        # each. The worker processes have tests of their own (test_passwords.py, and
        # the served app in test_serve_e2e.py).
        "password_hash_pool": "thread",
        # Every probe checks again: tests change what /ready reports between probes.
        "ready_reuse_seconds": 0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return make_settings(tmp_path, database_url=database_url)


@pytest.fixture
async def runtime(settings: Settings, clock: ManualClock) -> AsyncIterator[Runtime]:
    """The process services over the test database; the dispatcher is not started."""
    rt = Runtime(settings, clock=clock)
    try:
        yield rt
    finally:
        await rt.stop()


@pytest.fixture
async def app(runtime: Runtime) -> Any:
    return create_app(runtime=runtime)


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx2.AsyncClient]:
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.fixture
def redis_url() -> str:
    """The test Redis server. Tests share it with other test processes, so everything a
    test writes goes under its own ``redis_namespace`` prefix."""
    if not REDIS_UP:
        _unavailable("Redis")
    return REDIS_URL


@pytest.fixture
async def redis_namespace(redis_url: str) -> AsyncIterator[str]:
    """A key prefix unique to this test; its keys are deleted afterwards."""
    from redis.asyncio import Redis

    namespace = f"sokotest:{uuid.uuid4().hex[:12]}:"
    yield namespace
    redis = Redis.from_url(redis_url)
    try:
        async for key in redis.scan_iter(match=f"{namespace}*", count=500):
            await redis.delete(key)
    finally:
        await redis.aclose()


@asynccontextmanager
async def processes_over_one_redis(
    tmp_path: Path, database_url: str, redis_url: str, like: Runtime, count: int = 2
) -> AsyncIterator[list[Runtime]]:
    """``count`` runtimes standing for API processes over one database and one Redis
    cache namespace of their own (emptied afterwards), with ``like``'s clock and signing
    keys."""
    namespace = f"sokotest:{uuid.uuid4().hex[:12]}:cache:"
    processes: list[Runtime] = []
    try:
        for number in range(count):
            settings = make_settings(
                tmp_path / f"process-{number}",
                database_url=database_url,
                redis_url=redis_url,
                cache_backend="redis",
            )
            process = Runtime(settings, clock=like.clock)
            process.signing_keys = like.signing_keys
            process.cache = RedisCache(process.redis, namespace=namespace, clock=process.clock)
            processes.append(process)
        yield processes
    finally:
        if processes:
            async for key in processes[0].redis.scan_iter(match=f"{namespace}*", count=500):
                await processes[0].redis.delete(key)
        for process in processes:
            await process.stop()
