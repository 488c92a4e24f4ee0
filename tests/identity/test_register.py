"""Registration with an email and a password, and email verification, over HTTP."""

from __future__ import annotations

import asyncio

import httpx2
import pytest
from sqlalchemy import func, select

from soko.identity.accounts import normalize_email
from soko.identity.models import Role, User, UserRole, VerificationToken
from soko.platform.clock import ManualClock
from soko.platform.errors import ValidationFailed
from soko.platform.runtime import Runtime
from tests.identity.signin_support import (
    AUTH,
    PASSWORD,
    audit_events,
    bearer,
    change_settings,
    load_user,
    mailed,
    mailed_token,
    new_email,
    register,
)


async def test_register_signs_the_customer_in_and_mails_a_verification_link(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    email = new_email()
    response = await register(client, email)
    assert response.status_code == 201, response.text
    tokens = response.json()
    assert tokens["token_type"] == "Bearer"
    assert tokens["refresh_token"].startswith("rt_")
    assert tokens["expires_in"] == runtime.settings.access_token_ttl_seconds

    user = await load_user(runtime, tokens["user_id"])
    assert user.display_name == "Wanjiru"
    assert user.email_verified_at is None
    assert user.password_hash is not None and user.password_hash.startswith("$argon2id$")
    assert email not in (user.email_ciphertext or "")
    async with runtime.db.transaction(read_only=True) as session:
        roles = (
            await session.scalars(select(UserRole.role).where(UserRole.user_id == user.id))
        ).all()
        stored = (await session.scalars(select(VerificationToken.token_hash))).all()
    assert roles == [Role.customer.value]

    messages = await mailed(runtime, email)
    assert [m["category"] for m in messages] == ["identity.email_verification"]
    token = await mailed_token(runtime, email, "verify-email")
    assert token.startswith("ev_")
    assert token not in stored  # only its hash is kept

    [event] = await audit_events(runtime, "account.registered")
    assert event.target_id == tokens["user_id"]
    assert event.data["session"] == tokens["session_id"]

    # The tokens work: the new session can sign itself out.
    signed_out = await client.post(f"{AUTH}/logout", headers=bearer(tokens))
    assert signed_out.status_code == 204


async def test_email_verification_link_works_once(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    email = new_email()
    registered = await register(client, email)
    token = await mailed_token(runtime, email, "verify-email")

    first = await client.post(f"{AUTH}/email/verify", json={"token": token})
    assert first.status_code == 204, first.text
    user = await load_user(runtime, registered.json()["user_id"])
    assert user.email_verified_at == runtime.clock.now()
    assert len(await audit_events(runtime, "account.email_verified")) == 1

    again = await client.post(f"{AUTH}/email/verify", json={"token": token})
    assert again.status_code == 400
    assert again.json()["type"] == "/problems/invalid-link-token"
    forged = await client.post(
        f"{AUTH}/email/verify",
        json={"token": token[:-2] + ("yy" if token.endswith("xx") else "xx")},
    )
    assert forged.status_code == 400


async def test_email_verification_link_expires_after_a_day(
    client: httpx2.AsyncClient, runtime: Runtime, clock: ManualClock
) -> None:
    email = new_email()
    registered = await register(client, email)
    token = await mailed_token(runtime, email, "verify-email")
    clock.advance(24 * 3600)
    expired = await client.post(f"{AUTH}/email/verify", json={"token": token})
    assert expired.status_code == 400
    user = await load_user(runtime, registered.json()["user_id"])
    assert user.email_verified_at is None


async def test_weak_passwords_are_refused_with_every_reason(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    short = await register(client, new_email(), "wanjiru")
    assert short.status_code == 422
    body = short.json()
    assert body["type"] == "/problems/weak-password"
    assert "too_short" in body["reasons"]
    assert "matches_account" in body["reasons"]  # it is the display name

    common = await register(client, new_email(), "password123")
    assert common.status_code == 422
    assert common.json()["reasons"] == ["common"]

    too_long = await register(client, new_email(), "k" + "x7" * 200)
    assert too_long.status_code == 422
    assert too_long.json()["reasons"] == ["too_long"]

    async with runtime.db.transaction(read_only=True) as session:
        assert await session.scalar(select(func.count()).select_from(User)) == 0


async def test_malformed_email_is_a_validation_problem(client: httpx2.AsyncClient) -> None:
    response = await register(client, "not-an-email")
    assert response.status_code == 422
    body = response.json()
    assert body["type"] == "/problems/validation-error"
    assert body["errors"][0]["field"] == "email"


# Each of these once made an account (a lookalike of a real one, or one no mail could
# reach); the first made the registration a 500 when its link was mailed.
HOSTILE_EMAILS = [
    "<svg/onload=alert(1)>@x.co",
    "amina@soko.example\u0007",  # a control character
    "amina@soko.example\u200b",  # a zero-width space after the address
    "am\u200dina@soko.example",  # a zero-width joiner inside it
    "\uff41mina@soko.example",  # a full-width a
    'a"b@x.co',
    "amina@[127.0.0.1]",
    "amina@10.0.0.1",
    ".amina@soko.example",
    "ami..na@soko.example",
    "amina@soko",
    "amina@-soko.example",
    "a,b@soko.example",
    "a@b@soko.example",
    "p\u0430ypal@soko.example",  # a Cyrillic a among Latin letters
    "amina@s\u03bfko.example",  # a Greek omicron in a Latin domain label
    "\u0430min\u0430@\u0441\u043ek\u043e.example",  # Cyrillic with a Latin k
    "\u12a0\u1260be@soko.example",  # Ethiopic with Latin in one part
]


@pytest.mark.parametrize("email", HOSTILE_EMAILS)
def test_an_address_no_mail_system_would_take_is_refused(email: str) -> None:
    with pytest.raises(ValidationFailed) as refused:
        normalize_email(email)
    assert [error["field"] for error in refused.value.extensions["errors"]] == ["email"]


async def test_registering_such_an_address_is_a_validation_problem(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    for email in HOSTILE_EMAILS[:2]:
        response = await register(client, email)
        assert response.status_code == 422, (email, response.text)
        assert [error["field"] for error in response.json()["errors"]] == ["email"], email
    async with runtime.db.transaction(read_only=True) as session:
        assert await session.scalar(select(func.count()).select_from(User)) == 0
    # Addresses of every script, and the atext symbols, still register.
    for email in (
        "jürgen.o'brien+soko@bücher.de",
        "用户@例子.广告",
        "a_b-c{x}@sub.example.co.ke",
        "иван.smith@почта.example",  # one script in each part
        "\u12a0\u1260\u1260@soko.et",  # Ethiopic (Amharic)
        "tanaka\u3055\u3093\u7530\u4e2d@example.jp",  # Latin, Hiragana and Han
        "\u0915\u093f\u0930\u0923@example.in",  # Devanagari with a vowel sign
    ):
        assert (await register(client, email)).status_code == 201, email


async def test_second_registration_of_an_email_is_a_conflict(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    email = new_email()
    assert (await register(client, email)).status_code == 201
    # Case and surrounding spaces do not make another address.
    again = await register(client, "  " + email.upper() + " ")
    assert again.status_code == 409
    assert again.json()["type"] == "/problems/account-exists"
    assert len(await mailed(runtime, email)) == 1


async def test_concurrent_registrations_of_one_email_make_one_account(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    email = new_email()
    answers = await asyncio.gather(
        register(client, email, PASSWORD), register(client, email, PASSWORD + "-b")
    )
    assert sorted(answer.status_code for answer in answers) == [201, 409]
    async with runtime.db.transaction(read_only=True) as session:
        assert await session.scalar(select(func.count()).select_from(User)) == 1
    assert len(await audit_events(runtime, "account.registered")) == 1


async def test_sign_up_when_customers_need_mfa_answers_an_enrollment_challenge(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    """A sign-up never hands out what a sign-in would not: with MFA required for
    customers, the new account must enroll an authenticator before it gets tokens."""
    await change_settings(runtime, mfa_required_roles=["customer"])
    response = await client.post(
        "/api/v1/auth/register",
        json={"email": "amani@example.com", "password": "a long enough passphrase 7"},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["mfa_required"] is True and body["methods"] == ["enroll"]
    assert "access_token" not in body
