"""Sign-in and sign-up by SMS code over HTTP: the code's life, guesses and single use,
resend and daily limits against SMS pumping, the code kept out of the database and the
audit log, and concurrent requests for one number."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
from pathlib import Path

import httpx2
import pytest
from sqlalchemy import select, text, update

from soko.identity.accounts import phone_index
from soko.identity.login_methods import change_login_settings
from soko.identity.models import AuthSession, OneTimeCode, User, UserStatus
from soko.identity.sms_codes import (
    CODE_KEY_LABEL,
    SMS_CATEGORY,
    CodePurpose,
    code_digest,
    code_key,
)
from soko.platform.config import Settings
from soko.platform.crypto import hkdf_sha256
from soko.platform.runtime import Runtime
from tests.conftest import make_settings
from tests.identity.mfa_support import VERIFY as MFA_VERIFY
from tests.identity.mfa_support import code_now, enable_mfa, make_holder
from tests.identity.sms_support import (
    advance,
    ask_code,
    audit_events,
    client_at,
    code_rows,
    kenyan_number,
    last_code,
    phone_account,
    send_code,
    texts_to,
    wrong_code,
)

DAILY_PER_NUMBER = 3
DAILY_PER_ADDRESS = 5
DAY_SECONDS = 24 * 3600


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    # Small daily caps, so reaching them takes a handful of requests.
    return make_settings(
        tmp_path,
        database_url=database_url,
        otp_daily_limit_per_phone=DAILY_PER_NUMBER,
        otp_daily_limit_per_ip=DAILY_PER_ADDRESS,
    )


def _problem(answer: httpx2.Response, status: int, slug: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["type"] == f"/problems/{slug}"


async def _accepted(client: httpx2.AsyncClient, phone: str, **extra: str) -> None:
    answer = await ask_code(client, phone, **extra)
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"expires_in": 300, "resend_after": 60}


async def _only_row(runtime: Runtime) -> OneTimeCode:
    rows = await code_rows(runtime)
    assert len(rows) == 1
    return rows[0]


async def _user_count(runtime: Runtime) -> int:
    async with runtime.db.transaction(read_only=True) as session:
        return len((await session.scalars(select(User.id))).all())


# -- sign-up and sign-in ------------------------------------------------------------------


async def test_a_new_number_signs_up_with_its_code(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    phone = kenyan_number(1)
    await _accepted(client, "0712 345 601", default_region="ke")
    texts = await texts_to(runtime, phone)
    assert len(texts) == 1
    assert texts[0]["category"] == SMS_CATEGORY
    code = await last_code(runtime, phone)
    assert texts[0]["body"].startswith(f"Your Soko code is {code}. It expires in 5 minutes.")

    answer = await send_code(client, phone, code, display_name="  Achieng O. ")
    assert answer.status_code == 201, answer.text
    tokens = answer.json()
    assert tokens["token_type"] == "Bearer" and tokens["refresh_token"]

    me = await client.get(
        "/api/v1/me", headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    assert me.status_code == 200, me.text
    account = me.json()
    assert account["id"] == tokens["user_id"]
    assert account["phone"] == phone and account["phone_verified"] is True
    assert account["email"] is None
    assert account["display_name"] == "Achieng O."
    assert account["roles"] == ["customer"]
    async with runtime.db.transaction(read_only=True) as session:
        auth_session = await session.get(AuthSession, uuid.UUID(tokens["session_id"]))
        assert auth_session is not None and auth_session.method == "sms"
    registered = await audit_events(runtime, "account.registered")
    assert [event.target_id for event in registered] == [tokens["user_id"]]
    assert registered[0].data["method"] == "sms"


async def test_the_existing_account_of_a_number_signs_in_and_its_phone_is_verified(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    phone = kenyan_number(2)
    user_id = await phone_account(runtime, phone, verified=False)
    stranger = kenyan_number(3)
    # The answer is the same for a number with an account and one without.
    await _accepted(client, phone)
    await _accepted(client, stranger)

    answer = await send_code(client, phone, await last_code(runtime, phone), display_name="X")
    assert answer.status_code == 200, answer.text
    assert answer.json()["user_id"] == str(user_id)
    assert await _user_count(runtime) == 1
    async with runtime.db.transaction(read_only=True) as session:
        user = await session.get(User, user_id)
        assert user is not None
        assert user.phone_verified_at is not None
        assert user.display_name == "Achieng"  # only a new account takes display_name
    logins = await audit_events(runtime, "auth.login")
    assert [(event.target_id, event.data["method"]) for event in logins] == [(str(user_id), "sms")]
    requested = await audit_events(runtime, "auth.otp_requested")
    assert [event.target_id for event in requested] == [str(user_id), None]


async def test_a_number_with_a_second_factor_gets_a_challenge_instead_of_tokens(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    phone = kenyan_number(4)
    holder = await enable_mfa(client, runtime, await make_holder(runtime, phone=phone))
    await _accepted(client, phone)
    answer = await send_code(client, phone, await last_code(runtime, phone))
    assert answer.status_code == 200, answer.text
    challenge = answer.json()
    assert challenge["mfa_required"] is True
    assert "access_token" not in challenge

    done = await client.post(
        MFA_VERIFY,
        json={"challenge_token": challenge["challenge_token"], "code": code_now(runtime, holder)},
    )
    assert done.status_code == 200, done.text
    async with runtime.db.transaction(read_only=True) as session:
        auth_session = await session.get(AuthSession, uuid.UUID(done.json()["session_id"]))
        assert auth_session is not None
        assert auth_session.method == "sms" and auth_session.mfa_verified


async def test_a_blocked_account_is_refused_after_its_code_and_the_code_is_spent(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    phone = kenyan_number(5)
    user_id = await phone_account(runtime, phone)
    async with runtime.db.transaction() as session:
        await session.execute(
            update(User).where(User.id == user_id).values(status=UserStatus.blocked.value)
        )
    await _accepted(client, phone)
    code = await last_code(runtime, phone)
    _problem(await send_code(client, phone, code), 403, "account-blocked")
    _problem(await send_code(client, phone, code), 400, "invalid-code")
    refused = await audit_events(runtime, "auth.login_refused")
    assert [event.data["reason"] for event in refused] == ["account_blocked"]


async def test_sms_sign_in_switched_off_refuses_both_steps(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    phone = kenyan_number(6)
    await _accepted(client, phone)
    code = await last_code(runtime, phone)
    async with runtime.db.transaction() as session:
        await change_login_settings(
            session, methods={"sms_code": False}, now=runtime.clock.now(), changed_by=None
        )
    _problem(await ask_code(client, kenyan_number(7)), 403, "login-method-disabled")
    _problem(await send_code(client, phone, code), 403, "login-method-disabled")
    assert len(await code_rows(runtime)) == 1


async def test_a_number_that_is_not_one_is_a_validation_problem(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    _problem(await ask_code(client, "0712 345 601"), 422, "validation-error")
    _problem(await ask_code(client, "+2541"), 422, "validation-error")
    assert await code_rows(runtime) == []


@pytest.mark.parametrize(
    "number",
    [
        "+449098790000",  # UK premium rate
        "+19005550199",  # US premium rate
        "+18005550199",  # US toll free
        "+254202222222",  # a Nairobi landline
        "+881612345678",  # a satellite phone, of no country
    ],
)
async def test_a_number_that_cannot_take_a_text_is_never_texted(
    client: httpx2.AsyncClient, runtime: Runtime, number: str
) -> None:
    refused = await ask_code(client, number)
    _problem(refused, 422, "validation-error")
    assert refused.json()["errors"][0]["field"] == "phone"
    assert "cannot take text messages" in refused.json()["errors"][0]["detail"]
    assert await code_rows(runtime) == []
    assert await texts_to(runtime, number) == []
    # Mobile numbers of the region, and +1 numbers that may be mobile, are texted.
    for ordinary in ("+255754123456", "+14158675309"):
        assert (await ask_code(client, ordinary)).status_code == 202


# -- guesses, life and single use ---------------------------------------------------------


async def test_a_wrong_code_is_refused_and_counted(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    phone = kenyan_number(10)
    await _accepted(client, phone)
    code = await last_code(runtime, phone)
    for attempt in (1, 2):
        _problem(await send_code(client, phone, wrong_code(code)), 400, "invalid-code")
        assert (await _only_row(runtime)).attempts == attempt
    failed = await audit_events(runtime, "auth.otp_failed")
    assert [event.data["reason"] for event in failed] == ["wrong_code", "wrong_code"]

    answer = await send_code(client, phone, f"{code[:3]} {code[3:]}")
    assert answer.status_code == 201, answer.text
    row = await _only_row(runtime)
    assert row.attempts == 3 and row.consumed_at is not None


async def test_the_sixth_guess_is_refused_even_when_right(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    phone = kenyan_number(11)
    await _accepted(client, phone)
    code = await last_code(runtime, phone)
    for _ in range(5):
        _problem(await send_code(client, phone, wrong_code(code)), 400, "invalid-code")
    _problem(await send_code(client, phone, code), 400, "invalid-code")
    row = await _only_row(runtime)
    assert row.attempts == 5 and row.consumed_at is None
    assert await _user_count(runtime) == 0
    failed = await audit_events(runtime, "auth.otp_failed")
    assert [event.data["reason"] for event in failed] == ["wrong_code"] * 5 + ["too_many_guesses"]


async def test_guesses_are_limited_per_client_address(
    client: httpx2.AsyncClient, runtime: Runtime, still_limiter_clock: float
) -> None:
    # Each wrong guess writes an audit event: one address cannot write them without end,
    # whatever numbers it guesses for.
    answers = [await send_code(client, kenyan_number(100 + n), "000000") for n in range(21)]
    assert [answer.status_code for answer in answers] == [400] * 20 + [429]
    assert int(answers[-1].headers["retry-after"]) > 0
    assert len(await audit_events(runtime, "auth.otp_failed")) == 20


async def test_concurrent_guesses_never_exceed_the_limit(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    phone = kenyan_number(12)
    await _accepted(client, phone)
    code = await last_code(runtime, phone)
    answers = await asyncio.gather(*(send_code(client, phone, wrong_code(code)) for _ in range(8)))
    assert [answer.status_code for answer in answers] == [400] * 8
    assert (await _only_row(runtime)).attempts == 5
    _problem(await send_code(client, phone, code), 400, "invalid-code")


async def test_a_code_expires_after_five_minutes(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    early, late = kenyan_number(13), kenyan_number(14)
    await _accepted(client, early)
    advance(runtime, 299)
    answer = await send_code(client, early, await last_code(runtime, early))
    assert answer.status_code == 201, answer.text

    await _accepted(client, late)
    advance(runtime, 300)
    _problem(await send_code(client, late, await last_code(runtime, late)), 400, "invalid-code")
    failed = await audit_events(runtime, "auth.otp_failed")
    assert [event.data["reason"] for event in failed] == ["no_live_code"]


async def test_a_code_signs_in_once(client: httpx2.AsyncClient, runtime: Runtime) -> None:
    phone = kenyan_number(15)
    await _accepted(client, phone)
    code = await last_code(runtime, phone)
    assert (await send_code(client, phone, code)).status_code == 201
    _problem(await send_code(client, phone, code), 400, "invalid-code")


async def test_two_uses_of_one_code_at_once_sign_in_once(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    phone = kenyan_number(16)
    await phone_account(runtime, phone)
    await _accepted(client, phone)
    code = await last_code(runtime, phone)
    answers = await asyncio.gather(*(send_code(client, phone, code) for _ in range(3)))
    assert sorted(answer.status_code for answer in answers) == [200, 400, 400]
    async with runtime.db.transaction(read_only=True) as session:
        assert len((await session.scalars(select(AuthSession.id))).all()) == 1


async def test_a_new_code_invalidates_the_previous_one(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    phone = kenyan_number(17)
    await _accepted(client, phone)
    first = await last_code(runtime, phone)
    advance(runtime, 61)
    await _accepted(client, phone)
    second = await last_code(runtime, phone)
    old, new = await code_rows(runtime)
    assert old.expires_at <= runtime.clock.now() < new.expires_at
    if first != second:  # one chance in a million that the new code repeats the old one
        _problem(await send_code(client, phone, first), 400, "invalid-code")
    assert (await send_code(client, phone, second)).status_code == 201


# -- throttling against SMS pumping -------------------------------------------------------


async def test_a_second_code_within_a_minute_is_throttled(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    phone = kenyan_number(20)
    await _accepted(client, phone)
    advance(runtime, 20)
    answer = await ask_code(client, phone)
    _problem(answer, 429, "code-request-throttled")
    assert answer.headers["retry-after"] == "40"
    await _accepted(client, kenyan_number(21))  # another number is not held up
    advance(runtime, 40)
    await _accepted(client, phone)
    assert len(await texts_to(runtime, phone)) == 2


async def test_codes_per_number_are_capped_per_day(
    app: object, client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    phone = kenyan_number(22)
    for _ in range(DAILY_PER_NUMBER):
        await _accepted(client, phone)
        advance(runtime, 61)
    answer = await ask_code(client, phone)
    _problem(answer, 429, "code-request-throttled")
    assert answer.headers["retry-after"] == str(DAY_SECONDS - DAILY_PER_NUMBER * 61)
    async with client_at(app, "198.51.100.23") as elsewhere:
        _problem(await ask_code(elsewhere, phone), 429, "code-request-throttled")
    assert len(await texts_to(runtime, phone)) == DAILY_PER_NUMBER
    advance(runtime, DAY_SECONDS - DAILY_PER_NUMBER * 61)
    await _accepted(client, phone)


async def test_codes_per_address_are_capped_per_day(
    app: object, client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    for n in range(DAILY_PER_ADDRESS):
        await _accepted(client, kenyan_number(30 + n))
    answer = await ask_code(client, kenyan_number(40))
    _problem(answer, 429, "code-request-throttled")
    assert int(answer.headers["retry-after"]) == DAY_SECONDS
    assert await texts_to(runtime, kenyan_number(40)) == []
    async with client_at(app, "198.51.100.24") as elsewhere:
        await _accepted(elsewhere, kenyan_number(40))


async def test_concurrent_requests_for_one_number_send_one_code(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    phone = kenyan_number(50)
    answers = await asyncio.gather(*(ask_code(client, phone) for _ in range(5)))
    assert sorted(answer.status_code for answer in answers) == [202, 429, 429, 429, 429]
    assert len(await code_rows(runtime)) == 1
    assert len(await texts_to(runtime, phone)) == 1


async def test_concurrent_requests_from_one_address_respect_its_cap(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    numbers = [kenyan_number(60 + n) for n in range(DAILY_PER_ADDRESS + 3)]
    answers = await asyncio.gather(*(ask_code(client, phone) for phone in numbers))
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [202] * DAILY_PER_ADDRESS + [429] * 3
    assert len(await code_rows(runtime)) == DAILY_PER_ADDRESS


# -- the code kept secret -----------------------------------------------------------------


async def test_the_code_is_stored_only_as_a_keyed_hash(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    phone = kenyan_number(70)
    await _accepted(client, phone)
    code = await last_code(runtime, phone)
    async with runtime.db.transaction(read_only=True) as session:
        dump = (await session.execute(text("SELECT * FROM one_time_codes"))).mappings().all()
    assert len(dump) == 1
    cells = [str(value) for value in dump[0].values()]
    assert not [cell for cell in cells if re.fullmatch(r"\d{6}", cell)]
    assert not [cell for cell in cells if phone[4:] in cell]

    row = await _only_row(runtime)
    index = phone_index(runtime.data_keys, phone)
    assert row.phone_index == index and row.purpose == CodePurpose.sign_in.value
    unkeyed = {
        hashlib.sha256(candidate.encode()).hexdigest()
        for candidate in (code, code + index, index + code, f"{code}{row.id}", code + phone)
    }
    assert row.code_hash not in unkeyed

    def digest(key: bytes) -> str:
        return code_digest(
            key, code_id=row.id, purpose=row.purpose, phone_index_value=index, code=code
        )

    assert row.code_hash == digest(code_key(runtime))
    assert row.code_hash != digest(hkdf_sha256(b"another-secret-key", info=CODE_KEY_LABEL))


async def test_the_audit_log_never_holds_a_code(
    client: httpx2.AsyncClient, runtime: Runtime
) -> None:
    phone = kenyan_number(71)
    await _accepted(client, phone)
    code = await last_code(runtime, phone)
    _problem(await send_code(client, phone, wrong_code(code)), 400, "invalid-code")
    assert (await send_code(client, phone, code)).status_code == 201
    events = await audit_events(runtime)
    actions = [event.action for event in events]
    for expected in ("auth.otp_requested", "auth.otp_failed", "account.registered"):
        assert expected in actions
    for event in events:
        recorded = json.dumps(event.data)
        assert code not in recorded and wrong_code(code) not in recorded
        assert phone not in recorded
