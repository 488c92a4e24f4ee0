"""Sign-in and sign-up by a one-time code sent by SMS.

A code is 6 random digits, lives 5 minutes, is tied to one phone number (through its
blind index) and one purpose, and can be guessed at most ``otp_max_attempts`` times.
Only a keyed HMAC of it is stored: six digits are a million possibilities, so a plain
hash would be reversed in a moment by anyone holding a database dump. The MAC also
covers the row id, the purpose and the phone index, so a hash copied to another row
proves nothing.

Codes cost money and can be abused to pump SMS to premium numbers, so asking for one is
throttled per number (one a minute) and capped per number and per client address per
day. The counts come from the ``one_time_codes`` rows themselves, checked and written in
one transaction that holds a lock per number and per address (an advisory lock on
PostgreSQL; SQLite's write transactions admit one writer at a time), so two requests
racing for one number cannot both pass.

Every guess is counted by a conditional ``UPDATE`` before the code is compared, so no
amount of concurrency buys a sixth comparison; a right code is spent by another
conditional ``UPDATE``, so it signs in once.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity.accounts import (
    create_user,
    find_user_by_phone,
    normalize_phone,
    phone_index,
    principal_tag,
)
from soko.identity.audit import record_audit_event
from soko.identity.errors import (
    AccountExists,
    CodeRequestThrottled,
    InvalidCode,
    LoginMethodDisabled,
)
from soko.identity.login_methods import SMS_CODE, login_method_enabled
from soko.identity.models import OneTimeCode, Role, User
from soko.identity.schemas import MfaChallengeOut
from soko.identity.sessions import TokenPair
from soko.identity.signin import (
    RequestFacts,
    finish_sign_up,
    refuse_unless_active,
    sign_in_or_challenge,
)
from soko.notifications.public import send_sms
from soko.platform.crypto import digests_match, hkdf_sha256, mac
from soko.platform.db import lock_keys
from soko.platform.http import client_network
from soko.platform.ids import uuid7
from soko.platform.otp import numeric_code
from soko.platform.runtime import Runtime, invalidate_after_commit

CODE_DIGITS: Final = 6
SMS_METHOD: Final = "sms"
SMS_CATEGORY: Final = "identity.sign_in_code"
CODE_KEY_LABEL: Final = b"soko/identity/sms-code/v1"
DAY: Final = dt.timedelta(hours=24)
# Namespaces of the two-key advisory locks taken while a code is requested (any int4
# constants nothing else uses): one lock per number, one per client address.
PHONE_LOCK_SPACE: Final = 0x50484E31  # "PHN1"
ADDRESS_LOCK_SPACE: Final = 0x49504131  # "IPA1"


class CodePurpose(StrEnum):
    # Signs in the account with the number, or creates one when there is none.
    sign_in = "sign_in"


@dataclass(frozen=True, slots=True)
class CodeSent:
    """The answer to a code request, the same whether or not the number has an account."""

    expires_in: int
    resend_after: int


@dataclass(frozen=True, slots=True)
class CodeSignIn:
    """A verified code's outcome: tokens, or a second-factor challenge; ``created`` when
    the code made a new account."""

    outcome: TokenPair | MfaChallengeOut
    created: bool


def code_key(runtime: Runtime) -> bytes:
    return hkdf_sha256(runtime.settings.secret_key.get_secret_value().encode(), info=CODE_KEY_LABEL)


def code_digest(
    key: bytes, *, code_id: uuid.UUID, purpose: str, phone_index_value: str, code: str
) -> str:
    """The stored form of ``code``: an HMAC bound to its row, purpose and number."""
    message = f"{code_id}|{purpose}|{phone_index_value}|{code}".encode()
    return mac(key, message).hex()


def _sms_body(code: str, ttl_seconds: int) -> str:
    minutes = max(1, ttl_seconds // 60)
    unit = "minute" if minutes == 1 else "minutes"
    return f"Your Soko code is {code}. It expires in {minutes} {unit}. Never share it."


async def _require_sms_method(session: AsyncSession) -> None:
    if not await login_method_enabled(session, SMS_CODE):
        raise LoginMethodDisabled("Signing in with an SMS code is switched off.")


async def _lock_requests(session: AsyncSession, number_index: str, ip: str) -> None:
    """Serialize code requests for one number and for one address until commit.

    Always number first, then address, so two requests never wait on each other in a
    cycle."""
    await lock_keys(session, (PHONE_LOCK_SPACE, number_index), (ADDRESS_LOCK_SPACE, ip))


def _seconds_until(moment: dt.datetime, now: dt.datetime) -> int:
    return max(1, math.ceil((moment - now).total_seconds()))


async def _check_request_limits(
    session: AsyncSession, runtime: Runtime, number_index: str, ip: str, now: dt.datetime
) -> None:
    settings = runtime.settings
    latest = await session.scalar(
        select(func.max(OneTimeCode.created_at)).where(OneTimeCode.phone_index == number_index)
    )
    resend_at = latest + dt.timedelta(seconds=settings.otp_resend_seconds) if latest else None
    if resend_at is not None and resend_at > now:
        wait = _seconds_until(resend_at, now)
        raise CodeRequestThrottled(
            f"A code was just sent to this number; ask again in {wait} seconds.",
            headers={"Retry-After": str(wait)},
        )
    since = now - DAY
    for column, value, limit, whom in (
        (OneTimeCode.phone_index, number_index, settings.otp_daily_limit_per_phone, "number"),
        (OneTimeCode.ip, ip, settings.otp_daily_limit_per_ip, "address"),
    ):
        count, oldest = (
            await session.execute(
                select(func.count(), func.min(OneTimeCode.created_at)).where(
                    column == value, OneTimeCode.created_at > since
                )
            )
        ).one()
        if count >= limit and oldest is not None:
            wait = _seconds_until(oldest + DAY, now)
            raise CodeRequestThrottled(
                f"Too many codes were requested for this {whom} today; try again later.",
                headers={"Retry-After": str(wait)},
            )


async def request_code(
    session: AsyncSession,
    runtime: Runtime,
    *,
    phone: str,
    default_region: str | None = None,
    purpose: CodePurpose = CodePurpose.sign_in,
    facts: RequestFacts,
) -> CodeSent:
    """Text a new code to ``phone`` (any format ``default_region`` makes sense of) and
    invalidate the number's earlier unused codes for ``purpose``.

    Raises :class:`CodeRequestThrottled` (429 with ``Retry-After``) within a minute of
    the last code for the number, or past the daily caps per number and per address, and
    :class:`LoginMethodDisabled` when the operator switched SMS sign-in off. Whether the
    number has an account changes nothing in the answer."""
    e164 = normalize_phone(phone, default_region)
    await _require_sms_method(session)
    keys = runtime.data_keys
    number_index = phone_index(keys, e164)
    ip = client_network(facts.ip)[:64]  # IPv6 per /64, as every limit counts it
    await _lock_requests(session, number_index, ip)
    now = runtime.clock.now()
    await _check_request_limits(session, runtime, number_index, ip, now)

    await session.execute(
        update(OneTimeCode)
        .where(
            OneTimeCode.phone_index == number_index,
            OneTimeCode.purpose == purpose.value,
            OneTimeCode.consumed_at.is_(None),
            OneTimeCode.expires_at > now,
        )
        .values(expires_at=now)
        .execution_options(synchronize_session=False)
    )
    ttl = runtime.settings.otp_ttl_seconds
    code = numeric_code(CODE_DIGITS)
    row = OneTimeCode(
        id=uuid7(),
        phone_index=number_index,
        purpose=purpose.value,
        attempts=0,
        ip=ip,
        created_at=now,
        expires_at=now + dt.timedelta(seconds=ttl),
        consumed_at=None,
    )
    row.code_hash = code_digest(
        code_key(runtime),
        code_id=row.id,
        purpose=purpose.value,
        phone_index_value=number_index,
        code=code,
    )
    session.add(row)
    await session.flush()
    await send_sms(session, to=e164, body=_sms_body(code, ttl), category=SMS_CATEGORY)
    holder = await find_user_by_phone(session, keys, e164)
    await record_audit_event(
        session,
        action="auth.otp_requested",
        actor_id=None,
        target_type="user" if holder is not None else None,
        target_id=str(holder.id) if holder is not None else None,
        ip=facts.ip,
        request_id=facts.request_id,
        data={"purpose": purpose.value, "code_id": str(row.id), "phone": e164},
        clock=runtime.clock,
    )
    return CodeSent(expires_in=ttl, resend_after=runtime.settings.otp_resend_seconds)


def _typed_code(raw: str) -> str:
    # People paste "123 456" or "123-456" from the message.
    return "".join(ch for ch in raw if not ch.isspace() and ch != "-")


async def _refuse_code(
    session: AsyncSession,
    runtime: Runtime,
    facts: RequestFacts,
    *,
    reason: str,
    purpose: CodePurpose,
    e164: str,
    row: OneTimeCode | None,
) -> InvalidCode:
    data: dict[str, object] = {"purpose": purpose.value, "reason": reason, "phone": e164}
    if row is not None:
        data["code_id"] = str(row.id)
    await record_audit_event(
        session,
        action="auth.otp_failed",
        actor_id=None,
        ip=facts.ip,
        request_id=facts.request_id,
        data=data,
        clock=runtime.clock,
    )
    error = InvalidCode()
    error.keeping_changes()
    return error


async def verify_code(
    session: AsyncSession,
    runtime: Runtime,
    *,
    phone: str,
    code: str,
    default_region: str | None = None,
    display_name: str = "",
    purpose: CodePurpose = CodePurpose.sign_in,
    facts: RequestFacts,
) -> CodeSignIn:
    """Spend the number's live code and sign in its account, creating a customer account
    with the number verified when there is none.

    Wrong codes raise :class:`InvalidCode` (400) and stay counted (the error keeps the
    request's changes); after ``otp_max_attempts`` guesses the code is dead, right or
    not. A blocked account gets :class:`AccountBlocked` once the code is proven. When the
    account needs a second factor, the outcome is its challenge instead of tokens."""
    e164 = normalize_phone(phone, default_region)
    await _require_sms_method(session)
    keys = runtime.data_keys
    number_index = phone_index(keys, e164)
    now = runtime.clock.now()
    row = (
        await session.scalars(
            select(OneTimeCode)
            .where(
                OneTimeCode.phone_index == number_index,
                OneTimeCode.purpose == purpose.value,
                OneTimeCode.consumed_at.is_(None),
                OneTimeCode.expires_at > now,
            )
            .order_by(OneTimeCode.created_at.desc(), OneTimeCode.id.desc())
            .limit(1)
        )
    ).first()
    if row is None:
        raise await _refuse_code(
            session, runtime, facts, reason="no_live_code", purpose=purpose, e164=e164, row=None
        )
    counted = await session.execute(
        update(OneTimeCode)
        .where(
            OneTimeCode.id == row.id,
            OneTimeCode.attempts < runtime.settings.otp_max_attempts,
            OneTimeCode.consumed_at.is_(None),
            OneTimeCode.expires_at > now,
        )
        .values(attempts=OneTimeCode.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    if counted.rowcount != 1:  # type: ignore[attr-defined]
        raise await _refuse_code(
            session, runtime, facts, reason="too_many_guesses", purpose=purpose, e164=e164, row=row
        )
    expected = code_digest(
        code_key(runtime),
        code_id=row.id,
        purpose=purpose.value,
        phone_index_value=number_index,
        code=_typed_code(code),
    )
    if not digests_match(row.code_hash, expected):
        raise await _refuse_code(
            session, runtime, facts, reason="wrong_code", purpose=purpose, e164=e164, row=row
        )
    spent = await session.execute(
        update(OneTimeCode)
        .where(
            OneTimeCode.id == row.id,
            OneTimeCode.consumed_at.is_(None),
            OneTimeCode.expires_at > now,
        )
        .values(consumed_at=now)
        .execution_options(synchronize_session=False)
    )
    if spent.rowcount != 1:  # type: ignore[attr-defined]
        raise await _refuse_code(
            session, runtime, facts, reason="already_used", purpose=purpose, e164=e164, row=row
        )

    user = await find_user_by_phone(session, keys, e164)
    if user is None:
        try:
            created = await _sign_up(session, runtime, e164, display_name.strip(), facts)
        except AccountExists:
            # Another flow gave the number an account a moment ago: sign that one in.
            user = await find_user_by_phone(session, keys, e164)
            if user is None:
                raise
        else:
            return CodeSignIn(outcome=created, created=True)
    return CodeSignIn(outcome=await _sign_in(session, runtime, user, facts), created=False)


async def _sign_up(
    session: AsyncSession, runtime: Runtime, e164: str, display_name: str, facts: RequestFacts
) -> TokenPair | MfaChallengeOut:
    user = await create_user(
        session,
        runtime.data_keys,
        now=runtime.clock.now(),
        phone=e164,
        display_name=display_name,
        roles=(Role.customer,),
        phone_verified=True,
    )
    return await finish_sign_up(session, runtime, user, method=SMS_METHOD, facts=facts)


async def _sign_in(
    session: AsyncSession, runtime: Runtime, user: User, facts: RequestFacts
) -> TokenPair | MfaChallengeOut:
    await refuse_unless_active(
        session, runtime, user, method=SMS_METHOD, facts=facts, otherwise=InvalidCode
    )
    if user.phone_verified_at is None:
        now = runtime.clock.now()
        user.phone_verified_at = now
        user.updated_at = now
        user.version += 1
        invalidate_after_commit(session, principal_tag(user.id))
    return await sign_in_or_challenge(session, runtime, user, method=SMS_METHOD, facts=facts)
