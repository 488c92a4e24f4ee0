"""Refresh-token rotation, the concurrent-refresh grace window, and reuse detection."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from sqlalchemy import func, select

from soko.identity.errors import InvalidRefreshToken
from soko.identity.models import AuditEvent, AuthSession, RefreshToken
from soko.identity.sessions import describe_device, refresh_session
from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from tests.identity.conftest import TEST_DEVICE, MakeUser


async def _refresh(runtime: Runtime, token: str) -> str:
    async with runtime.db.transaction() as session:
        pair = await refresh_session(session, runtime, token, device=TEST_DEVICE)
    return pair.refresh_token


async def _refresh_keeping_changes(runtime: Runtime, token: str) -> None:
    """Like the HTTP path: a refusal marked keeping_changes still commits."""
    async with runtime.db.sessionmaker() as session:
        try:
            await refresh_session(session, runtime, token, device=TEST_DEVICE)
        except InvalidRefreshToken as exc:
            if exc.commit_changes:
                await session.commit()
            raise
        await session.commit()


async def test_rotation_issues_a_new_token_and_retires_the_old(
    runtime: Runtime, make_user: MakeUser
) -> None:
    user = await make_user()
    first = user.tokens.refresh_token
    second = await _refresh(runtime, first)
    assert second != first
    third = await _refresh(runtime, second)
    assert third not in (first, second)


async def test_same_token_twice_within_grace_gets_the_same_successor(
    runtime: Runtime, make_user: MakeUser, clock: ManualClock
) -> None:
    user = await make_user()
    token = user.tokens.refresh_token
    successor = await _refresh(runtime, token)
    clock.advance(runtime.settings.refresh_reuse_grace_seconds / 2)
    assert await _refresh(runtime, token) == successor
    # The successor still works: the session was not revoked.
    assert await _refresh(runtime, successor)


async def test_reuse_after_grace_revokes_the_whole_family(
    runtime: Runtime, make_user: MakeUser, clock: ManualClock
) -> None:
    user = await make_user()
    token = user.tokens.refresh_token
    successor = await _refresh(runtime, token)
    clock.advance(runtime.settings.refresh_reuse_grace_seconds + 1)
    with pytest.raises(InvalidRefreshToken):
        await _refresh_keeping_changes(runtime, token)
    # The legitimate holder's successor is refused too: the family is gone.
    with pytest.raises(InvalidRefreshToken):
        await _refresh(runtime, successor)
    async with runtime.db.transaction() as session:
        auth_session = await session.get(AuthSession, user.tokens.session_id)
        assert auth_session is not None
        assert auth_session.revoked_reason == "refresh_token_reuse"
        live = await session.scalar(
            select(func.count())
            .select_from(RefreshToken)
            .where(
                RefreshToken.session_id == user.tokens.session_id,
                RefreshToken.state != "revoked",
            )
        )
        assert live == 0
        recorded = await session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(AuditEvent.action == "auth.refresh_token_reused")
        )
        assert recorded == 1


async def test_reuse_of_a_grandparent_within_grace_is_still_reuse(
    runtime: Runtime, make_user: MakeUser
) -> None:
    """The grace covers a duplicate of the latest rotation only: once the successor was
    itself rotated, presenting the old token again is theft, whatever the time."""
    user = await make_user()
    token = user.tokens.refresh_token
    successor = await _refresh(runtime, token)
    await _refresh(runtime, successor)
    with pytest.raises(InvalidRefreshToken):
        await _refresh_keeping_changes(runtime, token)


async def test_expired_and_unknown_tokens_are_refused(
    runtime: Runtime, make_user: MakeUser, clock: ManualClock
) -> None:
    user = await make_user()
    with pytest.raises(InvalidRefreshToken):
        await _refresh(runtime, "rt_not-a-real-token")
    with pytest.raises(InvalidRefreshToken):
        await _refresh(runtime, "no-prefix")
    clock.advance(dt.timedelta(seconds=runtime.settings.refresh_token_ttl_seconds + 1))
    with pytest.raises(InvalidRefreshToken):
        await _refresh(runtime, user.tokens.refresh_token)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_concurrent_refreshes_of_one_token_share_one_successor(
    runtime: Runtime, make_user: MakeUser
) -> None:
    """Two tabs refreshing at the same moment on PostgreSQL: both succeed with the same
    successor, exactly one new token row exists, and the session stays alive."""
    user = await make_user()
    token = user.tokens.refresh_token
    results = await asyncio.gather(*(_refresh(runtime, token) for _ in range(5)))
    assert len(set(results)) == 1
    async with runtime.db.transaction() as session:
        rows = await session.scalar(
            select(func.count())
            .select_from(RefreshToken)
            .where(RefreshToken.session_id == user.tokens.session_id)
        )
        assert rows == 2
        auth_session = await session.get(AuthSession, user.tokens.session_id)
        assert auth_session is not None and auth_session.revoked_at is None


def test_device_names_are_readable() -> None:
    assert describe_device("Mozilla/5.0 (Linux; Android 14) Chrome/130.0") == "Chrome on Android"
    assert describe_device("okhttp/4.12") == "Android app"
    assert describe_device("") == "Unknown client"
