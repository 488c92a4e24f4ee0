"""What the sign-in path does to stay cheap, and that each saving keeps its guarantee:
the statements a password sign-in runs (a budget), hashing threads yield the CPU to
request handling, a transaction's second audit event reuses the chain head it holds, a
clean account's success writes nothing, and the login settings are served from the
cache until a change invalidates them."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
from contextlib import AbstractContextManager
from typing import Any

import httpx2
import pytest
from sqlalchemy import select, text

from soko.identity import throttle
from soko.identity.audit import record_audit_event, verify_audit_chain
from soko.identity.hashing import HASH_NICENESS
from soko.identity.login_methods import (
    LOGIN_SETTINGS_TAG,
    PASSWORD,
    change_login_settings,
    current_login_settings,
    method_enabled_in,
)
from soko.identity.models import AuditEvent, LoginThrottle
from soko.identity.passwords import PasswordHasher, password_hasher
from soko.platform.clock import ManualClock
from soko.platform.db import create_engine
from soko.platform.runtime import INVALIDATE_TAGS_KEY, Runtime
from tests.conftest import sql_statements
from tests.identity import signin_support
from tests.identity.conftest import MakeUser
from tests.identity.signin_support import LAPTOP_UA, PHONE_UA, login

ACCOUNT = throttle.account_key("b" * 64)
ADDRESS = throttle.ip_key("198.51.100.4")


def statements(runtime: Runtime) -> AbstractContextManager[list[str]]:
    """The SQL statements ``runtime``'s engine sends meanwhile, but the transaction
    control SQLite's connections run themselves (``BEGIN IMMEDIATE``, ``PRAGMA``)."""
    return sql_statements(runtime, leaving_out=("BEGIN", "PRAGMA"))


async def test_a_password_sign_in_runs_within_its_statement_budget(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    """Read phase: the address's throttle state and the account, in one statement (1).
    Count phase, in a transaction of its own: the attempt counted against the account
    (1). Write phase, in the request's
    transaction: the account again with its roles, authenticator and device (1), the
    session and its refresh token (one statement on PostgreSQL, two on SQLite), and the
    audit append: on PostgreSQL one statement (the chain's head row updated and the
    event inserted), on SQLite the newest event read and the event inserted (2); plus,
    the first time a device signs in, ``auth.new_device`` and the
    ``identity.new_device_sign_in`` event that tells the owner (2); and the account's
    count given back (1). The login settings come from the cache."""
    stored = await password_hasher(runtime).hash(signin_support.PASSWORD)
    user = await make_user(password_hash=stored)
    together = runtime.db.dialect == "postgresql"
    opening, append = (1, 1) if together else (2, 2)
    await login(client, user.email, user_agent=PHONE_UA)  # fills the settings cache
    with statements(runtime) as new_device:
        assert (await login(client, user.email, user_agent=LAPTOP_UA)).status_code == 200
    with statements(runtime) as known_device:
        assert (await login(client, user.email, user_agent=LAPTOP_UA)).status_code == 200
    assert len(known_device) == 2 + 1 + 1 + opening + append, known_device
    assert len(new_device) == len(known_device) + 2, new_device
    assert sum("INSERT INTO outbox" in statement for statement in new_device) == 1
    assert not any("identity_settings" in statement for statement in known_device)
    writes = [s for s in known_device if s.startswith(("INSERT", "UPDATE", "DELETE", "WITH"))]
    inserted = [table for s in writes for table in re.findall(r"INSERT INTO (\w+)", s)]
    assert inserted == [
        "login_throttles",
        "auth_sessions",
        "refresh_tokens",
        "audit_events",
    ]
    # Nothing of the attempt stays counted after the success.
    async with runtime.db.transaction(read_only=True) as session:
        assert (await session.scalars(select(LoginThrottle.key))).all() == []


async def test_a_refresh_runs_within_its_statement_budget(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser, clock: ManualClock
) -> None:
    """The token with its session and user (1), the token rotated by compare-and-set
    (1), its successor inserted and the session's last-seen time written (2), and the
    roles for the new access token (1)."""
    stored = await password_hasher(runtime).hash(signin_support.PASSWORD)
    user = await make_user(password_hash=stored)
    signed_in = await login(client, user.email, user_agent=LAPTOP_UA)
    clock.advance(60)  # so the session's last-seen time changes
    with statements(runtime) as seen:
        response = await client.post(
            "/api/v1/auth/refresh", json={"refresh_token": signed_in.json()["refresh_token"]}
        )
    assert response.status_code == 200, response.text
    assert len(seen) == 5, seen
    assert "JOIN auth_sessions" in seen[0] and "JOIN users" in seen[0]


async def test_reading_ones_own_account_is_one_statement(
    client: httpx2.AsyncClient, runtime: Runtime, make_user: MakeUser
) -> None:
    """``GET /api/v1/me``, the most frequent authenticated read: the account, its
    authenticator and its roles in one statement, outside any transaction, once the
    caller's principal is cached."""
    user = await make_user()
    assert (await client.get("/api/v1/me", headers=user.headers)).status_code == 200
    with statements(runtime) as seen:
        response = await client.get("/api/v1/me", headers=user.headers)
    assert response.status_code == 200, response.text
    assert len(seen) == 1, seen
    assert response.json()["roles"] == ["customer"] and response.json()["mfa_enabled"] is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
async def test_hashing_threads_run_at_a_lower_priority_than_the_event_loop() -> None:
    hasher = PasswordHasher(memory_kib=19_456, iterations=2, parallelism=1, threads=1)
    try:

        def own_priority() -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        in_pool = await hasher._backend._run(own_priority)  # type: ignore[union-attr]
        here = own_priority()
        assert in_pool == min(19, max(here, 0) + HASH_NICENESS)
        assert here < in_pool
        # Hashing in those threads still works.
        stored = await hasher.hash("mvua ya masika 2031")
        assert (await hasher.verify("mvua ya masika 2031", stored))[0]
    finally:
        hasher.close()


async def test_events_of_one_transaction_chain_on_each_other(runtime: Runtime) -> None:
    async with runtime.db.transaction() as session:
        await record_audit_event(session, action="test.first", clock=runtime.clock)
    async with runtime.db.transaction() as session:
        second = await record_audit_event(session, action="test.second", clock=runtime.clock)
        third = await record_audit_event(session, action="test.third", clock=runtime.clock)
    assert (second.seq, third.seq) == (2, 3)
    assert third.prev_hash == second.hash
    async with runtime.db.transaction() as session:
        fourth = await record_audit_event(session, action="test.fourth", clock=runtime.clock)
    assert fourth.seq == 4 and fourth.prev_hash == third.hash
    async with runtime.db.transaction(read_only=True) as session:
        report = await verify_audit_chain(session)
    assert report.ok and report.checked == 4


async def test_an_event_rolled_back_with_its_savepoint_is_not_taken_for_the_head(
    runtime: Runtime,
) -> None:
    async with runtime.db.transaction() as session:
        first = await record_audit_event(session, action="test.kept", clock=runtime.clock)
        savepoint = await session.begin_nested()
        await record_audit_event(session, action="test.undone", clock=runtime.clock)
        await savepoint.rollback()
        after = await record_audit_event(session, action="test.after", clock=runtime.clock)
    assert after.seq == first.seq + 1 and after.prev_hash == first.hash
    async with runtime.db.transaction(read_only=True) as session:
        report = await verify_audit_chain(session)
        events = await session.scalars(select(AuditEvent).order_by(AuditEvent.seq))
        actions = [event.action for event in events.all()]
    assert report.ok
    assert actions == ["test.kept", "test.after"]


async def test_a_rolled_back_session_reads_the_head_again(runtime: Runtime) -> None:
    async with runtime.db.sessionmaker() as session:
        await record_audit_event(session, action="test.undone", clock=runtime.clock)
        await session.rollback()
        event = await record_audit_event(session, action="test.kept", clock=runtime.clock)
        await session.commit()
    assert event.seq == 1
    async with runtime.db.transaction(read_only=True) as session:
        assert (await verify_audit_chain(session)).ok


async def _throttle_row(runtime: Runtime, key: throttle.ThrottleKey) -> LoginThrottle | None:
    async with runtime.db.transaction(read_only=True) as session:
        return await session.get(LoginThrottle, key.key)


async def test_a_success_forgets_the_accounts_failures_not_the_addresss(
    runtime: Runtime,
) -> None:
    await throttle.record_failure(runtime.db, [ACCOUNT, ADDRESS], runtime.clock)
    async with runtime.db.transaction(read_only=True) as session:
        await throttle.check(session, [ACCOUNT, ADDRESS], runtime.clock)
    async with runtime.db.transaction() as session:
        await throttle.record_success(session, ACCOUNT)
    assert await _throttle_row(runtime, ACCOUNT) is None
    assert await _throttle_row(runtime, ADDRESS) is not None


async def test_a_success_forgets_a_failure_counted_while_it_was_verified(
    runtime: Runtime,
) -> None:
    async with runtime.db.transaction(read_only=True) as session:
        await throttle.check(session, [ACCOUNT, ADDRESS], runtime.clock)
    # A failure counted while the password was being verified: the account proved
    # itself, so its count goes with the rest.
    await throttle.record_failure(runtime.db, [ACCOUNT], runtime.clock)
    row = await _throttle_row(runtime, ACCOUNT)
    assert row is not None and row.failures == 1
    async with runtime.db.transaction() as session:
        await throttle.record_success(session, ACCOUNT)
    assert await _throttle_row(runtime, ACCOUNT) is None


async def test_login_settings_come_from_the_cache_until_a_change_invalidates_them(
    runtime: Runtime,
) -> None:
    before = await current_login_settings(runtime)
    assert method_enabled_in(before, PASSWORD)
    assert before.mfa_required_roles == frozenset()
    async with runtime.db.transaction() as session:
        await change_login_settings(
            session,
            methods={PASSWORD: False},
            mfa_required_roles=["seller"],
            now=runtime.clock.now(),
            changed_by=None,
        )
        # A request's commit invalidates this tag (SessionDep); here we do it by hand.
        assert LOGIN_SETTINGS_TAG in session.info[INVALIDATE_TAGS_KEY]
    assert method_enabled_in(await current_login_settings(runtime), PASSWORD)
    await runtime.cache.invalidate_tags(LOGIN_SETTINGS_TAG)
    after = await current_login_settings(runtime)
    assert not method_enabled_in(after, PASSWORD)
    assert after.mfa_required_roles == frozenset({"seller"})
    assert not method_enabled_in(after, "oidc:nobody")


async def test_a_pooled_connection_is_checked_out_without_a_ping_unless_it_idled(
    backend: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL's pool pings (three round trips with asyncpg) only a connection that sat
    idle long enough to have been dropped silently; one the server closed is noticed
    without a round trip and replaced before anyone uses it."""
    if backend != "postgresql":
        pytest.skip("SQLite connections are files, not sockets")
    pings: list[object] = []

    async def backend_pid(engine: Any) -> int:
        async with engine.connect() as connection:
            return int((await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one())

    engine = create_engine(database_url, pool_size=1, max_overflow=0, ping_after_idle_seconds=3600)
    admin = create_engine(database_url, pool_size=1, max_overflow=0)
    real_ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda c: pings.append(c) or real_ping(c))
    try:
        first = await backend_pid(engine)
        assert await backend_pid(engine) == first
        assert pings == []
        async with admin.connect() as opened:
            # Autocommit: inside one transaction PostgreSQL answers pg_stat_activity from
            # the snapshot its first read took, and a backend seen ending would be seen
            # there for ever.
            connection = await opened.execution_options(isolation_level="AUTOCOMMIT")
            await connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
            deadline = asyncio.get_running_loop().time() + 10
            while (
                await connection.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": first}
                )
            ).scalar_one():
                assert asyncio.get_running_loop().time() < deadline, "the backend never ended"
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # the server's goodbye reaches the pooled connection
        replacement = await backend_pid(engine)  # no error: replaced on checkout
        assert replacement != first and pings == []
    finally:
        await engine.dispose()

    idle_engine = create_engine(
        database_url, pool_size=1, max_overflow=0, ping_after_idle_seconds=0
    )
    monkeypatch.setattr(idle_engine.dialect, "do_ping", lambda c: pings.append(c) or real_ping(c))
    try:
        first = await backend_pid(idle_engine)  # a fresh connection is not pinged
        assert pings == []
        assert await backend_pid(idle_engine) == first  # idle past the limit: pinged
        assert len(pings) == 1
    finally:
        await idle_engine.dispose()
        await admin.dispose()
