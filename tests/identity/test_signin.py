"""Sign-in with a password, refresh, sign-out, throttling and the route limit, over
HTTP."""

from __future__ import annotations

import asyncio
import uuid

import httpx2
from sqlalchemy import select, update

from soko.identity.accounts import create_user
from soko.identity.models import (
    AuthSession,
    LoginThrottle,
    MfaChallenge,
    TotpFactor,
    User,
    UserStatus,
)
from soko.identity.passwords import PasswordHasher, password_hasher
from soko.identity.throttle import ACCOUNT_RULE
from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from tests.identity.signin_support import (
    AUTH,
    LAPTOP_UA,
    PASSWORD,
    audit_events,
    bearer,
    change_settings,
    load_user,
    login,
    new_email,
    register,
)

UNLIMITED = "1000/minute"


async def _registered(client: httpx2.AsyncClient) -> tuple[str, str]:
    email = new_email()
    response = await register(client, email)
    assert response.status_code == 201, response.text
    return email, response.json()["user_id"]


async def test_sign_in_refresh_and_sign_out(client: httpx2.AsyncClient, runtime: Runtime) -> None:
    email, user_id = await _registered(client)

    signed_in = await login(client, email.upper())
    assert signed_in.status_code == 200, signed_in.text
    tokens = signed_in.json()
    assert tokens["user_id"] == user_id
    assert "mfa_required" not in tokens
    [event] = await audit_events(runtime, "auth.login")
    assert event.target_id == user_id and event.data["session"] == tokens["session_id"]
    assert event.data["method"] == "password"

    refreshed = await client.post(
        f"{AUTH}/refresh", json={"refresh_token": tokens["refresh_token"]}
    )
    assert refreshed.status_code == 200, refreshed.text
    rotated = refreshed.json()
    assert rotated["session_id"] == tokens["session_id"]
    assert rotated["refresh_token"] != tokens["refresh_token"]

    signed_out = await client.post(f"{AUTH}/logout", headers=bearer(rotated))
    assert signed_out.status_code == 204
    [logout] = await audit_events(runtime, "auth.logout")
    assert logout.data["sessions"] == [tokens["session_id"]]

    refused = await client.post(f"{AUTH}/refresh", json={"refresh_token": rotated["refresh_token"]})
    assert refused.status_code == 401
    assert refused.json()["type"] == "/problems/invalid-refresh-token"
    # The access token of the ended session stops working at once.
    again = await client.post(f"{AUTH}/logout", headers=bearer(rotated))
    assert again.status_code == 401


async def test_sign_out_also_ends_the_session_of_a_refresh_token_but_only_ones_own(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    email, _ = await _registered(client)
    first, second, third = [(await login(client, email)).json() for _ in range(3)]
    stranger_email, _ = await _registered(client)
    stranger = (await login(client, stranger_email)).json()

    async def revoked() -> dict[str, bool]:
        async with runtime.db.transaction(read_only=True) as session:
            rows = (await session.scalars(select(AuthSession))).all()
            return {str(row.id): row.revoked_at is not None for row in rows}

    response = await client.post(
        f"{AUTH}/logout", headers=bearer(first), json={"refresh_token": second["refresh_token"]}
    )
    assert response.status_code == 204
    state = await revoked()
    assert state[first["session_id"]] and state[second["session_id"]]
    assert not state[third["session_id"]]

    response = await client.post(
        f"{AUTH}/logout", headers=bearer(third), json={"refresh_token": stranger["refresh_token"]}
    )
    assert response.status_code == 204
    state = await revoked()
    assert state[third["session_id"]]
    assert not state[stranger["session_id"]]
    stranger_refresh = await client.post(
        f"{AUTH}/refresh", json={"refresh_token": stranger["refresh_token"]}
    )
    assert stranger_refresh.status_code == 200


async def test_sign_in_by_phone_number(client: httpx2.AsyncClient, runtime: Runtime) -> None:
    hashed = await password_hasher(runtime).hash(PASSWORD)
    async with runtime.db.transaction() as session:
        user = await create_user(
            session,
            runtime.data_keys,
            now=runtime.clock.now(),
            phone="+254712345678",
            password_hash=hashed,
        )
    response = await login(client, "+254 712 345 678")
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == str(user.id)
    malformed = await login(client, "0712345678")
    assert malformed.status_code == 422
    assert malformed.json()["errors"][0]["field"] == "identifier"


async def test_wrong_password_is_401_and_still_recorded(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    email, user_id = await _registered(client)
    response = await login(client, email, "not-the-password-at-all")
    assert response.status_code == 401
    assert response.json()["type"] == "/problems/invalid-credentials"

    [failure] = await audit_events(runtime, "auth.login_failed")
    assert failure.target_id == user_id
    assert failure.data["reason"] == "wrong_password"
    assert failure.ip == "127.0.0.1"
    async with runtime.db.transaction(read_only=True) as session:
        counts = {
            row.key.split(":")[0]: row.failures
            for row in await session.scalars(select(LoginThrottle))
        }
    assert counts == {"account": 1, "ip": 1}
    assert await audit_events(runtime, "auth.login") == []


async def test_unknown_account_gets_the_same_answer_as_a_wrong_password(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    email, _ = await _registered(client)
    wrong = await login(client, email, "not-the-password-at-all")
    unknown = await login(client, new_email(), "not-the-password-at-all")
    assert unknown.status_code == wrong.status_code == 401

    def shape(response: httpx2.Response) -> dict[str, object]:
        body = response.json()
        body.pop("request_id", None)
        return body

    assert shape(unknown) == shape(wrong)
    failures = await audit_events(runtime, "auth.login_failed")
    assert [event.data["reason"] for event in failures] == ["wrong_password", "unknown_account"]
    assert failures[1].target_id is None


async def test_failed_sign_ins_wait_longer_each_time_up_to_a_cap(
    client: httpx2.AsyncClient, runtime: Runtime, clock: ManualClock
) -> None:
    runtime.settings.login_rate_limit = UNLIMITED
    email, _ = await _registered(client)

    for _ in range(2):  # two of the three free attempts
        assert (await login(client, email, "wrong-password-guess")).status_code == 401
    waits = []
    for _ in range(12):
        # The third failure, and each after a wait, makes the account wait longer.
        assert (await login(client, email, "wrong-password-guess")).status_code == 401
        # While the account waits, even the right password is not looked at.
        refused = await login(client, email)
        assert refused.status_code == 429
        assert refused.json()["type"] == "/problems/rate-limited"
        wait = int(refused.headers["Retry-After"])
        waits.append(wait)
        clock.advance(wait - 1)
        assert (await login(client, email)).status_code == 429
        clock.advance(1)
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 900, 900]

    # Never locked out for good: once the capped wait passes, the owner gets in, and the
    # success clears the account's count.
    response = await login(client, email)
    assert response.status_code == 200, response.text
    assert (await login(client, email, "wrong-password-guess")).status_code == 401
    assert (await login(client, email)).status_code == 200
    assert len(await audit_events(runtime, "auth.login_failed")) == 15


async def test_parallel_guesses_at_one_account_are_checked_no_more_than_the_free_attempts(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    runtime.settings.login_rate_limit = UNLIMITED
    email, _ = await _registered(client)
    # Forty guesses sent at once: each counts before its password is checked, so the
    # ones past the free attempts wait instead of being checked on a stale count.
    answers = await asyncio.gather(
        *(login(client, email, "wrong-password-guess") for _ in range(40))
    )
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [401] * ACCOUNT_RULE.free_attempts + [429] * (
        40 - ACCOUNT_RULE.free_attempts
    )
    assert len(await audit_events(runtime, "auth.login_failed")) == ACCOUNT_RULE.free_attempts


async def test_sign_in_route_limit_follows_the_settings(
    client: httpx2.AsyncClient, runtime: Runtime, still_limiter_clock: float
) -> None:
    runtime.settings.login_rate_limit = "2/minute"
    for _ in range(2):
        assert (await login(client, new_email())).status_code == 401
    limited = await login(client, new_email())
    assert limited.status_code == 429
    assert limited.headers["RateLimit-Policy"] == '"login";q=2;w=60'
    assert int(limited.headers["Retry-After"]) >= 1
    # The limit is counted before the password is checked: nothing more was recorded.
    assert len(await audit_events(runtime, "auth.login_failed")) == 2


async def test_blocked_account_is_told_only_after_the_right_password(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    email, user_id = await _registered(client)
    async with runtime.db.transaction() as session:
        await session.execute(
            update(User)
            .where(User.email_index.is_not(None))
            .values(status=UserStatus.blocked.value)
        )
    wrong = await login(client, email, "not-the-password-at-all")
    assert wrong.status_code == 401
    right = await login(client, email)
    assert right.status_code == 403
    assert right.json()["type"] == "/problems/account-blocked"
    [refusal] = await audit_events(runtime, "auth.login_refused")
    assert refusal.target_id == user_id and refusal.data["reason"] == "account_blocked"
    assert await audit_events(runtime, "auth.login") == []


async def test_sign_in_from_a_new_device_is_recorded(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    email, user_id = await _registered(client)  # on the phone
    assert (await login(client, email)).status_code == 200
    assert await audit_events(runtime, "auth.new_device") == []
    assert (await login(client, email, user_agent=LAPTOP_UA)).status_code == 200
    [event] = await audit_events(runtime, "auth.new_device")
    assert event.target_id == user_id
    assert event.data["device"] == "Firefox on Windows"
    assert (await login(client, email, user_agent=LAPTOP_UA)).status_code == 200
    assert len(await audit_events(runtime, "auth.new_device")) == 1


async def test_hash_made_with_older_parameters_is_replaced_at_sign_in(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    older = PasswordHasher(memory_kib=19_456, iterations=3, parallelism=1, threads=1)
    try:
        old_hash = await older.hash(PASSWORD)
    finally:
        older.close()
    email = new_email()
    async with runtime.db.transaction() as session:
        user = await create_user(
            session, runtime.data_keys, now=runtime.clock.now(), email=email, password_hash=old_hash
        )
    assert (await login(client, email)).status_code == 200
    stored = (await load_user(runtime, user.id)).password_hash
    assert stored is not None and stored != old_hash
    assert ",t=2," in stored
    assert (await login(client, email)).status_code == 200


async def test_account_with_an_authenticator_gets_a_challenge_instead_of_tokens(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    email, user_id = await _registered(client)
    async with runtime.db.transaction() as session:
        session.add(
            TotpFactor(
                user_id=uuid.UUID(user_id),
                secret_ciphertext="unused-here",
                confirmed_at=runtime.clock.now(),
                created_at=runtime.clock.now(),
            )
        )
    response = await login(client, email)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mfa_required"] is True
    assert body["challenge_token"] and "access_token" not in body
    assert await audit_events(runtime, "auth.login") == []
    async with runtime.db.transaction(read_only=True) as session:
        challenges = (await session.scalars(select(MfaChallenge))).all()
    assert [str(challenge.user_id) for challenge in challenges] == [user_id]


async def test_role_that_requires_mfa_without_an_authenticator_gets_no_tokens(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    """Such a user is not refused (they could never enroll) but gets no tokens either:
    only a challenge that enrolls an authenticator and then signs in."""
    email, _ = await _registered(client)
    await change_settings(runtime, mfa_required_roles=["customer"])
    response = await login(client, email)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mfa_required"] is True and body["methods"] == ["enroll"]
    assert "access_token" not in body and body["challenge_token"].startswith("mfe_")
    assert await audit_events(runtime, "auth.login") == []


async def test_password_sign_in_switched_off_at_runtime(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    email, _ = await _registered(client)
    await change_settings(runtime, methods={"password": False})
    for response in (await login(client, email), await register(client, new_email())):
        assert response.status_code == 403
        assert response.json()["type"] == "/problems/login-method-disabled"
    await change_settings(runtime, methods={"password": True})
    assert (await login(client, email)).status_code == 200
