"""PostgreSQL's statement and idle-in-transaction timeouts, set on every connection of a
runtime: a statement that runs too long is cancelled and its request answered 503, a
session left idle in a transaction is ended, and the pool goes on serving."""

from __future__ import annotations

import asyncio
import io
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi import APIRouter
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from soko.app import create_app
from soko.platform.db import (
    create_engine,
    database_unavailable,
    lift_statement_timeout,
    statement_cancelled,
)
from soko.platform.logging import configure_logging
from soko.platform.runtime import Runtime
from tests.conftest import POSTGRES_URL, make_settings


@pytest.fixture
def postgresql(backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("statement_timeout and idle_in_transaction_session_timeout are PostgreSQL's")


# An idle limit that short is allowed only below outbound calls as short.
SHORT_OUTBOUND_CALLS = {
    "payment_http_timeout_seconds": 0.5,
    "payment_http_retries": 1,
    "notifications_http_timeout_seconds": 0.5,
    "webhooks_timeout_seconds": 0.5,
}


@asynccontextmanager
async def _running(tmp_path: Path, database_url: str, **overrides: Any) -> AsyncIterator[Runtime]:
    runtime = Runtime(make_settings(tmp_path, database_url=database_url, **overrides))
    try:
        yield runtime
    finally:
        await runtime.stop()


@pytest.fixture
async def short_runtime(
    tmp_path: Path, database_url: str, postgresql: None
) -> AsyncIterator[Runtime]:
    """A statement timeout of a second: short, yet long enough that no statement but a
    sleep meets it on a loaded test machine. No idle limit: a test's own stall between
    two statements is no failure."""
    async with _running(
        tmp_path,
        database_url,
        database_statement_timeout_seconds=1.0,
        database_idle_in_transaction_timeout_seconds=0,
    ) as runtime:
        yield runtime


async def _shown(runtime: Runtime, name: str) -> str:
    async with runtime.db.engine.connect() as connection:
        return str(await connection.scalar(text(f"SHOW {name}")))


async def test_every_connection_carries_the_default_timeouts(
    tmp_path: Path, database_url: str, postgresql: None
) -> None:
    async with _running(tmp_path, database_url) as runtime:
        assert await _shown(runtime, "statement_timeout") == "30s"
        assert await _shown(runtime, "idle_in_transaction_session_timeout") == "5min"


async def test_zero_leaves_the_servers_own_setting(
    tmp_path: Path, database_url: str, postgresql: None
) -> None:
    async with _running(
        tmp_path,
        database_url,
        database_statement_timeout_seconds=0,
        database_idle_in_transaction_timeout_seconds=0,
    ) as runtime:
        # The test server's own: no limit.
        assert await _shown(runtime, "statement_timeout") == "0"
        assert await _shown(runtime, "idle_in_transaction_session_timeout") == "0"


async def test_an_engine_made_without_them_sets_neither(
    database_url: str, postgresql: None
) -> None:
    # As `soko audit verify` makes its engine (the migrations lift any limit besides).
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            assert await connection.scalar(text("SHOW statement_timeout")) == "0"
    finally:
        await engine.dispose()


async def test_a_statement_past_its_time_is_cancelled_and_not_taken_for_an_outage(
    short_runtime: Runtime,
) -> None:
    with pytest.raises(DBAPIError) as raised:
        async with short_runtime.db.transaction() as session:
            await session.execute(text("SELECT pg_sleep(10)"))
    reason = statement_cancelled(raised.value)
    assert reason is not None and "statement timeout" in reason
    assert database_unavailable(raised.value) is None  # not an outage
    # The connection went back to the pool whole: the next statement is served.
    async with short_runtime.db.transaction() as session:
        assert await session.scalar(text("SELECT 1")) == 1


async def test_a_session_idle_in_its_transaction_is_ended_and_the_pool_recovers(
    tmp_path: Path, database_url: str, postgresql: None
) -> None:
    async with _running(
        tmp_path,
        database_url,
        database_statement_timeout_seconds=0,
        database_idle_in_transaction_timeout_seconds=1.0,
        **SHORT_OUTBOUND_CALLS,
    ) as runtime:
        with pytest.raises(DBAPIError) as raised:
            async with runtime.db.transaction() as session:
                await session.execute(text("SELECT 1"))
                await asyncio.sleep(2.5)  # idle inside the transaction, past its second
                await session.execute(text("SELECT 2"))
        assert database_unavailable(raised.value) is not None
        assert statement_cancelled(raised.value) is None
        for _ in range(3):
            async with runtime.db.transaction() as session:
                assert await session.scalar(text("SELECT 3")) == 3


async def test_a_request_whose_statement_runs_too_long_is_answered_503(
    short_runtime: Runtime,
) -> None:
    router = APIRouter(prefix="/api/v1/test")

    @router.get("/slow")
    async def slow() -> dict[str, bool]:
        async with short_runtime.db.transaction(read_only=True) as session:
            await session.execute(text("SELECT pg_sleep(10)"))
        return {"ok": True}

    @router.get("/quick")
    async def quick() -> dict[str, int]:
        async with short_runtime.db.transaction(read_only=True) as session:
            return {"one": int(await session.scalar(text("SELECT 1")) or 0)}

    app = create_app(runtime=short_runtime)
    app.include_router(router)
    stream = io.StringIO()
    configure_logging(short_runtime.settings, stream=stream)
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as client:
        answer = await client.get("/api/v1/test/slow")
        assert answer.status_code == 503, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["type"] == "/problems/database-timeout"
        # Not an outage to come back after: the same request would meet the same limit.
        assert "retry-after" not in answer.headers
        assert "pg_sleep" not in answer.text and "timeout" not in answer.json()["detail"]
        assert (await client.get("/api/v1/test/quick")).json() == {"one": 1}
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line]
    logged = [line for line in lines if line["logger"] == "soko.http"]
    assert [(line["event"], line["level"]) for line in logged] == [
        ("database statement cancelled", "error")
    ]
    assert logged[0]["path"] == "/api/v1/test/slow" and "exception" not in logged[0]
    assert "statement timeout" in logged[0]["error"] and "pg_sleep" not in logged[0]["error"]


@pytest.mark.parametrize(
    "name", ["database_statement_timeout_seconds", "database_idle_in_transaction_timeout_seconds"]
)
def test_the_timeouts_are_checked(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValidationError):
        make_settings(tmp_path, **{name: -1})
    with pytest.raises(ValidationError):
        make_settings(tmp_path, **{name: 86401})
    assert getattr(make_settings(tmp_path, **{name: 0}), name) == 0


def test_the_idle_limit_outlasts_every_outbound_call_a_job_makes(tmp_path: Path) -> None:
    # A job calls a payment provider inside its transaction (a refund): the idle limit
    # must not end that transaction while it waits for the provider's answer.
    defaults = make_settings(tmp_path)
    # Payments: attempts start within 10 s of the first, the last lasting 10 s more
    # after a wait of up to 5 s the provider may ask for.
    assert defaults.longest_outbound_wait_seconds == 25
    assert defaults.database_idle_in_transaction_timeout_seconds > 25
    slow = {"payment_http_timeout_seconds": 120, "payment_http_retries": 3}
    assert make_settings(tmp_path, **slow).longest_outbound_wait_seconds == 245
    with pytest.raises(ValidationError, match=r"IDLE_IN_TRANSACTION.*245 s"):
        make_settings(tmp_path, **slow, database_idle_in_transaction_timeout_seconds=245)
    assert make_settings(tmp_path, **slow, database_idle_in_transaction_timeout_seconds=246)
    assert make_settings(tmp_path, **slow, database_idle_in_transaction_timeout_seconds=0)
    single = {"payment_http_timeout_seconds": 100, "payment_http_retries": 1}
    assert make_settings(tmp_path, **single).longest_outbound_wait_seconds == 100
    webhooks = {"webhooks_timeout_seconds": 60, "notifications_http_timeout_seconds": 90}
    assert make_settings(tmp_path, **webhooks).longest_outbound_wait_seconds == 90


def test_commands_keep_the_statement_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # `soko worker` builds its settings as every command does: its jobs keep the limit.
    # An operator's check of a whole table lifts it for its own transaction instead.
    from soko.platform.commands import command_settings

    for name in list(os.environ):
        if name.startswith("SOKO_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SOKO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SOKO_DATABASE_STATEMENT_TIMEOUT_SECONDS", "12")
    try:
        assert command_settings().database_statement_timeout_seconds == 12
    finally:
        configure_logging(make_settings(tmp_path))


async def test_a_lifted_timeout_holds_for_its_transaction_only(
    short_runtime: Runtime,
) -> None:
    async with short_runtime.db.transaction(read_only=True) as session:
        await lift_statement_timeout(session)
        assert await session.scalar(text("SHOW statement_timeout")) == "0"
        await session.execute(text("SELECT pg_sleep(1.5)"))  # past the runtime's second
    async with short_runtime.db.transaction(read_only=True) as session:
        assert await session.scalar(text("SHOW statement_timeout")) == "1s"


async def test_migrations_run_past_a_timeout_the_session_carries(
    tmp_path: Path, postgresql: None
) -> None:
    """A role or database may carry a statement_timeout (behind PgBouncer, the way to
    give the API one): the migrations lift it for their own transaction."""
    from alembic import command

    from soko.cli import _alembic_config

    name = f"soko_timeout_{uuid.uuid4().hex[:16]}"
    admin = create_engine(POSTGRES_URL)
    base, _, _ = POSTGRES_URL.rpartition("/")
    url = f"{base}/{name}"
    async with admin.connect() as connection:
        auto = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await auto.execute(text(f'CREATE DATABASE "{name}"'))
    migrated = create_engine(url)
    try:
        config = _alembic_config(make_settings(tmp_path, database_url=url))
        async with migrated.connect() as connection:
            # As a role's setting would be, once the connection is made: 5 ms, which
            # creating the trigram extension takes longer than.
            await connection.execute(text("SET statement_timeout = 5"))
            await connection.commit()

            def upgrade(sync_connection: Any) -> None:
                config.attributes["connection"] = sync_connection
                command.upgrade(config, "head")

            await connection.run_sync(upgrade)
            await connection.commit()
            assert await connection.scalar(text("SHOW statement_timeout")) == "5ms"
            await connection.execute(text("SET statement_timeout = 0"))
            assert await connection.scalar(text("SELECT count(*) FROM alembic_version")) == 1
    finally:
        await migrated.dispose()
        async with admin.connect() as connection:
            auto = await connection.execution_options(isolation_level="AUTOCOMMIT")
            await auto.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()
