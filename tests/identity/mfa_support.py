"""Accounts with an authenticator app, codes at the test clock's time, and sign-in
challenges for the MFA tests."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx2
from sqlalchemy import select

from soko.identity import mfa
from soko.identity.accounts import create_user
from soko.identity.models import AuditEvent, Role, User
from soko.identity.passwords import password_hasher
from soko.identity.sessions import DeviceFacts, TokenPair, start_session
from soko.platform.clock import ManualClock
from soko.platform.otp import DEFAULT_PERIOD, decode_secret, totp
from soko.platform.runtime import Runtime
from tests.identity.signin_support import change_settings

MFA = "/api/v1/me/mfa"
VERIFY = "/api/v1/auth/mfa/verify"
ENROLL = "/api/v1/auth/mfa/enroll"
ENROLL_CONFIRM = "/api/v1/auth/mfa/enroll/confirm"
LOGIN = "/api/v1/auth/login"
PASSWORD = "marula-trees-at-dusk-17"
PHONE_UA = "Mozilla/5.0 (Linux; Android 13; TECNO KI5k) Chrome/124.0.0.0 Mobile Safari/537.36"
DEVICE = DeviceFacts(user_agent=PHONE_UA, ip="197.248.10.20")


@dataclass
class Holder:
    """A signed-in account holder and, once enrolled, their authenticator."""

    user_id: uuid.UUID
    email: str | None
    pair: TokenPair
    secret: bytes | None = None
    recovery_codes: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.pair.access_token}"}


async def make_holder(
    runtime: Runtime,
    *,
    email: str | None = None,
    phone: str | None = None,
    roles: tuple[Role, ...] = (Role.customer,),
    password: str | None = None,
) -> Holder:
    """An account with a session opened from :data:`DEVICE`; with ``password`` it can
    also sign in over HTTP."""
    password_hash = await password_hasher(runtime).hash(password) if password else None
    if email is None and phone is None:
        email = f"wanjiru.{uuid.uuid4().hex[:8]}@example.com"
    async with runtime.db.transaction() as session:
        user = await create_user(
            session,
            runtime.data_keys,
            now=runtime.clock.now(),
            email=email,
            phone=phone,
            display_name="Wanjiru",
            password_hash=password_hash,
            roles=roles,
            email_verified=email is not None,
            phone_verified=phone is not None,
        )
        pair = await start_session(session, runtime, user, method="password", device=DEVICE)
    return Holder(user.id, email, pair)


def code_now(runtime: Runtime, holder: Holder) -> str:
    assert holder.secret is not None
    return totp(holder.secret, runtime.clock.now())


def next_step(runtime: Runtime) -> None:
    """Move the clock into the next 30-second step, where the app shows a new code."""
    clock = runtime.clock
    assert isinstance(clock, ManualClock)
    clock.advance(dt.timedelta(seconds=DEFAULT_PERIOD))


def other_code(runtime: Runtime, holder: Holder) -> str:
    """A well-formed code that is not valid anywhere in the accepted window."""
    assert holder.secret is not None
    now = int(runtime.clock.now().timestamp())
    valid = {totp(holder.secret, now + offset) for offset in (-30, 0, 30)}
    return next(c for c in (f"{n:06d}" for n in range(1_000_000)) if c not in valid)


async def enroll(client: httpx2.AsyncClient, holder: Holder) -> dict[str, Any]:
    answer = await client.post(f"{MFA}/totp", headers=holder.headers)
    assert answer.status_code == 201, answer.text
    body: dict[str, Any] = answer.json()
    holder.secret = decode_secret(body["secret"])
    return body


async def enable_mfa(client: httpx2.AsyncClient, runtime: Runtime, holder: Holder) -> Holder:
    """Enroll and confirm an authenticator; the clock then moves to a fresh step so the
    confirming code is not the one a test uses next."""
    await enroll(client, holder)
    answer = await client.post(
        f"{MFA}/totp/confirm", headers=holder.headers, json={"code": code_now(runtime, holder)}
    )
    assert answer.status_code == 200, answer.text
    holder.recovery_codes = answer.json()["recovery_codes"]
    next_step(runtime)
    return holder


async def open_challenge(runtime: Runtime, holder: Holder, *, method: str = "password") -> str:
    """What the login route does after a correct password: a challenge, in a transaction."""
    async with runtime.db.transaction() as session:
        user = await session.get(User, holder.user_id)
        assert user is not None
        assert await mfa.second_factor_needed(session, runtime, user)
        challenge = await mfa.start_challenge(session, runtime, user, method=method, device=DEVICE)
    assert challenge.mfa_required and challenge.expires_in == 300
    assert challenge.methods == ["totp", "recovery_code"]
    return challenge.challenge_token


async def audit_actions(runtime: Runtime, user_id: uuid.UUID) -> list[tuple[str, dict[str, Any]]]:
    async with runtime.db.transaction(read_only=True) as session:
        rows = (
            await session.scalars(
                select(AuditEvent)
                .where(AuditEvent.target_id == str(user_id))
                .order_by(AuditEvent.seq)
            )
        ).all()
        return [(row.action, dict(row.data)) for row in rows]


async def require_mfa_for(runtime: Runtime, *roles: Role) -> None:
    """The operator's runtime setting: members of ``roles`` must sign in with MFA."""
    await change_settings(runtime, mfa_required_roles=[role.value for role in roles])


async def password_login(
    client: httpx2.AsyncClient, email: str, *, user_agent: str = PHONE_UA
) -> dict[str, Any]:
    """Sign in with :data:`PASSWORD`; the answer's body (tokens or a challenge)."""
    answer = await client.post(
        LOGIN,
        json={"identifier": email, "password": PASSWORD},
        headers={"User-Agent": user_agent},
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body
