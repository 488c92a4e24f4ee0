"""Two-factor sign-in over HTTP: enrollment, confirmation and recovery codes, the sign-in
challenge, single use of every code, attempt and time limits, disabling, and the secret
encrypted at rest. Codes come from soko.platform.otp (RFC 6238) at the test clock's time."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import uuid
from typing import Any

import httpx2
import pytest
from sqlalchemy import select, text, update

from soko.identity import mfa
from soko.identity.errors import MfaEnrollmentRequired, MfaNotEnabled
from soko.identity.login_methods import LOGIN_SETTINGS_TAG
from soko.identity.models import (
    AuthSession,
    IdentitySetting,
    MfaChallenge,
    RecoveryCode,
    Role,
    TotpFactor,
    User,
    UserStatus,
)
from soko.platform.clock import ManualClock
from soko.platform.crypto import DecryptionError
from soko.platform.errors import RateLimited
from soko.platform.otp import TotpProvisioning, decode_secret, totp
from soko.platform.runtime import Runtime
from tests.identity.mfa_support import (
    DEVICE,
    ENROLL,
    ENROLL_CONFIRM,
    MFA,
    PASSWORD,
    VERIFY,
    Holder,
    audit_actions,
    code_now,
    enable_mfa,
    enroll,
    make_holder,
    next_step,
    open_challenge,
    other_code,
    password_login,
    require_mfa_for,
)
from tests.identity.signin_support import LAPTOP_UA
from tests.identity.sms_support import ask_code, kenyan_number, last_code, send_code

RECOVERY_CODE_SHAPE = re.compile(r"^[a-z2-7]{5}-[a-z2-7]{5}$")


def _problem(answer: httpx2.Response, status: int, slug: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["type"] == f"/problems/{slug}"


async def _status(client: httpx2.AsyncClient, holder: Holder) -> dict[str, Any]:
    answer = await client.get(MFA, headers=holder.headers)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def _verify(client: httpx2.AsyncClient, token: str, **proof: str) -> httpx2.Response:
    return await client.post(VERIFY, json={"challenge_token": token, **proof})


# -- enrollment and confirmation ----------------------------------------------------------


async def test_enrollment_answers_a_secret_and_an_otpauth_uri(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await make_holder(runtime, email="wanjiru.k@example.com")
    body = await enroll(client, holder)
    assert body["confirmed"] is False
    assert len(decode_secret(body["secret"])) == 20  # 160 bits
    parsed = TotpProvisioning.parse(body["otpauth_uri"])
    assert parsed.issuer == "Soko"
    assert parsed.account == "wanjiru.k@example.com"
    assert parsed.secret == body["secret"]
    assert (parsed.digits, parsed.period, parsed.algorithm) == (6, 30, "SHA1")
    assert await _status(client, holder) == {
        "totp_enabled": False,
        "enrollment_pending": True,
        "recovery_codes_left": 0,
    }
    # Not on yet: a sign-in still gets tokens without a second factor.
    async with runtime.db.transaction(read_only=True) as session:
        user = await session.get(User, holder.user_id)
        assert user is not None
        assert not await mfa.second_factor_needed(session, runtime, user)


async def test_the_account_label_is_the_phone_without_an_email(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await make_holder(runtime, phone="+254712345678")
    body = await enroll(client, holder)
    assert TotpProvisioning.parse(body["otpauth_uri"]).account == "+254712345678"


async def test_enrolling_again_before_confirming_replaces_the_secret(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await make_holder(runtime)
    first = await enroll(client, holder)
    first_secret = holder.secret
    second = await enroll(client, holder)
    assert second["secret"] != first["secret"]
    assert first_secret is not None
    stale = totp(first_secret, runtime.clock.now())
    if stale != code_now(runtime, holder):  # a 1-in-a-million collision proves nothing
        refused = await client.post(
            f"{MFA}/totp/confirm", headers=holder.headers, json={"code": stale}
        )
        _problem(refused, 400, "invalid-code")
    answer = await client.post(
        f"{MFA}/totp/confirm", headers=holder.headers, json={"code": code_now(runtime, holder)}
    )
    assert answer.status_code == 200, answer.text
    async with runtime.db.transaction(read_only=True) as session:
        count = (await session.scalars(select(TotpFactor.user_id))).all()
    assert count == [holder.user_id]


async def test_confirming_turns_mfa_on_and_shows_ten_recovery_codes_once(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await make_holder(runtime)
    await enroll(client, holder)
    wrong = await client.post(
        f"{MFA}/totp/confirm", headers=holder.headers, json={"code": other_code(runtime, holder)}
    )
    _problem(wrong, 400, "invalid-code")
    assert (await _status(client, holder))["totp_enabled"] is False

    answer = await client.post(
        f"{MFA}/totp/confirm", headers=holder.headers, json={"code": code_now(runtime, holder)}
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    codes = answer.json()["recovery_codes"]
    assert len(codes) == 10 and len(set(codes)) == 10
    assert all(RECOVERY_CODE_SHAPE.match(code) for code in codes)
    assert await _status(client, holder) == {
        "totp_enabled": True,
        "enrollment_pending": False,
        "recovery_codes_left": 10,
    }

    # Shown once: confirming again or re-enrolling does not show them (or a secret) again.
    next_step(runtime)
    again = await client.post(
        f"{MFA}/totp/confirm", headers=holder.headers, json={"code": code_now(runtime, holder)}
    )
    _problem(again, 409, "mfa-already-enabled")
    _problem(await client.post(f"{MFA}/totp", headers=holder.headers), 409, "mfa-already-enabled")

    async with runtime.db.transaction(read_only=True) as session:
        stored = (
            await session.scalars(
                select(RecoveryCode.code_hash).where(RecoveryCode.user_id == holder.user_id)
            )
        ).all()
    assert len(stored) == 10
    for code in codes:
        assert all(code not in value and code.replace("-", "") not in value for value in stored)
    assert [action for action, _ in await audit_actions(runtime, holder.user_id)] == ["mfa.enabled"]


async def test_confirming_without_enrolling_is_refused(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await make_holder(runtime)
    answer = await client.post(
        f"{MFA}/totp/confirm", headers=holder.headers, json={"code": "123456"}
    )
    _problem(answer, 409, "mfa-not-enabled")


async def test_the_secret_is_not_stored_in_clear(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await make_holder(runtime)
    body = await enroll(client, holder)
    secret = body["secret"]
    async with runtime.db.transaction(read_only=True) as session:
        rows = (await session.execute(text("SELECT * FROM totp_factors"))).all()
    assert len(rows) == 1
    dump = " ".join(str(value) for value in rows[0])
    assert secret not in dump and secret.lower() not in dump
    stored = rows[0]._mapping["secret_ciphertext"]
    # Bound to its row: it decrypts for this user only.
    keyring = runtime.data_keys.keyring
    assert keyring.decrypt(stored, context=f"totp_factors.secret:{holder.user_id}") == secret
    with pytest.raises(DecryptionError):
        keyring.decrypt(stored, context="totp_factors.secret:00000000-0000-0000-0000-000000000000")


async def test_api_keys_and_strangers_cannot_manage_the_factor(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    _problem(await client.post(f"{MFA}/totp"), 401, "unauthorized")
    _problem(await client.get(MFA), 401, "unauthorized")
    holder = await make_holder(runtime)
    created = await client.post(
        "/api/v1/me/api-keys",
        headers=holder.headers,
        json={"name": "shop sync", "permissions": ["account:self"]},
    )
    assert created.status_code == 201, created.text
    key_headers = {"Authorization": f"Bearer {created.json()['key']}"}
    _problem(await client.post(f"{MFA}/totp", headers=key_headers), 403, "forbidden")
    async with runtime.db.transaction(read_only=True) as session:
        assert (await session.scalars(select(TotpFactor))).all() == []


# -- the sign-in challenge --------------------------------------------------------------


async def test_a_challenge_completed_with_a_totp_code_signs_in(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await enable_mfa(client, runtime, await make_holder(runtime))
    token = await open_challenge(runtime, holder)
    assert token.startswith("mfa_")

    answer = await client.post(
        VERIFY,
        json={"challenge_token": token, "code": code_now(runtime, holder)},
        headers={"User-Agent": DEVICE.user_agent},
    )
    assert answer.status_code == 200, answer.text
    pair = answer.json()
    assert pair["token_type"] == "Bearer" and pair["user_id"] == str(holder.user_id)
    assert pair["refresh_token"].startswith("rt_")
    # The new tokens work.
    me = await client.get(MFA, headers={"Authorization": f"Bearer {pair['access_token']}"})
    assert me.status_code == 200 and me.json()["totp_enabled"] is True
    async with runtime.db.transaction(read_only=True) as session:
        signed_in = await session.get(AuthSession, uuid.UUID(pair["session_id"]))
        assert signed_in is not None
        assert signed_in.mfa_verified is True
        assert signed_in.method == "password"
        assert signed_in.device_name == "Chrome on Android"
        challenge = (await session.scalars(select(MfaChallenge))).one()
        assert challenge.used_at is not None and challenge.attempts == 1
        assert token not in challenge.token_hash

    # Single use: the completed challenge is refused, even with a new valid code.
    next_step(runtime)
    _problem(
        await _verify(client, token, code=code_now(runtime, holder)), 401, "invalid-mfa-challenge"
    )

    logins = [
        data
        for action, data in await audit_actions(runtime, holder.user_id)
        if action == "auth.login"
    ]
    assert len(logins) == 1
    assert logins[0]["mfa"] is True and logins[0]["method"] == "password"
    assert logins[0]["factor"] == "totp" and logins[0]["session"] == pair["session_id"]


async def test_the_same_totp_code_is_never_accepted_twice(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await enable_mfa(client, runtime, await make_holder(runtime))
    code = code_now(runtime, holder)
    first = await open_challenge(runtime, holder)
    assert (await _verify(client, first, code=code)).status_code == 200

    # Still within its 30 seconds, and within the window a step later: refused both times.
    second = await open_challenge(runtime, holder)
    _problem(await _verify(client, second, code=code), 400, "invalid-code")
    next_step(runtime)
    _problem(await _verify(client, second, code=code), 400, "invalid-code")
    # The next step's code is fresh.
    assert (await _verify(client, second, code=code_now(runtime, holder))).status_code == 200

    actions = [action for action, _ in await audit_actions(runtime, holder.user_id)]
    assert actions == [
        "mfa.enabled",
        "auth.new_device",  # the test client's User-Agent, not the holder's phone
        "auth.login",
        "auth.mfa_failed",
        "auth.mfa_failed",
        "auth.login",
    ]


async def test_an_older_code_is_refused_after_a_newer_one(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await enable_mfa(client, runtime, await make_holder(runtime))
    assert holder.secret is not None
    older = code_now(runtime, holder)
    next_step(runtime)
    newer = code_now(runtime, holder)
    assert (
        await _verify(client, await open_challenge(runtime, holder), code=newer)
    ).status_code == 200
    # ``older`` is still inside the one-step window, but its step is before the used one.
    if older != newer:
        token = await open_challenge(runtime, holder)
        _problem(await _verify(client, token, code=older), 400, "invalid-code")


async def test_two_concurrent_uses_of_one_code_let_exactly_one_through(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await enable_mfa(client, runtime, await make_holder(runtime))
    tokens = [await open_challenge(runtime, holder) for _ in range(2)]
    code = code_now(runtime, holder)
    answers = await asyncio.gather(*(_verify(client, token, code=code) for token in tokens))
    assert sorted(answer.status_code for answer in answers) == [200, 400]


async def test_a_recovery_code_signs_in_once(client: httpx2.AsyncClient, runtime: Runtime) -> None:
    holder = await enable_mfa(client, runtime, await make_holder(runtime))
    code = holder.recovery_codes[3]
    typed = " " + code.upper().replace("-", " ") + " "  # as someone copies it off paper
    answer = await _verify(client, await open_challenge(runtime, holder), recovery_code=typed)
    assert answer.status_code == 200, answer.text
    assert (await _status(client, holder))["recovery_codes_left"] == 9

    token = await open_challenge(runtime, holder)
    _problem(await _verify(client, token, recovery_code=code), 400, "invalid-code")
    _problem(await _verify(client, token, recovery_code="zzzzz-zzzzz"), 400, "invalid-code")
    # Another one still works on the same challenge.
    again = await _verify(client, token, recovery_code=holder.recovery_codes[4])
    assert again.status_code == 200, again.text
    logins = [
        data
        for action, data in await audit_actions(runtime, holder.user_id)
        if action == "auth.login"
    ]
    assert [data["factor"] for data in logins] == ["recovery_code", "recovery_code"]
    assert [data["recovery_left"] for data in logins] == [9, 8]


async def test_the_sixth_attempt_is_refused_even_with_the_right_code(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await enable_mfa(client, runtime, await make_holder(runtime))
    token = await open_challenge(runtime, holder)
    wrong = other_code(runtime, holder)
    for _ in range(5):
        _problem(await _verify(client, token, code=wrong), 400, "invalid-code")
    _problem(
        await _verify(client, token, code=code_now(runtime, holder)), 401, "invalid-mfa-challenge"
    )
    _problem(
        await _verify(client, token, recovery_code=holder.recovery_codes[0]),
        401,
        "invalid-mfa-challenge",
    )
    async with runtime.db.transaction(read_only=True) as session:
        challenge = (await session.scalars(select(MfaChallenge))).one()
        # Every failed attempt was committed with its refusal.
        assert challenge.attempts == 5 and challenge.used_at is None
    failures = [action for action, _ in await audit_actions(runtime, holder.user_id)]
    assert failures.count("auth.mfa_failed") == 5 and "auth.login" not in failures
    # The right code was not spent by the refused attempt: a new challenge takes it.
    fresh = await open_challenge(runtime, holder)
    assert (await _verify(client, fresh, code=code_now(runtime, holder))).status_code == 200


async def test_an_expired_challenge_is_refused(
    client: httpx2.AsyncClient, runtime: Runtime, clock: ManualClock
) -> None:
    holder = await enable_mfa(client, runtime, await make_holder(runtime))
    token = await open_challenge(runtime, holder)
    clock.advance(dt.timedelta(minutes=4, seconds=59))
    still = await open_challenge(runtime, holder)
    clock.advance(dt.timedelta(seconds=2))  # the first is now 5 minutes and 1 second old
    _problem(
        await _verify(client, token, code=code_now(runtime, holder)), 401, "invalid-mfa-challenge"
    )
    assert (await _verify(client, still, code=code_now(runtime, holder))).status_code == 200


async def test_unknown_and_malformed_challenges_are_refused(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await enable_mfa(client, runtime, await make_holder(runtime))
    token = await open_challenge(runtime, holder)
    code = code_now(runtime, holder)
    _problem(await _verify(client, "mfa_" + "x" * 43, code=code), 401, "invalid-mfa-challenge")
    _problem(
        await _verify(client, token.removeprefix("mfa_"), code=code), 401, "invalid-mfa-challenge"
    )
    # Exactly one of code and recovery_code.
    _problem(await _verify(client, token), 422, "validation-error")
    _problem(
        await _verify(client, token, code=code, recovery_code=holder.recovery_codes[0]),
        422,
        "validation-error",
    )
    # None of these spent an attempt or the code.
    assert (await _verify(client, token, code=code)).status_code == 200


async def test_a_user_blocked_after_the_password_gets_no_tokens(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await enable_mfa(client, runtime, await make_holder(runtime))
    token = await open_challenge(runtime, holder)
    async with runtime.db.transaction() as session:
        await session.execute(
            update(User).where(User.id == holder.user_id).values(status=UserStatus.blocked.value)
        )
    _problem(await _verify(client, token, code=code_now(runtime, holder)), 403, "account-blocked")


async def test_a_challenge_needs_a_confirmed_factor(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await make_holder(runtime, roles=(Role.seller,))
    await enroll(client, holder)  # pending only
    async with runtime.db.transaction() as session:
        user = await session.get(User, holder.user_id)
        assert user is not None
        assert not await mfa.second_factor_needed(session, runtime, user)
        assert await mfa.mfa_required_roles(session) == frozenset()
        await mfa.enforce_enrollment(session, user)  # nothing required, nothing raised
        with pytest.raises(MfaNotEnabled):
            await mfa.start_challenge(session, runtime, user, method="password", device=DEVICE)


async def test_many_wrong_codes_pause_new_challenges_for_the_account(
    client: httpx2.AsyncClient, runtime: Runtime, clock: ManualClock
) -> None:
    holder = await enable_mfa(client, runtime, await make_holder(runtime))
    wrong = other_code(runtime, holder)
    for _ in range(4):
        token = await open_challenge(runtime, holder)
        for _ in range(5):
            _problem(await _verify(client, token, code=wrong), 400, "invalid-code")
        clock.advance(dt.timedelta(minutes=1))
    async with runtime.db.transaction() as session:
        user = await session.get(User, holder.user_id)
        assert user is not None
        with pytest.raises(RateLimited) as refused:
            await mfa.start_challenge(session, runtime, user, method="password", device=DEVICE)
    # The oldest failing challenge opened 4 minutes ago; it leaves the hour in 56.
    assert refused.value.headers["Retry-After"] == str(56 * 60)
    clock.advance(dt.timedelta(minutes=56))
    token = await open_challenge(runtime, holder)
    assert (await _verify(client, token, code=code_now(runtime, holder))).status_code == 200


async def test_roles_the_operator_names_must_enroll_before_signing_in(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    seller = await make_holder(runtime, roles=(Role.seller,))
    customer = await make_holder(runtime, roles=(Role.customer,))
    async with runtime.db.transaction() as session:
        session.add(
            IdentitySetting(
                key="mfa_required_roles", value=["seller"], updated_at=runtime.clock.now()
            )
        )
    # Written behind the API's back: sign-ins read the cached settings until told.
    await runtime.cache.invalidate_tags(LOGIN_SETTINGS_TAG)
    async with runtime.db.transaction() as session:
        assert await mfa.mfa_required_roles(session) == frozenset({"seller"})
        user = await session.get(User, seller.user_id)
        assert user is not None
        assert await mfa.second_factor_needed(session, runtime, user)
        # A path that cannot offer enrollment refuses; a sign-in gets a challenge to enroll.
        with pytest.raises(MfaEnrollmentRequired):
            await mfa.enforce_enrollment(session, user)
        challenge = await mfa.start_challenge(
            session, runtime, user, method="password", device=DEVICE
        )
        assert challenge.methods == ["enroll"] and challenge.expires_in == 300
        assert challenge.challenge_token.startswith("mfe_")
        other = await session.get(User, customer.user_id)
        assert other is not None
        assert not await mfa.second_factor_needed(session, runtime, other)
        await mfa.enforce_enrollment(session, other)
    # Enrolled from a session already open, the seller then gets a challenge.
    await enable_mfa(client, runtime, seller)
    token = await open_challenge(runtime, seller)
    assert (await _verify(client, token, code=code_now(runtime, seller))).status_code == 200
    async with runtime.db.transaction() as session:
        user = await session.get(User, seller.user_id)
        assert user is not None
        await mfa.enforce_enrollment(session, user)


# -- enrolling at sign-in, for roles that require MFA ---------------------------------------


async def _seller_with_password(runtime: Runtime) -> Holder:
    holder = await make_holder(runtime, roles=(Role.seller,), password=PASSWORD)
    await require_mfa_for(runtime, Role.seller)
    return holder


async def _enroll_challenge(client: httpx2.AsyncClient, holder: Holder) -> str:
    assert holder.email is not None
    body = await password_login(client, holder.email, user_agent=LAPTOP_UA)
    assert body["mfa_required"] is True and "access_token" not in body
    assert body["methods"] == ["enroll"] and body["expires_in"] == 300
    token: str = body["challenge_token"]
    assert token.startswith("mfe_")
    return token


async def _secret_for(client: httpx2.AsyncClient, holder: Holder, token: str) -> None:
    answer = await client.post(ENROLL, json={"challenge_token": token})
    assert answer.status_code == 201, answer.text
    assert answer.headers["cache-control"] == "no-store"
    body = answer.json()
    parsed = TotpProvisioning.parse(body["otpauth_uri"])
    assert parsed.secret == body["secret"] and parsed.account == holder.email
    holder.secret = decode_secret(body["secret"])


async def _confirm(client: httpx2.AsyncClient, token: str, code: str) -> httpx2.Response:
    return await client.post(
        ENROLL_CONFIRM,
        json={"challenge_token": token, "code": code},
        headers={"User-Agent": LAPTOP_UA},
    )


async def _challenge_row(runtime: Runtime, user_id: uuid.UUID) -> MfaChallenge:
    async with runtime.db.transaction(read_only=True) as session:
        return (
            await session.scalars(select(MfaChallenge).where(MfaChallenge.user_id == user_id))
        ).one()


async def test_a_role_requiring_mfa_enrolls_at_sign_in_and_gets_tokens_and_recovery_codes(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await _seller_with_password(runtime)
    token = await _enroll_challenge(client, holder)
    assert [action for action, _ in await audit_actions(runtime, holder.user_id)] == []

    await _secret_for(client, holder, token)
    # Asking again replaces the secret (as from a session); only the newest one confirms.
    first_secret = holder.secret
    await _secret_for(client, holder, token)
    assert holder.secret != first_secret

    answer = await _confirm(client, token, code_now(runtime, holder))
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert body["user_id"] == str(holder.user_id) and body["refresh_token"].startswith("rt_")
    codes = body["recovery_codes"]
    assert len(set(codes)) == 10 and all(RECOVERY_CODE_SHAPE.match(code) for code in codes)

    # The new tokens work, and the factor is on with its ten codes.
    signed_in = {"Authorization": f"Bearer {body['access_token']}"}
    status = await client.get(MFA, headers=signed_in)
    assert status.status_code == 200, status.text
    assert status.json() == {
        "totp_enabled": True,
        "enrollment_pending": False,
        "recovery_codes_left": 10,
    }
    async with runtime.db.transaction(read_only=True) as session:
        auth_session = await session.get(AuthSession, uuid.UUID(body["session_id"]))
        assert auth_session is not None
        assert auth_session.mfa_verified is True and auth_session.method == "password"
        assert auth_session.device_name == "Firefox on Windows"
    challenge = await _challenge_row(runtime, holder.user_id)
    assert challenge.used_at is not None and challenge.attempts == 1

    audit = await audit_actions(runtime, holder.user_id)
    assert [action for action, _ in audit] == ["mfa.enabled", "auth.new_device", "auth.login"]
    enabled, new_device, login = (data for _, data in audit)
    assert enabled["factor"] == "totp" and enabled["at_sign_in"] is True
    assert new_device["device"] == "Firefox on Windows"
    assert login["mfa"] is True and login["method"] == "password"
    assert login["factor"] == "totp" and login["enrolled"] is True
    assert login["session"] == body["session_id"]

    # From now on the password leads to a challenge to verify, answered with a recovery code.
    next_step(runtime)
    assert holder.email is not None
    again = await password_login(client, holder.email, user_agent=LAPTOP_UA)
    assert again["methods"] == ["totp", "recovery_code"]
    assert again["challenge_token"].startswith("mfa_")
    verified = await _verify(client, again["challenge_token"], recovery_code=codes[0])
    assert verified.status_code == 200, verified.text


async def test_enroll_and_verify_challenges_cannot_stand_in_for_each_other(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    seller = await _seller_with_password(runtime)
    enroll_token = await _enroll_challenge(client, seller)
    await _secret_for(client, seller, enroll_token)
    code = code_now(runtime, seller)
    # An enrollment challenge is no proof of a second factor, even with a right code...
    _problem(await _verify(client, enroll_token, code=code), 401, "invalid-mfa-challenge")
    # ...nor under the other kind's prefix: the prefix is part of the hashed token.
    swapped = "mfa_" + enroll_token.removeprefix("mfe_")
    _problem(await _verify(client, swapped, code=code), 401, "invalid-mfa-challenge")

    holder = await enable_mfa(client, runtime, await make_holder(runtime))
    verify_token = await open_challenge(runtime, holder)
    for token in (verify_token, "mfe_" + verify_token.removeprefix("mfa_")):
        _problem(
            await client.post(ENROLL, json={"challenge_token": token}),
            401,
            "invalid-mfa-challenge",
        )
        _problem(
            await _confirm(client, token, code_now(runtime, holder)),
            401,
            "invalid-mfa-challenge",
        )
    # The refusals spent nothing: both challenges still do their own job.
    assert (await _verify(client, verify_token, code=code_now(runtime, holder))).status_code == 200
    confirmed = await _confirm(client, enroll_token, code)
    assert confirmed.status_code == 200, confirmed.text
    assert (await _challenge_row(runtime, seller.user_id)).attempts == 1


async def test_an_enroll_challenge_is_single_use(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await _seller_with_password(runtime)
    token = await _enroll_challenge(client, holder)
    await _secret_for(client, holder, token)
    assert (await _confirm(client, token, code_now(runtime, holder))).status_code == 200
    next_step(runtime)
    _problem(
        await client.post(ENROLL, json={"challenge_token": token}), 401, "invalid-mfa-challenge"
    )
    _problem(await _confirm(client, token, code_now(runtime, holder)), 401, "invalid-mfa-challenge")
    logins = [a for a, _ in await audit_actions(runtime, holder.user_id) if a == "auth.login"]
    assert logins == ["auth.login"]


async def test_an_expired_enroll_challenge_is_refused(
    client: httpx2.AsyncClient, runtime: Runtime, clock: ManualClock
) -> None:
    holder = await _seller_with_password(runtime)
    token = await _enroll_challenge(client, holder)
    await _secret_for(client, holder, token)
    clock.advance(dt.timedelta(minutes=5, seconds=1))
    _problem(await _confirm(client, token, code_now(runtime, holder)), 401, "invalid-mfa-challenge")
    _problem(
        await client.post(ENROLL, json={"challenge_token": token}), 401, "invalid-mfa-challenge"
    )
    async with runtime.db.transaction(read_only=True) as session:
        factor = await session.get(TotpFactor, holder.user_id)
        assert factor is not None and factor.confirmed_at is None
        # No session was opened but the one the holder started with.
        sessions = (
            await session.scalars(select(AuthSession).where(AuthSession.user_id == holder.user_id))
        ).all()
        assert [row.user_agent for row in sessions] == [DEVICE.user_agent]
    # Signing in again opens a fresh challenge that confirms the pending secret.
    fresh = await _enroll_challenge(client, holder)
    assert (await _confirm(client, fresh, code_now(runtime, holder))).status_code == 200


async def test_wrong_enrollment_codes_are_counted_and_the_sixth_is_refused(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await _seller_with_password(runtime)
    token = await _enroll_challenge(client, holder)
    _problem(await _confirm(client, token, "123456"), 409, "mfa-not-enabled")  # no secret yet
    await _secret_for(client, holder, token)
    wrong = other_code(runtime, holder)
    for _ in range(5):
        _problem(await _confirm(client, token, wrong), 400, "invalid-code")
    _problem(await _confirm(client, token, code_now(runtime, holder)), 401, "invalid-mfa-challenge")
    _problem(
        await client.post(ENROLL, json={"challenge_token": token}), 401, "invalid-mfa-challenge"
    )
    challenge = await _challenge_row(runtime, holder.user_id)
    # Every wrong code was committed with its refusal; the right one was not taken.
    assert challenge.attempts == 5 and challenge.used_at is None
    audit = await audit_actions(runtime, holder.user_id)
    assert [action for action, _ in audit] == ["auth.mfa_failed"] * 5
    assert audit[0][1] == {"method": "password", "factor": "totp", "enrolling": True}
    async with runtime.db.transaction(read_only=True) as session:
        factor = await session.get(TotpFactor, holder.user_id)
        assert factor is not None and factor.confirmed_at is None


async def test_a_blocked_user_cannot_enroll_with_a_challenge(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await _seller_with_password(runtime)
    token = await _enroll_challenge(client, holder)
    await _secret_for(client, holder, token)
    async with runtime.db.transaction() as session:
        await session.execute(
            update(User).where(User.id == holder.user_id).values(status=UserStatus.blocked.value)
        )
    _problem(await _confirm(client, token, code_now(runtime, holder)), 403, "account-blocked")
    _problem(await client.post(ENROLL, json={"challenge_token": token}), 403, "account-blocked")


# -- every sign-in through a challenge ends like any other --------------------------------


async def test_a_password_sign_in_through_a_challenge_records_a_new_device(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await enable_mfa(client, runtime, await make_holder(runtime, password=PASSWORD))
    assert holder.email is not None

    def new_devices(audit: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        return [data for action, data in audit if action == "auth.new_device"]

    for round_ in range(2):
        body = await password_login(client, holder.email, user_agent=LAPTOP_UA)
        answer = await client.post(
            VERIFY,
            json={"challenge_token": body["challenge_token"], "code": code_now(runtime, holder)},
            headers={"User-Agent": LAPTOP_UA},
        )
        assert answer.status_code == 200, answer.text
        audit = await audit_actions(runtime, holder.user_id)
        # The laptop is new the first time only; the phone (DEVICE) never was.
        [event] = new_devices(audit)
        assert event["device"] == "Firefox on Windows" and event["method"] == "password"
        if round_ == 0:
            assert event["session"] == answer.json()["session_id"]
        next_step(runtime)
    logins = [data for action, data in audit if action == "auth.login"]
    assert [(data["method"], data["mfa"], data["factor"]) for data in logins] == [
        ("password", True, "totp"),
        ("password", True, "totp"),
    ]


async def test_an_sms_sign_in_through_a_challenge_records_a_new_device(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    phone = kenyan_number(41)
    holder = await enable_mfa(client, runtime, await make_holder(runtime, phone=phone))
    assert (await ask_code(client, phone)).status_code == 202
    body = (await send_code(client, phone, await last_code(runtime, phone))).json()
    assert body["mfa_required"] is True and body["methods"] == ["totp", "recovery_code"]
    answer = await client.post(
        VERIFY,
        json={
            "challenge_token": body["challenge_token"],
            "recovery_code": holder.recovery_codes[0],
        },
        headers={"User-Agent": LAPTOP_UA},
    )
    assert answer.status_code == 200, answer.text
    audit = await audit_actions(runtime, holder.user_id)
    assert [action for action, _ in audit][-2:] == ["auth.new_device", "auth.login"]
    new_device, login = audit[-2][1], audit[-1][1]
    assert new_device["device"] == "Firefox on Windows" and new_device["method"] == "sms"
    assert login["mfa"] is True and login["method"] == "sms"
    assert login["factor"] == "recovery_code" and login["recovery_left"] == 9


# -- disabling and new recovery codes ----------------------------------------------------


async def test_disabling_requires_a_fresh_code(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await make_holder(runtime)
    await enroll(client, holder)
    confirming = code_now(runtime, holder)
    confirmed = await client.post(
        f"{MFA}/totp/confirm", headers=holder.headers, json={"code": confirming}
    )
    assert confirmed.status_code == 200

    disable = f"{MFA}/totp/disable"
    _problem(
        await client.post(disable, headers=holder.headers, json={"code": confirming}),
        400,
        "invalid-code",
    )
    _problem(
        await client.post(
            disable, headers=holder.headers, json={"code": other_code(runtime, holder)}
        ),
        400,
        "invalid-code",
    )
    _problem(await client.post(disable, headers=holder.headers, json={}), 422, "validation-error")
    assert (await _status(client, holder))["totp_enabled"] is True

    next_step(runtime)
    answer = await client.post(
        disable, headers=holder.headers, json={"code": code_now(runtime, holder)}
    )
    assert answer.status_code == 204, answer.text
    assert await _status(client, holder) == {
        "totp_enabled": False,
        "enrollment_pending": False,
        "recovery_codes_left": 0,
    }
    async with runtime.db.transaction(read_only=True) as session:
        assert (await session.scalars(select(TotpFactor))).all() == []
        assert (await session.scalars(select(RecoveryCode))).all() == []
        user = await session.get(User, holder.user_id)
        assert user is not None
        assert not await mfa.second_factor_needed(session, runtime, user)
    audit = await audit_actions(runtime, holder.user_id)
    assert [action for action, _ in audit] == ["mfa.enabled", "mfa.disabled"]
    assert audit[-1][1]["proof"] == "totp"

    _problem(
        await client.post(
            disable, headers=holder.headers, json={"code": code_now(runtime, holder)}
        ),
        409,
        "mfa-not-enabled",
    )


async def test_disabling_with_a_recovery_code(client: httpx2.AsyncClient, runtime: Runtime) -> None:
    holder = await enable_mfa(client, runtime, await make_holder(runtime))
    answer = await client.post(
        f"{MFA}/totp/disable",
        headers=holder.headers,
        json={"recovery_code": holder.recovery_codes[9]},
    )
    assert answer.status_code == 204, answer.text
    assert (await _status(client, holder))["totp_enabled"] is False
    # And MFA can be enrolled afresh.
    await enroll(client, holder)


async def test_new_recovery_codes_replace_the_old_ones(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await enable_mfa(client, runtime, await make_holder(runtime))
    old = holder.recovery_codes
    _problem(
        await client.post(
            f"{MFA}/recovery-codes",
            headers=holder.headers,
            json={"code": other_code(runtime, holder)},
        ),
        400,
        "invalid-code",
    )
    answer = await client.post(
        f"{MFA}/recovery-codes", headers=holder.headers, json={"code": code_now(runtime, holder)}
    )
    assert answer.status_code == 200, answer.text
    new = answer.json()["recovery_codes"]
    assert len(new) == 10 and not set(new) & set(old)
    token = await open_challenge(runtime, holder)
    _problem(await _verify(client, token, recovery_code=old[0]), 400, "invalid-code")
    assert (await _verify(client, token, recovery_code=new[0])).status_code == 200
    assert "mfa.recovery_codes_regenerated" in [
        action for action, _ in await audit_actions(runtime, holder.user_id)
    ]


async def test_recovery_codes_need_mfa_on(client: httpx2.AsyncClient, runtime: Runtime) -> None:
    holder = await make_holder(runtime)
    answer = await client.post(
        f"{MFA}/recovery-codes", headers=holder.headers, json={"code": "123456"}
    )
    _problem(answer, 409, "mfa-not-enabled")


# -- races (PostgreSQL: SQLite admits one writing transaction at a time) ------------------

ON_POSTGRESQL = pytest.mark.parametrize(
    "backend", [pytest.param("postgresql", marks=pytest.mark.postgresql)]
)


async def _until_waiting_on_a_lock(runtime: Runtime, task: asyncio.Task[Any]) -> None:
    """Return once ``task``'s transaction waits for a row lock (or it has finished)."""
    while not task.done():
        async with runtime.db.transaction(read_only=True) as session:
            waiting = await session.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted"))
        if waiting:
            return
        await asyncio.sleep(0.01)


@ON_POSTGRESQL
async def test_a_totp_code_raced_by_two_transactions_is_spent_once(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await enable_mfa(client, runtime, await make_holder(runtime))
    code = code_now(runtime, holder)
    async with runtime.db.sessionmaker() as first, runtime.db.sessionmaker() as second:
        # Both read the factor before either writes, so both see the code as unused.
        mine = await mfa._factor(first, holder.user_id)
        theirs = await mfa._factor(second, holder.user_id)
        assert mine is not None and theirs is not None
        assert await mfa._spend_totp(first, runtime, mine, code, confirming=False)
        racing = asyncio.create_task(
            mfa._spend_totp(second, runtime, theirs, code, confirming=False)
        )
        await _until_waiting_on_a_lock(runtime, racing)
        await first.commit()
        assert await racing is False
        await second.commit()


@ON_POSTGRESQL
async def test_a_recovery_code_raced_by_two_transactions_is_spent_once(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await enable_mfa(client, runtime, await make_holder(runtime))
    code = holder.recovery_codes[0]
    async with runtime.db.sessionmaker() as first, runtime.db.sessionmaker() as second:
        assert await mfa._spend_recovery_code(first, runtime, holder.user_id, code)
        # The second finds the code unused (the first has not committed) and must then
        # lose on the conditional UPDATE.
        racing = asyncio.create_task(
            mfa._spend_recovery_code(second, runtime, holder.user_id, code)
        )
        await _until_waiting_on_a_lock(runtime, racing)
        await first.commit()
        assert await racing is False
        await second.commit()
    assert (await _status(client, holder))["recovery_codes_left"] == 9


@ON_POSTGRESQL
async def test_a_challenge_raced_by_two_right_answers_signs_in_once(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    holder = await enable_mfa(client, runtime, await make_holder(runtime))
    token = await open_challenge(runtime, holder)
    answers = await asyncio.gather(
        _verify(client, token, recovery_code=holder.recovery_codes[0]),
        _verify(client, token, recovery_code=holder.recovery_codes[1]),
    )
    assert sorted(answer.status_code for answer in answers) == [200, 401]
    async with runtime.db.transaction(read_only=True) as session:
        sessions = (
            await session.scalars(select(AuthSession).where(AuthSession.mfa_verified.is_(True)))
        ).all()
    assert len(sessions) == 1
