"""Deleting one's own account: proof of ownership, erasure, anonymization, and that
nothing the account held works afterwards."""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

import httpx2
import pytest
from sqlalchemy import func, select, text

from soko.identity.account_lifecycle import DELETED_DISPLAY_NAME, USER_DELETED_EVENT
from soko.identity.accounts import create_user, email_index, find_user_by_email, phone_index
from soko.identity.models import (
    ApiKey,
    AuditEvent,
    AuthSession,
    ExternalIdentity,
    LoginThrottle,
    MfaChallenge,
    OneTimeCode,
    RecoveryCode,
    TotpFactor,
    User,
    UserRole,
    VerificationToken,
)
from soko.identity.permissions import ACCOUNT_SELF
from soko.identity.sessions import hash_secret
from soko.identity.throttle import ACCOUNT_RULE, account_key
from soko.platform.clock import ManualClock
from soko.platform.db import Base
from soko.platform.ids import uuid7
from soko.platform.outbox import OutboxMessage
from soko.platform.runtime import Runtime
from tests.identity.me_support import (
    PASSWORD,
    Account,
    audit_events,
    bearer,
    make_account,
    refresh_refused,
    sign_in_again,
)

ME = "/api/v1/me"
EMAIL = "zawadi.otieno@example.com"
PHONE = "+254722000111"


async def _delete(
    client: httpx2.AsyncClient, account: Account | dict[str, str], body: Any = None
) -> httpx2.Response:
    headers = account.headers if isinstance(account, Account) else account
    if body is None:
        return await client.delete(ME, headers=headers)
    return await client.request("DELETE", ME, headers=headers, json=body)


async def _give_the_account_everything(runtime: Runtime, account: Account) -> str:
    """Second factor, recovery codes, a social link, pending links and codes, a throttle
    count and an API key; the API key's secret is returned."""
    now = runtime.clock.now()
    later = now + dt.timedelta(minutes=5)
    api_key = f"soko_{secrets.token_hex(4)}_{secrets.token_hex(24)}"
    phone_idx = phone_index(runtime.data_keys, PHONE)
    async with runtime.db.transaction() as session:
        session.add(
            TotpFactor(
                user_id=account.user_id,
                secret_ciphertext="sealed",
                confirmed_at=now,
                created_at=now,
            )
        )
        for _ in range(3):
            session.add(
                RecoveryCode(
                    id=uuid7(),
                    user_id=account.user_id,
                    code_hash=secrets.token_hex(32),
                    created_at=now,
                )
            )
        session.add(
            ExternalIdentity(
                id=uuid7(),
                user_id=account.user_id,
                provider="google",
                subject="1234567890",
                created_at=now,
            )
        )
        session.add(
            VerificationToken(
                id=uuid7(),
                user_id=account.user_id,
                purpose="password_reset",
                token_hash=secrets.token_hex(32),
                created_at=now,
                expires_at=later,
            )
        )
        session.add(
            MfaChallenge(
                id=uuid7(),
                user_id=account.user_id,
                token_hash=secrets.token_hex(32),
                method="password",
                created_at=now,
                expires_at=later,
            )
        )
        session.add(
            OneTimeCode(
                id=uuid7(),
                phone_index=phone_idx,
                purpose="sign_in",
                code_hash=secrets.token_hex(32),
                created_at=now,
                expires_at=later,
            )
        )
        session.add(
            LoginThrottle(
                key=account_key(email_index(runtime.data_keys, EMAIL)).key,
                failures=1,
                updated_at=now,
            )
        )
        session.add(
            ApiKey(
                id=uuid7(),
                user_id=account.user_id,
                name="shop sync",
                prefix=api_key.rsplit("_", 1)[0],
                key_hash=hash_secret(api_key),
                permissions=[ACCOUNT_SELF],
                created_at=now,
            )
        )
    return api_key


async def _count(runtime: Runtime, table: Any, *where: Any) -> int:
    async with runtime.db.transaction(read_only=True) as session:
        return int(await session.scalar(select(func.count()).select_from(table).where(*where)))


async def _database_dump(runtime: Runtime) -> str:
    """Every row of every table as text: what a stolen backup would show."""
    lines: list[str] = []
    async with runtime.db.transaction(read_only=True) as session:
        for table in Base.metadata.sorted_tables:
            rows = (await session.execute(text(f'SELECT * FROM "{table.name}"'))).all()
            lines += [f"{table.name}: {tuple(row)!r}" for row in rows]
    return "\n".join(lines)


# -- deleting ----------------------------------------------------------------------------------


async def test_deleting_erases_personal_data_and_keeps_the_row(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime, email=EMAIL, phone=PHONE, display_name="Zawadi Otieno")
    other_device = await sign_in_again(runtime, account.user_id)
    await _give_the_account_everything(runtime, account)
    bystander = await make_account(runtime)
    indexes = (email_index(runtime.data_keys, EMAIL), phone_index(runtime.data_keys, PHONE))
    async with runtime.db.transaction(read_only=True) as session:
        before = await session.get(User, account.user_id)
        assert before is not None
        ciphertexts = (before.email_ciphertext, before.phone_ciphertext)
        version_before = before.version
        devices = (
            await session.scalars(select(AuthSession).where(AuthSession.user_id == before.id))
        ).all()
        assert all(row.device_name and row.user_agent for row in devices)

    response = await _delete(
        client,
        {**account.headers, "X-Request-ID": "delete-zawadi"},
        {"password": PASSWORD},
    )
    assert response.status_code == 204, response.text

    async with runtime.db.transaction(read_only=True) as session:
        user = await session.get(User, account.user_id)
        assert user is not None, "the row stays so kept records still resolve"
        assert (user.email_ciphertext, user.email_index, user.email_verified_at) == (None,) * 3
        assert (user.phone_ciphertext, user.phone_index, user.phone_verified_at) == (None,) * 3
        assert user.password_hash is None
        assert user.display_name == DELETED_DISPLAY_NAME
        assert user.status == "deleted"
        assert user.deleted_at == runtime.clock.now()
        assert user.version == version_before + 1
        assert await find_user_by_email(session, runtime.data_keys, EMAIL) is None
        sessions = (
            await session.scalars(select(AuthSession).where(AuthSession.user_id == user.id))
        ).all()
        assert {row.id for row in sessions} == {account.pair.session_id, other_device.session_id}
        assert all(row.revoked_reason == "account_deleted" for row in sessions)
        # Where and on what the person signed in goes too.
        assert {(row.device_name, row.user_agent, row.ip) for row in sessions} == {("", "", "")}
        api_key = (await session.scalars(select(ApiKey).where(ApiKey.user_id == user.id))).one()
        assert api_key.revoked_at == runtime.clock.now()
        assert api_key.name == ""
    for table in (
        TotpFactor,
        RecoveryCode,
        ExternalIdentity,
        VerificationToken,
        MfaChallenge,
        UserRole,
    ):
        assert await _count(runtime, table, table.user_id == account.user_id) == 0, table
    assert await _count(runtime, OneTimeCode, OneTimeCode.phone_index.in_(indexes)) == 0
    assert await _count(runtime, LoginThrottle) == 0

    dump = await _database_dump(runtime)
    for trace in (EMAIL, PHONE, "Zawadi", *indexes, *ciphertexts):
        assert trace not in dump, trace
    assert str(account.user_id) in dump

    (event,) = await audit_events(runtime, "account.deleted")
    assert event["actor_id"] == account.user_id
    assert (event["target_type"], event["target_id"]) == ("user", str(account.user_id))
    assert event["request_id"] == "delete-zawadi"
    assert event["data"] == {"sessions_revoked": 2, "api_keys_revoked": 1}
    async with runtime.db.transaction(read_only=True) as session:
        published = (
            await session.scalars(
                select(OutboxMessage).where(OutboxMessage.name == USER_DELETED_EVENT)
            )
        ).all()
    assert [message.payload for message in published] == [{"user_id": str(account.user_id)}]

    # Nobody else was touched.
    assert (await client.get(ME, headers=bystander.headers)).status_code == 200


async def test_nothing_the_deleted_account_held_works(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime, email=EMAIL, phone=PHONE)
    other_device = await sign_in_again(runtime, account.user_id)
    api_key = await _give_the_account_everything(runtime, account)
    # Each credential works, and its principal is cached.
    for headers in (account.headers, bearer(other_device), {"Authorization": f"Bearer {api_key}"}):
        assert (await client.get(ME, headers=headers)).status_code == 200

    assert (await _delete(client, account, {"password": PASSWORD})).status_code == 204

    for headers in (account.headers, bearer(other_device), {"Authorization": f"Bearer {api_key}"}):
        assert (await client.get(ME, headers=headers)).status_code == 401
    for refresh_token in (account.pair.refresh_token, other_device.refresh_token):
        assert await refresh_refused(client, refresh_token)
    for identifier in (EMAIL, PHONE):
        login = await client.post(
            "/api/v1/auth/login", json={"identifier": identifier, "password": PASSWORD}
        )
        assert login.status_code == 401, login.text
        assert login.json()["type"] == "/problems/invalid-credentials"


async def test_the_email_and_phone_are_free_for_a_new_account(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime, email=EMAIL, phone=PHONE)
    assert (await _delete(client, account, {"password": PASSWORD})).status_code == 204
    async with runtime.db.transaction() as session:
        fresh = await create_user(
            session, runtime.data_keys, now=runtime.clock.now(), email=EMAIL, phone=PHONE
        )
    assert fresh.id != account.user_id


# -- proving ownership -----------------------------------------------------------------------------


@pytest.mark.parametrize("body", [None, {}, {"password": None}, {"password": ""}])
async def test_a_password_account_must_send_its_password(
    client: httpx2.AsyncClient, runtime: Runtime, body: Any
) -> None:
    account = await make_account(runtime)
    response = await _delete(client, account, body)
    assert response.status_code == 403
    assert response.json()["type"] == "/problems/reauthentication-required"
    assert (await client.get(ME, headers=account.headers)).status_code == 200


async def test_a_wrong_password_is_refused_counted_and_audited(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime, email=EMAIL)
    response = await _delete(client, account, {"password": "guessing-at-random-here"})
    assert response.status_code == 403
    assert response.json()["type"] == "/problems/reauthentication-required"
    async with runtime.db.transaction(read_only=True) as session:
        user = await session.get(User, account.user_id)
        assert user is not None and user.status == "active"
        throttled = await session.get(
            LoginThrottle, account_key(email_index(runtime.data_keys, EMAIL)).key
        )
        assert throttled is not None and throttled.failures == 1
    (event,) = await audit_events(runtime, "account.reauthentication_failed")
    assert event["actor_id"] == account.user_id
    assert "guessing" not in str(event)
    assert (await client.get(ME, headers=account.headers)).status_code == 200


async def test_password_guesses_share_the_sign_in_throttle(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime, email=EMAIL)
    for _ in range(ACCOUNT_RULE.free_attempts):
        wrong = await _delete(client, account, {"password": "guessing-at-random-here"})
        assert wrong.status_code == 403
    # Now the account waits, and even the right password is not looked at...
    waiting = await _delete(client, account, {"password": PASSWORD})
    assert waiting.status_code == 429
    assert int(waiting.headers["retry-after"]) >= 1
    # ...nor may the login form be used to keep guessing.
    login = await client.post("/api/v1/auth/login", json={"identifier": EMAIL, "password": "x"})
    assert login.status_code == 429
    assert isinstance(runtime.clock, ManualClock)
    runtime.clock.advance(int(waiting.headers["retry-after"]))
    assert (await _delete(client, account, {"password": PASSWORD})).status_code == 204


async def test_a_passwordless_account_needs_a_recent_sign_in(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    assert isinstance(runtime.clock, ManualClock)
    account = await make_account(runtime, phone=PHONE, password=None, method="sms")
    runtime.clock.advance(dt.timedelta(minutes=11))
    stale = await _delete(client, account)
    assert stale.status_code == 403
    assert stale.json()["type"] == "/problems/reauthentication-required"
    fresh = await sign_in_again(runtime, account.user_id, method="sms")
    runtime.clock.advance(dt.timedelta(minutes=9))
    response = await _delete(client, bearer(fresh))
    assert response.status_code == 204, response.text
    async with runtime.db.transaction(read_only=True) as session:
        user = await session.get(User, account.user_id)
        assert user is not None and user.status == "deleted" and user.phone_index is None


async def test_an_api_key_cannot_delete_the_account(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime, email=EMAIL, phone=PHONE)
    api_key = await _give_the_account_everything(runtime, account)
    response = await _delete(client, {"Authorization": f"Bearer {api_key}"}, {"password": PASSWORD})
    assert response.status_code == 403
    assert response.json()["type"] == "/problems/reauthentication-required"
    assert await _count(runtime, AuditEvent, AuditEvent.action == "account.deleted") == 0


async def test_deleting_refuses_unknown_fields(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime)
    response = await _delete(client, account, {"password": PASSWORD, "keep_orders": False})
    assert response.status_code == 422
    assert (await client.get(ME, headers=account.headers)).status_code == 200


async def test_the_deleted_user_id_still_names_its_audit_trail(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    account = await make_account(runtime)
    other = await sign_in_again(runtime, account.user_id)
    assert (
        await client.delete(f"{ME}/sessions/{other.session_id}", headers=account.headers)
    ).status_code == 204
    assert (await _delete(client, account, {"password": PASSWORD})).status_code == 204
    async with runtime.db.transaction(read_only=True) as session:
        actions = (
            await session.scalars(
                select(AuditEvent.action)
                .where(AuditEvent.actor_id == account.user_id)
                .order_by(AuditEvent.seq)
            )
        ).all()
        assert await session.get(User, account.user_id) is not None
    assert actions == ["auth.session_revoked", "account.deleted"]
