"""The identity purge: ended sessions and their tokens after the window, spent codes,
link tokens and MFA challenges a day after they expire, stale throttle rows; never what
a live session, a running code or a counting throttle still needs."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select

from soko.identity.errors import InvalidRefreshToken
from soko.identity.models import (
    AuthSession,
    LoginThrottle,
    MfaChallenge,
    OneTimeCode,
    RefreshToken,
    VerificationToken,
)
from soko.identity.retention import purge_ended_sessions, purge_identity, purge_spent_secrets
from soko.identity.sessions import refresh_session, revoke_session
from soko.platform.clock import ManualClock
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime
from tests.identity.conftest import TEST_DEVICE, MakeUser

DAY = dt.timedelta(days=1)
KEEP = dt.timedelta(days=30)


async def count(runtime: Runtime, model: Any, *where: Any) -> int:
    async with runtime.db.sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def refresh(runtime: Runtime, token: str) -> str:
    async with runtime.db.transaction() as session:
        pair = await refresh_session(session, runtime, token, device=TEST_DEVICE)
    return pair.refresh_token


async def revoke(runtime: Runtime, session_id: uuid.UUID) -> None:
    async with runtime.db.transaction() as session:
        auth_session = await session.get(AuthSession, session_id)
        assert auth_session is not None
        await revoke_session(session, auth_session, now=runtime.clock.now(), reason="sign_out")


async def purge_sessions(runtime: Runtime) -> tuple[int, int, bool]:
    async with runtime.db.transaction() as session:
        return await purge_ended_sessions(session, runtime.clock.now(), keep=KEEP)


async def test_ended_sessions_go_with_their_tokens_after_the_window(
    runtime: Runtime, make_user: MakeUser, clock: ManualClock
) -> None:
    assert runtime.settings.refresh_token_ttl_seconds == 7 * 86_400
    revoked = (await make_user()).tokens
    await refresh(runtime, revoked.refresh_token)
    await revoke(runtime, revoked.session_id)
    expiring = (await make_user()).tokens  # expires in 7 days
    clock.advance(KEEP + DAY)
    live = (await make_user()).tokens
    first = live.refresh_token
    await refresh(runtime, await refresh(runtime, first))
    assert await count(runtime, RefreshToken, RefreshToken.session_id == live.session_id) == 3

    assert await purge_sessions(runtime) == (1, 2, False)  # the revoked one, 31 days ago
    assert await count(runtime, AuthSession, AuthSession.id == revoked.session_id) == 0
    assert await count(runtime, RefreshToken, RefreshToken.session_id == revoked.session_id) == 0
    # Expired 24 days ago: within the window.
    assert await count(runtime, AuthSession, AuthSession.id == expiring.session_id) == 1
    # A live session keeps every token, rotated ones included.
    assert await count(runtime, RefreshToken, RefreshToken.session_id == live.session_id) == 3

    clock.advance(7 * DAY)  # "expiring" ended 31 days ago; "live" expires right now
    assert await purge_sessions(runtime) == (1, 1, False)
    assert await count(runtime, AuthSession, AuthSession.id == expiring.session_id) == 0
    assert await count(runtime, AuthSession, AuthSession.id == live.session_id) == 1
    assert await count(runtime, RefreshToken, RefreshToken.session_id == live.session_id) == 3


async def test_a_rotated_token_presented_again_after_a_purge_still_revokes_its_session(
    runtime: Runtime, make_user: MakeUser, clock: ManualClock
) -> None:
    old = (await make_user()).tokens
    await revoke(runtime, old.session_id)
    clock.advance(KEEP + DAY)
    live = (await make_user()).tokens
    successor = await refresh(runtime, live.refresh_token)
    clock.advance(runtime.settings.refresh_reuse_grace_seconds + 1)
    assert (await purge_sessions(runtime))[0] == 1

    async with runtime.db.sessionmaker() as session:
        with pytest.raises(InvalidRefreshToken) as refused:
            await refresh_session(session, runtime, live.refresh_token, device=TEST_DEVICE)
        assert refused.value.commit_changes
        await session.commit()
    with pytest.raises(InvalidRefreshToken):
        await refresh(runtime, successor)
    async with runtime.db.sessionmaker() as session:
        auth_session = await session.get(AuthSession, live.session_id)
        assert auth_session is not None
        assert auth_session.revoked_reason == "refresh_token_reuse"


async def test_a_full_batch_of_tokens_leaves_its_session_for_the_next_round(
    runtime: Runtime, make_user: MakeUser, clock: ManualClock
) -> None:
    tokens = (await make_user()).tokens
    await refresh(runtime, await refresh(runtime, tokens.refresh_token))
    await revoke(runtime, tokens.session_id)
    clock.advance(KEEP + DAY)
    async with runtime.db.transaction() as session:
        first = await purge_ended_sessions(session, clock.now(), keep=KEEP, token_limit=2)
    assert first == (0, 2, True)
    assert await count(runtime, AuthSession, AuthSession.id == tokens.session_id) == 1
    assert await purge_sessions(runtime) == (1, 1, False)


async def add_spent(runtime: Runtime, user_id: uuid.UUID, label: str) -> None:
    """A code and an MFA challenge living five minutes, a link token living a day."""
    now = runtime.clock.now()
    async with runtime.db.transaction() as session:
        session.add_all(
            [
                OneTimeCode(
                    id=uuid7(),
                    phone_index=f"phone-{label}",
                    purpose="sign_in",
                    code_hash="0" * 64,
                    attempts=0,
                    ip="198.51.100.4",
                    created_at=now,
                    expires_at=now + dt.timedelta(minutes=5),
                    consumed_at=None,
                ),
                VerificationToken(
                    id=uuid7(),
                    user_id=user_id,
                    purpose="email_verification",
                    token_hash=uuid.uuid4().hex * 2,
                    created_at=now,
                    expires_at=now + DAY,
                    used_at=None,
                ),
                MfaChallenge(
                    id=uuid7(),
                    user_id=user_id,
                    token_hash=uuid.uuid4().hex * 2,
                    method="password",
                    device_name="Chrome on Android",
                    user_agent=TEST_DEVICE.user_agent,
                    ip=TEST_DEVICE.ip,
                    attempts=0,
                    created_at=now,
                    expires_at=now + dt.timedelta(minutes=5),
                    used_at=None,
                ),
            ]
        )


async def test_spent_codes_links_and_challenges_go_a_day_after_they_expire(
    runtime: Runtime, make_user: MakeUser, clock: ManualClock
) -> None:
    user = await make_user()
    await add_spent(runtime, user.user_id, "old")
    clock.advance(DAY)
    await add_spent(runtime, user.user_id, "new")
    clock.advance(dt.timedelta(minutes=10))

    async with runtime.db.transaction() as session:
        # The old code and challenge expired a day and five minutes ago; the old link
        # token ten minutes ago; the new ones are live.
        assert await purge_spent_secrets(session, clock.now()) == (1, 0, 1, False)
    assert await count(runtime, OneTimeCode, OneTimeCode.phone_index == "phone-old") == 0
    assert await count(runtime, OneTimeCode, OneTimeCode.phone_index == "phone-new") == 1
    assert await count(runtime, VerificationToken) == 2
    assert await count(runtime, MfaChallenge) == 1

    clock.advance(DAY)
    async with runtime.db.transaction() as session:
        assert await purge_spent_secrets(session, clock.now()) == (1, 1, 1, False)
    clock.advance(DAY)
    async with runtime.db.transaction() as session:
        assert await purge_spent_secrets(session, clock.now()) == (0, 1, 0, False)
    for model in (OneTimeCode, VerificationToken, MfaChallenge):
        assert await count(runtime, model) == 0


async def test_stale_throttle_rows_go_and_counting_ones_stay(
    runtime: Runtime, clock: ManualClock
) -> None:
    now = clock.now()
    async with runtime.db.transaction() as session:
        session.add_all(
            [
                LoginThrottle(
                    key="ip:198.51.100.9", failures=3, blocked_until=None, updated_at=now
                ),
                LoginThrottle(
                    key="account:waiting",
                    failures=40,
                    blocked_until=now + 3 * DAY,  # not a real wait; one that is not over
                    updated_at=now,
                ),
            ]
        )
    clock.advance(DAY + dt.timedelta(minutes=1))
    async with runtime.db.transaction() as session:
        session.add(
            LoginThrottle(
                key="account:fresh", failures=2, blocked_until=None, updated_at=clock.now()
            )
        )

    async with runtime.db.transaction() as session:
        purged = await purge_identity(session, clock, keep=KEEP)
    assert purged.throttles == 1
    async with runtime.db.sessionmaker() as session:
        left = set((await session.scalars(select(LoginThrottle.key))).all())
    assert left == {"account:waiting", "account:fresh"}


async def test_the_identity_purge_runs_from_the_dispatcher(
    runtime: Runtime, make_user: MakeUser, clock: ManualClock
) -> None:
    assert runtime.settings.retention_days == 30
    user = await make_user()
    await revoke(runtime, user.tokens.session_id)
    await add_spent(runtime, user.user_id, "old")
    clock.advance(KEEP + DAY)
    live = await make_user()

    await runtime.dispatcher.run_until_idle()

    assert await count(runtime, AuthSession) == 1
    assert await count(runtime, RefreshToken) == 1
    assert await count(runtime, RefreshToken, RefreshToken.session_id == live.tokens.session_id)
    for model in (OneTimeCode, VerificationToken, MfaChallenge):
        assert await count(runtime, model) == 0
