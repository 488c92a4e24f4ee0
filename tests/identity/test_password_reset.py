"""Forgotten passwords: reset links over HTTP, and the password change service."""

from __future__ import annotations

import asyncio
import uuid

import httpx2
from sqlalchemy import select

from soko.identity.models import AuthSession, LoginThrottle
from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from tests.identity.signin_support import (
    AUTH,
    NEW_PASSWORD,
    PASSWORD,
    audit_events,
    bearer,
    load_user,
    login,
    mailed,
    mailed_token,
    new_email,
    register,
)


async def _forgot(client: httpx2.AsyncClient, identifier: str) -> None:
    response = await client.post(f"{AUTH}/password/forgot", json={"identifier": identifier})
    assert response.status_code == 202, response.text
    assert response.content == b""


async def _reset(client: httpx2.AsyncClient, token: str, password: str) -> httpx2.Response:
    return await client.post(
        f"{AUTH}/password/reset", json={"token": token, "new_password": password}
    )


async def _sessions_revoked(runtime: Runtime, user_id: str) -> list[bool]:
    async with runtime.db.transaction(read_only=True) as session:
        rows = await session.scalars(
            select(AuthSession).where(AuthSession.user_id == uuid.UUID(user_id))
        )
        return [row.revoked_at is not None for row in rows]


async def test_reset_link_sets_a_new_password_and_signs_every_session_out(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    email = new_email()
    tokens = (await register(client, email)).json()

    await _forgot(client, email.upper())
    token = await mailed_token(runtime, email, "reset-password")
    assert token.startswith("pr_")
    [message] = [
        m for m in await mailed(runtime, email) if m["category"] == "identity.password_reset"
    ]
    assert message["subject"] == "Reset your password"

    response = await _reset(client, token, NEW_PASSWORD)
    assert response.status_code == 204, response.text

    assert await _sessions_revoked(runtime, tokens["user_id"]) == [True]
    refresh = await client.post(f"{AUTH}/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert refresh.status_code == 401
    assert (await client.post(f"{AUTH}/logout", headers=bearer(tokens))).status_code == 401
    [event] = await audit_events(runtime, "auth.password_reset")
    assert event.target_id == tokens["user_id"] and event.data["sessions_revoked"] == 1
    user = await load_user(runtime, tokens["user_id"])
    assert user.password_changed_at == runtime.clock.now()
    assert user.email_verified_at is not None  # the link proved the address

    assert (await login(client, email, PASSWORD)).status_code == 401
    assert (await login(client, email, NEW_PASSWORD)).status_code == 200

    # Single use.
    again = await _reset(client, token, "yet-another-passphrase-9")
    assert again.status_code == 400
    assert again.json()["type"] == "/problems/invalid-link-token"


async def test_reset_link_expires_after_30_minutes_and_a_newer_one_replaces_it(
    client: httpx2.AsyncClient, runtime: Runtime, clock: ManualClock
) -> None:
    email = new_email()
    await register(client, email)
    await _forgot(client, email)
    first = await mailed_token(runtime, email, "reset-password")
    await _forgot(client, email)
    second = await mailed_token(runtime, email, "reset-password")
    assert first != second
    assert (await _reset(client, first, NEW_PASSWORD)).status_code == 400

    clock.advance(30 * 60)
    expired = await _reset(client, second, NEW_PASSWORD)
    assert expired.status_code == 400
    assert expired.json()["type"] == "/problems/invalid-link-token"
    assert await audit_events(runtime, "auth.password_reset") == []


async def test_weak_new_password_is_refused_and_the_link_still_works(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    email = new_email()
    await register(client, email)
    await _forgot(client, email)
    token = await mailed_token(runtime, email, "reset-password")
    weak = await _reset(client, token, email)
    assert weak.status_code == 422
    assert "matches_account" in weak.json()["reasons"]
    assert (await _reset(client, token, NEW_PASSWORD)).status_code == 204


async def test_forgot_answers_alike_for_unknown_accounts_and_sends_nothing(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    nobody = new_email()
    await _forgot(client, nobody)
    await _forgot(client, "+254712345678")
    assert await mailed(runtime, nobody) == []
    await runtime.dispatcher.run_until_idle()
    assert (runtime.settings.data_dir / "messages" / "email.jsonl").exists() is False
    assert await audit_events(runtime, "auth.password_reset_requested") == []


async def test_reset_links_to_one_account_are_capped_without_telling(
    client: httpx2.AsyncClient, runtime: Runtime, still_limiter_clock: float
) -> None:
    email = new_email()
    await register(client, email)
    for _ in range(4):
        await _forgot(client, email)
    resets = [m for m in await mailed(runtime, email) if m["category"] == "identity.password_reset"]
    assert len(resets) == 3


async def test_forgot_is_limited_per_client_address(
    client: httpx2.AsyncClient, still_limiter_clock: float
) -> None:
    for _ in range(5):
        await _forgot(client, new_email())
    limited = await client.post(f"{AUTH}/password/forgot", json={"identifier": new_email()})
    assert limited.status_code == 429
    assert "Retry-After" in limited.headers


async def test_two_concurrent_resets_with_one_link_cannot_both_succeed(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    email = new_email()
    await register(client, email)
    await _forgot(client, email)
    token = await mailed_token(runtime, email, "reset-password")
    answers = await asyncio.gather(
        _reset(client, token, NEW_PASSWORD), _reset(client, token, "yet-another-passphrase-9")
    )
    assert sorted(answer.status_code for answer in answers) == [204, 400]
    assert len(await audit_events(runtime, "auth.password_reset")) == 1
    winner = NEW_PASSWORD if answers[0].status_code == 204 else "yet-another-passphrase-9"
    assert (await login(client, email, winner)).status_code == 200


async def test_change_password_needs_the_current_one_and_keeps_only_this_session(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    email = new_email()
    first = (await register(client, email)).json()
    second = (await login(client, email)).json()

    async def change(current: str) -> httpx2.Response:
        return await client.post(
            "/api/v1/me/password",
            headers=bearer(second),
            json={"current_password": current, "new_password": NEW_PASSWORD},
        )

    wrong = await change("not-the-password-at-all")
    assert wrong.status_code == 403
    assert wrong.json()["type"] == "/problems/wrong-current-password"
    # Recorded although refused, and counted like a failed sign-in.
    assert len(await audit_events(runtime, "auth.password_change_failed")) == 1
    async with runtime.db.transaction(read_only=True) as session:
        assert (await session.scalars(select(LoginThrottle.failures))).all() == [1]

    assert (await change(PASSWORD)).status_code == 204
    refresh_first = await client.post(
        f"{AUTH}/refresh", json={"refresh_token": first["refresh_token"]}
    )
    assert refresh_first.status_code == 401
    refresh_second = await client.post(
        f"{AUTH}/refresh", json={"refresh_token": second["refresh_token"]}
    )
    assert refresh_second.status_code == 200
    [event] = await audit_events(runtime, "auth.password_changed")
    assert event.data["sessions_revoked"] == 1
    assert (await login(client, email, PASSWORD)).status_code == 401
    assert (await login(client, email, NEW_PASSWORD)).status_code == 200
