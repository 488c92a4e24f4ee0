from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import text

from soko.app import create_app
from soko.platform.clock import ManualClock
from soko.platform.logging import configure_logging
from soko.platform.outbox import MessageKind, add_message
from soko.platform.runtime import Runtime
from soko.platform.schema import migrations_location, revisions
from tests.conftest import make_settings

UNREACHABLE_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:1/postgres"
CLOSED_REDIS = "redis://127.0.0.1:1/0"


async def _client_for(runtime: Runtime) -> AsyncIterator[httpx2.AsyncClient]:
    transport = httpx2.ASGITransport(app=create_app(runtime=runtime))
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture
async def redis_runtime(
    tmp_path: Path, database_url: str, redis_url: str, redis_namespace: str
) -> AsyncIterator[Runtime]:
    settings = make_settings(
        tmp_path,
        database_url=database_url,
        redis_url=redis_url,
        cache_backend="redis",
        ratelimit_backend="redis",
        pubsub_backend="redis",
    )
    runtime = Runtime(settings, clock=ManualClock())
    try:
        yield runtime
    finally:
        await runtime.stop()


async def test_health_calls_no_dependency(tmp_path: Path) -> None:
    # Nothing behind this runtime answers, and liveness does not care.
    settings = make_settings(tmp_path, database_url=UNREACHABLE_POSTGRES, redis_url=CLOSED_REDIS)
    runtime = Runtime(settings)
    try:
        async for client in _client_for(runtime):
            response = await client.get("/health")
            assert response.status_code == 200
            assert response.json() == {"status": "ok"}
    finally:
        await runtime.stop()


async def test_ready_with_the_database_up(client: httpx2.AsyncClient, backend: str) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"]["database"]["status"] == "up"
    assert body["checks"]["database"]["backend"] == backend
    assert "redis" not in body["checks"]
    for name in ("cache", "rate_limits", "pubsub"):
        assert body["checks"][name] == {
            "status": "up",
            "backend": "memory",
            "latency_ms": body["checks"][name]["latency_ms"],
        }
    assert body["outbox"] == {"oldest_due_seconds": 0.0}


async def test_ready_reports_the_oldest_due_outbox_message_without_failing(
    client: httpx2.AsyncClient, runtime: Runtime, clock: ManualClock
) -> None:
    now = clock.now()
    async with runtime.db.transaction() as session:
        for due in (now - dt.timedelta(seconds=90), now - dt.timedelta(seconds=5)):
            await add_message(
                session,
                kind=MessageKind.job,
                name="test.health.job",
                payload={},
                available_at=due,
                created_at=now - dt.timedelta(seconds=120),
            )
        # Not due yet: does not count as waiting.
        await add_message(
            session,
            kind=MessageKind.job,
            name="test.health.later",
            payload={},
            available_at=now + dt.timedelta(hours=1),
            created_at=now,
        )
    response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json()["outbox"] == {"oldest_due_seconds": 90.0}

    clock.advance(30)
    assert (await client.get("/ready")).json()["outbox"] == {"oldest_due_seconds": 120.0}


@pytest.mark.redis
async def test_ready_with_redis_backends_up(redis_runtime: Runtime, backend: str) -> None:
    async for client in _client_for(redis_runtime):
        response = await client.get("/ready")
        body = response.json()
        assert response.status_code == 200, body
        assert body["checks"]["redis"]["status"] == "up"
        assert body["checks"]["database"]["backend"] == backend
        for name in ("cache", "rate_limits", "pubsub"):
            assert body["checks"][name]["status"] == "up"
            assert body["checks"][name]["backend"] == "redis"


def _assert_down(body: dict[str, Any], name: str) -> None:
    assert body["status"] == "unavailable"
    check = body["checks"][name]
    assert check["status"] == "down"
    assert check["error"]


async def test_ready_503_names_redis_when_it_is_down(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url=database_url, redis_url=CLOSED_REDIS)
    runtime = Runtime(settings)
    try:
        async for client in _client_for(runtime):
            response = await client.get("/ready")
            assert response.status_code == 503
            assert response.headers["content-type"] == "application/json"
            body = response.json()
            _assert_down(body, "redis")
            assert body["checks"]["database"]["status"] == "up"
            assert "127.0.0.1" not in response.text
    finally:
        await runtime.stop()


async def test_ready_503_names_the_database_when_it_is_unreachable(
    tmp_path: Path, backend: str
) -> None:
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{(tmp_path / 'missing' / 'dir' / 'soko.db').as_posix()}"
    else:
        url = UNREACHABLE_POSTGRES
    runtime = Runtime(make_settings(tmp_path, database_url=url))
    try:
        async for client in _client_for(runtime):
            response = await client.get("/ready")
            assert response.status_code == 503
            body = response.json()
            _assert_down(body, "database")
            assert body["checks"]["database"]["backend"] == backend
            assert body["checks"]["cache"]["status"] == "up"
            # Not read at all while the database is down: unknown, not wrong.
            assert body["checks"]["schema"] == {"status": "down", "error": "the database is down"}
            # Unreadable, so unknown; and still not what made readiness fail.
            assert body["outbox"] == {"oldest_due_seconds": None}
            assert "missing" not in response.text and "127.0.0.1" not in response.text
            # The API says so too: 503 with a retry, not a 500 that reads like a bug.
            stream = io.StringIO()
            configure_logging(runtime.settings, stream=stream)
            for answer in (
                await client.get("/api/v1/products"),
                await client.post("/api/v1/carts"),
            ):
                assert answer.status_code == 503, answer.text
                assert answer.headers["content-type"] == "application/problem+json"
                assert answer.json()["type"] == "/problems/service-unavailable"
                assert answer.headers["retry-after"] == "5"
                assert "missing" not in answer.text and "127.0.0.1" not in answer.text
            lines = [json.loads(line) for line in stream.getvalue().splitlines() if line]
            logged = [line for line in lines if line["logger"] == "soko.http"]
            assert [line["event"] for line in logged] == ["database unavailable"] * 2
            assert all(line["level"] == "warning" and "exception" not in line for line in logged)
    finally:
        await runtime.stop()


def test_only_outages_count_as_the_database_being_unavailable() -> None:
    from sqlalchemy.exc import IntegrityError, OperationalError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from soko.platform.db import database_unavailable

    class PgError(Exception):
        def __init__(self, message: str, sqlstate: str) -> None:
            super().__init__(message)
            self.sqlstate = sqlstate

    def wrapped(orig: Exception, *, invalidated: bool = False) -> OperationalError:
        return OperationalError("SELECT 1", {}, orig, connection_invalidated=invalidated)

    for outage in (
        wrapped(PgError("terminating connection due to administrator command", "57P01")),
        wrapped(PgError("connection failure", "08006")),
        wrapped(PgError('database "soko" does not exist', "3D000")),
        wrapped(PgError("sorry, too many clients already", "53300")),
        wrapped(ConnectionRefusedError("refused")),
        wrapped(Exception("whatever it says"), invalidated=True),
        wrapped(Exception("database is locked")),
        PoolTimeout("QueuePool limit reached"),
        ConnectionResetError("reset by peer"),
    ):
        assert database_unavailable(outage), outage
    for bug in (
        # A statement cancelled (its timeout) is no outage: statement_cancelled says so.
        wrapped(PgError("canceling statement due to statement timeout", "57014")),
        wrapped(PgError('relation "x" does not exist', "42P01")),
        wrapped(PgError("division by zero", "22012")),
        IntegrityError("INSERT", {}, PgError("duplicate key", "23505")),
        ValueError("not a database error"),
    ):
        assert database_unavailable(bug) is None, bug


# -- the schema: what soko migrate upgrade recorded, against what this build needs ----------------


async def _record_revision(runtime: Runtime, revision: str | None) -> None:
    async with runtime.db.engine.begin() as connection:
        await connection.execute(text("DELETE FROM alembic_version"))
        if revision is not None:
            await connection.execute(
                text("INSERT INTO alembic_version (version_num) VALUES (:r)"), {"r": revision}
            )


async def test_ready_names_the_schema_this_build_needs(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    expected = revisions()
    older = next(iter(expected.known - {expected.head}))
    try:
        current = (await client.get("/ready")).json()
        assert current["checks"]["schema"] == {
            "status": "up",
            "state": "current",
            "revision": expected.head,
            "expected": expected.head,
        }
        # A release behind: every request would fail, so no traffic, and the answer
        # names the command that cures it.
        await _record_revision(runtime, older)
        behind = await client.get("/ready")
        assert behind.status_code == 503
        schema = behind.json()["checks"]["schema"]
        assert (schema["status"], schema["state"], schema["revision"]) == ("down", "behind", older)
        assert "soko migrate upgrade" in schema["error"]
        # Never migrated at all.
        await _record_revision(runtime, None)
        empty = await client.get("/ready")
        assert empty.status_code == 503
        assert empty.json()["checks"]["schema"]["state"] == "unmigrated"
        # Newer than this build (its migrations run first in a rolling deploy): ready.
        await _record_revision(runtime, "f00dfeedbeef")
        ahead = await client.get("/ready")
        assert ahead.status_code == 200
        assert ahead.json()["checks"]["schema"]["state"] == "ahead"
    finally:
        await _record_revision(runtime, expected.head)


async def test_a_database_never_migrated_is_not_ready_and_says_so_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, database_url=f"sqlite+aiosqlite:///{tmp_path / 'new.db'}")
    runtime = Runtime(settings)
    try:
        await runtime.start(run_dispatcher=False)
        assert "run `soko migrate upgrade`" in caplog.text
        async for client in _client_for(runtime):
            response = await client.get("/ready")
            assert response.status_code == 503
            assert response.json()["checks"]["schema"]["state"] == "unmigrated"
            assert response.json()["checks"]["database"]["status"] == "up"
            # A request reaching a table that is not there: the service is not ready,
            # not broken (503 with a retry, not a 500 and a traceback).
            stream = io.StringIO()
            configure_logging(settings, stream=stream)
            products = await client.get("/api/v1/products")
            assert products.status_code == 503, products.text
            assert products.headers["content-type"] == "application/problem+json"
            assert products.json()["type"] == "/problems/service-unavailable"
            assert products.headers["retry-after"] == "60"
            lines = [json.loads(line) for line in stream.getvalue().splitlines() if line]
            [line] = [line for line in lines if line["logger"] == "soko.http"]
            assert line["event"] == "database schema not ready: run `soko migrate upgrade`"
            assert line["level"] == "error" and "exception" not in line
            assert "no such table" in line["error"]
    finally:
        await runtime.stop()


def test_the_build_expects_the_newest_migration() -> None:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(migrations_location()))
    assert revisions().head == scripts.get_current_head()
    assert revisions().known == {script.revision for script in scripts.walk_revisions()}


async def test_probes_share_one_round_of_checks_and_reuse_its_answer(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/ready is never rate limited, so a flood of probes must not become a flood of
    checks: concurrent probes share one round, and its answer is reused for a while."""
    from soko.platform import health

    runtime = Runtime(make_settings(tmp_path, database_url=database_url, ready_reuse_seconds=60))
    rounds = 0
    check = health._check_readiness

    async def counted(rt: Any) -> Any:
        nonlocal rounds
        rounds += 1
        await asyncio.sleep(0.05)  # long enough for the other probes to arrive
        return await check(rt)

    monkeypatch.setattr(health, "_check_readiness", counted)
    try:
        async for client in _client_for(runtime):
            answers = await asyncio.gather(*(client.get("/ready") for _ in range(20)))
            assert [answer.status_code for answer in answers] == [200] * 20
            assert rounds == 1
            assert len({answer.text for answer in answers}) == 1
            for _ in range(10):
                assert (await client.get("/ready")).status_code == 200
            assert rounds == 1  # reused: within the 60 s it may be
    finally:
        await runtime.stop()
