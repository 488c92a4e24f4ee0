"""Two-factor sign-in with an authenticator app (TOTP, RFC 6238) and recovery codes.

A user enrolls (a secret, shown once as base32 and as an ``otpauth://`` URI), confirms
with a first code, and gets ten single-use recovery codes. From then on a sign-in that
passed its first factor gets a short-lived *challenge* instead of tokens, completed at
``POST /api/v1/auth/mfa/verify`` with a TOTP code or a recovery code.

A user whose role the operator requires MFA for, but who has no confirmed authenticator
yet, gets an *enrollment challenge* instead (``methods: ["enroll"]``): with it they
fetch a secret at ``POST /api/v1/auth/mfa/enroll`` and confirm it at
``POST /api/v1/auth/mfa/enroll/confirm``, which turns the factor on and opens the
session in one step. Without it they could never enroll, since enrolling otherwise
needs a signed-in session. The two kinds of challenge differ by their token's prefix
(``mfa_`` to verify, ``mfe_`` to enroll); the prefix is part of what is hashed into the
stored row, so neither kind can be presented as the other.

No code is ever accepted twice, even when two requests race with it: a TOTP code moves
the factor's ``last_used_step`` forward with a conditional UPDATE (RFC 6238 section 5.2),
a recovery code is spent with ``UPDATE ... WHERE used_at IS NULL``, a challenge counts
its attempt with ``UPDATE ... WHERE attempts < max`` before any code is looked at, and
is completed with ``UPDATE ... WHERE used_at IS NULL``. Whichever request the database
lets through first wins; the other finds nothing to update and is refused.

The sign-in flows use it like this::

    if await mfa.second_factor_needed(session, runtime, user):
        return await mfa.start_challenge(session, runtime, user, method="password",
                                         device=device)  # to verify, or to enroll
    pair = await signin.finish_sign_in(...)

A completed challenge, of either kind, opens its session through
:func:`soko.identity.signin.finish_sign_in` like every other sign-in, so the new-device
record and ``auth.login`` are the same whichever way the user got in.
:func:`enforce_enrollment` raises :class:`MfaEnrollmentRequired` (403) for a path that
cannot offer enrollment when the user's roles require a second factor.
"""

from __future__ import annotations

import datetime as dt
import math
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from sqlalchemy import ColumnElement, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity import login_methods
from soko.identity.accounts import user_email, user_phone, user_roles
from soko.identity.audit import record_audit_event
from soko.identity.errors import (
    AccountBlocked,
    InvalidCode,
    InvalidMfaChallenge,
    MfaAlreadyEnabled,
    MfaEnrollmentRequired,
    MfaNotEnabled,
)
from soko.identity.models import (
    TOTP_SECRET_COLUMN,
    MfaChallenge,
    RecoveryCode,
    TotpFactor,
    User,
    UserStatus,
)
from soko.identity.schemas import MfaChallengeOut
from soko.identity.sessions import DeviceFacts, TokenPair, hash_secret
from soko.platform.errors import RateLimited
from soko.platform.ids import uuid7
from soko.platform.otp import (
    decode_secret,
    new_totp_secret,
    provisioning_uri,
    verify_totp,
)
from soko.platform.runtime import Runtime

if TYPE_CHECKING:
    from soko.identity.login_methods import LoginSettings
    from soko.identity.signin import AccountFacts

TOTP_WINDOW: Final = 1  # one 30-second step either side, for phone clocks that drift
RECOVERY_CODE_COUNT: Final = 10
RECOVERY_CODE_LENGTH: Final = 10
RECOVERY_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz234567"  # base32: no 0/1/8/9 to misread
CHALLENGE_PREFIX: Final = "mfa_"
ENROLL_CHALLENGE_PREFIX: Final = "mfe_"
CHALLENGE_LIFETIME: Final = dt.timedelta(minutes=5)
CHALLENGE_MAX_ATTEMPTS: Final = 5
# Someone holding the password can open challenge after challenge; past this many wrong
# codes in the last hour, new challenges wait, so guessing six digits stays hopeless.
FAILURES_BEFORE_PAUSE: Final = 20
FAILURE_WINDOW: Final = dt.timedelta(hours=1)
METHOD_TOTP: Final = "totp"
METHOD_RECOVERY_CODE: Final = "recovery_code"
METHOD_ENROLL: Final = "enroll"
SECRET_COLUMN: Final = TOTP_SECRET_COLUMN
RECOVERY_CODE_COLUMN: Final = "recovery_codes.code"


@dataclass(frozen=True, slots=True)
class TotpEnrollment:
    """What the user types or scans into an authenticator app; shown once."""

    secret: str
    otpauth_uri: str


@dataclass(frozen=True, slots=True)
class MfaStatus:
    totp_enabled: bool
    enrollment_pending: bool
    recovery_codes_left: int


@dataclass(frozen=True, slots=True)
class CompletedSignIn:
    tokens: TokenPair
    factor: str


@dataclass(frozen=True, slots=True)
class EnrolledSignIn:
    """A sign-in that enrolled its authenticator: the session's tokens and the ten
    recovery codes, both shown once."""

    tokens: TokenPair
    recovery_codes: list[str]


# -- the factor ---------------------------------------------------------------------------


def _secret_context(user_id: uuid.UUID) -> str:
    return f"{SECRET_COLUMN}:{user_id}"


def _issuer(runtime: Runtime) -> str:
    name = runtime.settings.service_name.replace(":", " ").strip()
    # The default service name is the code's name; people know the product as "Soko".
    return "Soko" if not name or name == "soko" else name


def _account_label(runtime: Runtime, user: User) -> str:
    keys = runtime.data_keys
    label = user_email(keys, user) or user_phone(keys, user) or str(user.id)
    # A colon would split the otpauth label in the wrong place.
    return label.replace(":", "")


async def _factor(session: AsyncSession, user_id: uuid.UUID) -> TotpFactor | None:
    return (
        await session.scalars(
            select(TotpFactor)
            .where(TotpFactor.user_id == user_id)
            .execution_options(populate_existing=True)
        )
    ).first()


async def _confirmed_factor(session: AsyncSession, user_id: uuid.UUID) -> TotpFactor:
    factor = await _factor(session, user_id)
    if factor is None or factor.confirmed_at is None:
        raise MfaNotEnabled()
    return factor


async def has_confirmed_factor(session: AsyncSession, user_id: uuid.UUID) -> bool:
    found = await session.scalar(
        select(TotpFactor.user_id).where(
            TotpFactor.user_id == user_id, TotpFactor.confirmed_at.is_not(None)
        )
    )
    return found is not None


async def mfa_status(session: AsyncSession, user_id: uuid.UUID) -> MfaStatus:
    factor = await _factor(session, user_id)
    left = await session.scalar(
        select(func.count())
        .select_from(RecoveryCode)
        .where(RecoveryCode.user_id == user_id, RecoveryCode.used_at.is_(None))
    )
    confirmed = factor is not None and factor.confirmed_at is not None
    return MfaStatus(
        totp_enabled=confirmed,
        enrollment_pending=factor is not None and not confirmed,
        recovery_codes_left=int(left or 0) if confirmed else 0,
    )


async def enroll_totp(session: AsyncSession, runtime: Runtime, user: User) -> TotpEnrollment:
    """Start (or restart) enrollment with a fresh secret; the factor stays off until
    :func:`confirm_totp`. Refused while a confirmed factor exists."""
    now = runtime.clock.now()
    secret = new_totp_secret()
    ciphertext = runtime.data_keys.keyring.encrypt(secret, context=_secret_context(user.id))
    if not await _replace_pending(session, user.id, ciphertext, now):
        try:
            async with session.begin_nested():
                session.add(
                    TotpFactor(
                        user_id=user.id,
                        secret_ciphertext=ciphertext,
                        confirmed_at=None,
                        last_used_step=None,
                        created_at=now,
                    )
                )
        except IntegrityError:
            # A concurrent enrollment inserted first: take its place if it is still
            # pending (the later secret wins, as if the user had clicked twice).
            if not await _replace_pending(session, user.id, ciphertext, now):
                raise MfaAlreadyEnabled() from None
    return TotpEnrollment(
        secret=secret,
        otpauth_uri=provisioning_uri(
            secret, account=_account_label(runtime, user), issuer=_issuer(runtime)
        ),
    )


async def _replace_pending(
    session: AsyncSession, user_id: uuid.UUID, ciphertext: str, now: dt.datetime
) -> bool:
    """Put a new secret on the user's unconfirmed factor. False when there is none;
    raises when the factor is already confirmed."""
    replaced = await session.execute(
        update(TotpFactor)
        .where(TotpFactor.user_id == user_id, TotpFactor.confirmed_at.is_(None))
        .values(secret_ciphertext=ciphertext, last_used_step=None, created_at=now)
        .execution_options(synchronize_session=False)
    )
    if replaced.rowcount == 1:  # type: ignore[attr-defined]
        return True
    if await has_confirmed_factor(session, user_id):
        raise MfaAlreadyEnabled()
    return False


async def _spend_totp(
    session: AsyncSession, runtime: Runtime, factor: TotpFactor, code: str, *, confirming: bool
) -> bool:
    """Accept ``code`` once: True if it matched a step after the last one used and this
    request is the one that moved ``last_used_step`` to it."""
    secret = decode_secret(
        runtime.data_keys.keyring.decrypt(
            factor.secret_ciphertext, context=_secret_context(factor.user_id)
        )
    )
    now = runtime.clock.now()
    step = verify_totp(secret, code, now, window=TOTP_WINDOW, last_used_step=factor.last_used_step)
    if step is None:
        return False
    values: dict[str, object] = {"last_used_step": step}
    if confirming:
        values["confirmed_at"] = now
    query = update(TotpFactor).where(
        TotpFactor.user_id == factor.user_id,
        or_(TotpFactor.last_used_step.is_(None), TotpFactor.last_used_step < step),
        TotpFactor.confirmed_at.is_(None) if confirming else TotpFactor.confirmed_at.is_not(None),
    )
    spent = await session.execute(
        query.values(**values).execution_options(synchronize_session=False)
    )
    return bool(spent.rowcount == 1)  # type: ignore[attr-defined]


def normalize_recovery_code(raw: str) -> str:
    """A recovery code as stored: lower case, without spaces or hyphens; a 0 or 1 read
    as the letter it resembles (base32 has no 0 or 1)."""
    cleaned = "".join(raw.split()).replace("-", "").lower()
    return cleaned.replace("0", "o").replace("1", "l")


def _recovery_code_hash(runtime: Runtime, user_id: uuid.UUID, normalized: str) -> str:
    # Keyed, unlike a plain SHA-256: a code has 50 bits, few enough to try them all
    # offline against a dumped table, but not without the server's blind-index key.
    return runtime.data_keys.blind_index.compute(RECOVERY_CODE_COLUMN, f"{user_id}:{normalized}")


def _new_recovery_code() -> str:
    raw = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(RECOVERY_CODE_LENGTH))
    half = RECOVERY_CODE_LENGTH // 2
    return f"{raw[:half]}-{raw[half:]}"


async def _issue_recovery_codes(
    session: AsyncSession, runtime: Runtime, user_id: uuid.UUID
) -> list[str]:
    """Replace every recovery code of the user with ten new ones, returned once."""
    now = runtime.clock.now()
    await session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user_id))
    codes = [_new_recovery_code() for _ in range(RECOVERY_CODE_COUNT)]
    session.add_all(
        RecoveryCode(
            id=uuid7(),
            user_id=user_id,
            code_hash=_recovery_code_hash(runtime, user_id, normalize_recovery_code(code)),
            used_at=None,
            created_at=now,
        )
        for code in codes
    )
    await session.flush()
    return codes


async def _spend_recovery_code(
    session: AsyncSession, runtime: Runtime, user_id: uuid.UUID, raw: str
) -> bool:
    normalized = normalize_recovery_code(raw)
    if len(normalized) != RECOVERY_CODE_LENGTH or any(
        ch not in RECOVERY_ALPHABET for ch in normalized
    ):
        return False
    code_id = await session.scalar(
        select(RecoveryCode.id).where(
            RecoveryCode.user_id == user_id,
            RecoveryCode.code_hash == _recovery_code_hash(runtime, user_id, normalized),
            RecoveryCode.used_at.is_(None),
        )
    )
    if code_id is None:
        return False
    spent = await session.execute(
        update(RecoveryCode)
        .where(RecoveryCode.id == code_id, RecoveryCode.used_at.is_(None))
        .values(used_at=runtime.clock.now())
        .execution_options(synchronize_session=False)
    )
    return bool(spent.rowcount == 1)  # type: ignore[attr-defined]


async def confirm_totp(
    session: AsyncSession, runtime: Runtime, user: User, code: str, *, ip: str, request_id: str
) -> list[str]:
    """Turn the pending factor on with its first code; returns the recovery codes."""
    factor = await _pending_factor(session, user.id, start_at="POST /api/v1/me/mfa/totp")
    if not await _spend_totp(session, runtime, factor, code, confirming=True):
        raise InvalidCode("The code does not match; check the authenticator app's clock.")
    return await _turn_on(
        session, runtime, user, ip=ip, request_id=request_id, audit_data={"factor": METHOD_TOTP}
    )


async def _pending_factor(
    session: AsyncSession, user_id: uuid.UUID, *, start_at: str
) -> TotpFactor:
    factor = await _factor(session, user_id)
    if factor is None:
        raise MfaNotEnabled(f"Start enrollment first: {start_at}.")
    if factor.confirmed_at is not None:
        raise MfaAlreadyEnabled()
    return factor


async def _turn_on(
    session: AsyncSession,
    runtime: Runtime,
    user: User,
    *,
    ip: str,
    request_id: str | None,
    audit_data: dict[str, object],
) -> list[str]:
    """What follows a confirmed first code: new recovery codes and ``mfa.enabled``."""
    codes = await _issue_recovery_codes(session, runtime, user.id)
    await record_audit_event(
        session,
        action="mfa.enabled",
        actor_id=user.id,
        target_type="user",
        target_id=str(user.id),
        ip=ip,
        request_id=request_id,
        data=audit_data,
        clock=runtime.clock,
    )
    return codes


async def disable_totp(
    session: AsyncSession,
    runtime: Runtime,
    user: User,
    *,
    code: str | None,
    recovery_code: str | None,
    ip: str,
    request_id: str,
) -> None:
    """Switch MFA off, proven with a fresh TOTP code or an unused recovery code."""
    factor = await _confirmed_factor(session, user.id)
    if code is not None:
        ok = await _spend_totp(session, runtime, factor, code, confirming=False)
    else:
        ok = recovery_code is not None and await _spend_recovery_code(
            session, runtime, user.id, recovery_code
        )
    if not ok:
        raise InvalidCode()
    await session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
    await session.execute(delete(TotpFactor).where(TotpFactor.user_id == user.id))
    await record_audit_event(
        session,
        action="mfa.disabled",
        actor_id=user.id,
        target_type="user",
        target_id=str(user.id),
        ip=ip,
        request_id=request_id,
        data={"proof": METHOD_TOTP if code is not None else METHOD_RECOVERY_CODE},
        clock=runtime.clock,
    )


async def regenerate_recovery_codes(
    session: AsyncSession, runtime: Runtime, user: User, code: str, *, ip: str, request_id: str
) -> list[str]:
    """Replace the recovery codes (the old ones stop working), proven with a fresh TOTP
    code: a recovery code cannot mint more of itself."""
    factor = await _confirmed_factor(session, user.id)
    if not await _spend_totp(session, runtime, factor, code, confirming=False):
        raise InvalidCode()
    codes = await _issue_recovery_codes(session, runtime, user.id)
    await record_audit_event(
        session,
        action="mfa.recovery_codes_regenerated",
        actor_id=user.id,
        target_type="user",
        target_id=str(user.id),
        ip=ip,
        request_id=request_id,
        data={"count": len(codes)},
        clock=runtime.clock,
    )
    return codes


# -- the sign-in challenge ------------------------------------------------------------------


async def mfa_required_roles(session: AsyncSession) -> frozenset[str]:
    """The roles the operator requires a second factor for, as stored now."""
    return await login_methods.mfa_required_roles(session)


async def _role_requires_mfa(session: AsyncSession, user: User) -> bool:
    required = await mfa_required_roles(session)
    return bool(required) and bool(required & await user_roles(session, user.id))


async def _challenge_needed(
    session: AsyncSession,
    runtime: Runtime,
    user: User,
    account: AccountFacts | None,
    settings: LoginSettings | None,
) -> list[str] | None:
    """The methods of the challenge a sign-in of ``user`` must answer, or ``None`` when
    it needs none: to verify with a confirmed authenticator, else to enroll one when a
    role of the user's is among those the operator requires MFA for.

    The requirement comes from the runtime's cached login settings (``settings`` when
    the caller already holds them), like every other sign-in decision; the account's
    own state from ``account`` when the caller read it in this transaction."""
    if account is not None:
        has_factor = account.has_authenticator
    else:
        has_factor = await has_confirmed_factor(session, user.id)
    if has_factor:
        return [METHOD_TOTP, METHOD_RECOVERY_CODE]
    required = (settings or await login_methods.current_login_settings(runtime)).mfa_required_roles
    if not required:
        return None
    roles = account.roles if account is not None else await user_roles(session, user.id)
    return [METHOD_ENROLL] if required & roles else None


async def second_factor_needed(
    session: AsyncSession,
    runtime: Runtime,
    user: User,
    *,
    account: AccountFacts | None = None,
    settings: LoginSettings | None = None,
) -> bool:
    """Whether a sign-in of ``user`` that passed its first factor must go through
    :func:`start_challenge` instead of receiving tokens: the user has a confirmed
    authenticator (a challenge to verify), or one of their roles is among those the
    operator requires MFA for (a challenge to enroll).

    ``account`` and ``settings`` save the reads when the caller already holds them;
    the operator's requirement is otherwise read from the cached login settings."""
    return await _challenge_needed(session, runtime, user, account, settings) is not None


async def enforce_enrollment(session: AsyncSession, user: User) -> None:
    """Raise :class:`MfaEnrollmentRequired` (403) when the user's roles require MFA and
    no authenticator is confirmed: for a path that must not hand out tokens and cannot
    offer the enrollment challenge :func:`start_challenge` gives sign-ins."""
    if await has_confirmed_factor(session, user.id):
        return
    if await _role_requires_mfa(session, user):
        raise MfaEnrollmentRequired()


async def start_challenge(
    session: AsyncSession,
    runtime: Runtime,
    user: User,
    *,
    method: str,
    device: DeviceFacts,
    account: AccountFacts | None = None,
    settings: LoginSettings | None = None,
) -> MfaChallengeOut:
    """Store a challenge for a sign-in by ``method`` that passed its first factor and
    return its token (shown once, stored hashed), valid for five minutes and five tries.

    With a confirmed authenticator it is completed at ``/auth/mfa/verify`` (``methods``
    ``["totp", "recovery_code"]``); without one, when the user's roles require MFA, it
    can only enroll one (``methods`` ``["enroll"]``). Raises :class:`MfaNotEnabled` when
    neither holds (the caller should have asked :func:`second_factor_needed`, with the
    same ``account`` and ``settings``), and :class:`RateLimited` while too many wrong
    codes were sent for this user lately."""
    methods = await _challenge_needed(session, runtime, user, account, settings)
    if methods is None:
        raise MfaNotEnabled("This account signs in without a second factor.")
    prefix = ENROLL_CHALLENGE_PREFIX if methods == [METHOD_ENROLL] else CHALLENGE_PREFIX
    now = runtime.clock.now()
    await _refuse_while_guessing(session, user.id, now)
    token = prefix + secrets.token_urlsafe(32)
    session.add(
        MfaChallenge(
            id=uuid7(),
            user_id=user.id,
            token_hash=hash_secret(token),
            method=method,
            device_name=device.device_name[:200],
            user_agent=device.user_agent[:500],
            ip=device.ip[:64],
            attempts=0,
            created_at=now,
            expires_at=now + CHALLENGE_LIFETIME,
            used_at=None,
        )
    )
    await session.flush()
    return MfaChallengeOut(
        challenge_token=token,
        methods=methods,
        expires_in=int(CHALLENGE_LIFETIME.total_seconds()),
    )


async def _refuse_while_guessing(
    session: AsyncSession, user_id: uuid.UUID, now: dt.datetime
) -> None:
    since = now - FAILURE_WINDOW
    rows = (
        await session.execute(
            select(MfaChallenge.attempts, MfaChallenge.created_at).where(
                MfaChallenge.user_id == user_id,
                MfaChallenge.created_at > since,
                MfaChallenge.used_at.is_(None),
                MfaChallenge.attempts > 0,
            )
        )
    ).all()
    if sum(row.attempts for row in rows) < FAILURES_BEFORE_PAUSE:
        return
    oldest = min(row.created_at for row in rows)
    wait = max(1, math.ceil((oldest + FAILURE_WINDOW - now).total_seconds()))
    raise RateLimited(
        "Too many wrong codes for this account; try again later.",
        headers={"Retry-After": str(wait)},
    )


def _live(challenge_id: uuid.UUID, now: dt.datetime) -> list[ColumnElement[bool]]:
    return [
        MfaChallenge.id == challenge_id,
        MfaChallenge.used_at.is_(None),
        MfaChallenge.expires_at > now,
        MfaChallenge.attempts < CHALLENGE_MAX_ATTEMPTS,
    ]


async def _open_challenge(
    session: AsyncSession, runtime: Runtime, token: str, *, prefix: str, count_attempt: bool
) -> tuple[MfaChallenge, User]:
    """The live challenge ``token`` names, of the kind ``prefix`` says, and its user.

    With ``count_attempt`` the attempt is counted before any code is looked at,
    atomically, so no number of parallel requests gets more than the allowed tries."""
    now = runtime.clock.now()
    if not token.startswith(prefix) or len(token) > 128:
        raise InvalidMfaChallenge()
    challenge = (
        await session.scalars(
            select(MfaChallenge).where(MfaChallenge.token_hash == hash_secret(token))
        )
    ).first()
    if challenge is None:
        raise InvalidMfaChallenge()
    if count_attempt:
        counted = await session.execute(
            update(MfaChallenge)
            .where(*_live(challenge.id, now))
            .values(attempts=MfaChallenge.attempts + 1)
            .execution_options(synchronize_session=False)
        )
        live = counted.rowcount == 1  # type: ignore[attr-defined]
    else:
        live = (
            await session.scalar(select(MfaChallenge.id).where(*_live(challenge.id, now)))
            is not None
        )
    if not live:
        raise InvalidMfaChallenge()
    user = await session.get(User, challenge.user_id)
    if user is None or user.status == UserStatus.deleted.value:
        raise InvalidMfaChallenge()
    if user.status != UserStatus.active.value:
        raise AccountBlocked()
    return challenge, user


async def _close_challenge(
    session: AsyncSession, challenge: MfaChallenge, now: dt.datetime
) -> None:
    completed = await session.execute(
        update(MfaChallenge)
        .where(MfaChallenge.id == challenge.id, MfaChallenge.used_at.is_(None))
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    if completed.rowcount != 1:  # type: ignore[attr-defined]
        raise InvalidMfaChallenge()


async def _record_failure(
    session: AsyncSession,
    runtime: Runtime,
    user: User,
    challenge: MfaChallenge,
    *,
    factor: str,
    device: DeviceFacts,
    request_id: str | None,
) -> None:
    data: dict[str, object] = {"method": challenge.method, "factor": factor}
    if factor == METHOD_ENROLL:
        data["factor"] = METHOD_TOTP
        data["enrolling"] = True
    await record_audit_event(
        session,
        action="auth.mfa_failed",
        actor_id=user.id,
        target_type="user",
        target_id=str(user.id),
        ip=device.ip,
        request_id=request_id,
        data=data,
        clock=runtime.clock,
    )


async def _finish_sign_in(
    session: AsyncSession,
    runtime: Runtime,
    user: User,
    challenge: MfaChallenge,
    *,
    device: DeviceFacts,
    request_id: str | None,
    details: dict[str, object],
    headers: Mapping[str, str],
) -> TokenPair:
    # signin imports this module for its flows' second step; importing it back here,
    # when a challenge completes, keeps one place where every sign-in ends.
    from soko.identity.signin import RequestFacts, finish_sign_in

    return await finish_sign_in(
        session,
        runtime,
        user,
        method=challenge.method,
        # The headers reach the other domains' sign-in hooks: the session opens here,
        # so an anonymous cart's token sent with this request follows the buyer.
        facts=RequestFacts(device=device, request_id=request_id or None, headers=headers),
        mfa_verified=True,
        details=details,
    )


async def complete_challenge(
    session: AsyncSession,
    runtime: Runtime,
    token: str,
    *,
    code: str | None,
    recovery_code: str | None,
    device: DeviceFacts,
    request_id: str,
    headers: Mapping[str, str] | None = None,
) -> CompletedSignIn:
    """Check a challenge's second factor and, if it holds, open the session.

    A wrong code raises :class:`InvalidCode` marked ``keeping_changes()`` so the spent
    attempt (and its audit event) commit with the refusal. Enrollment challenges are
    refused here (:class:`InvalidMfaChallenge`)."""
    challenge, user = await _open_challenge(
        session, runtime, token, prefix=CHALLENGE_PREFIX, count_attempt=True
    )
    factor_used = METHOD_TOTP if code is not None else METHOD_RECOVERY_CODE
    factor = await _factor(session, user.id)
    ok = False
    if factor is not None and factor.confirmed_at is not None:
        if code is not None:
            ok = await _spend_totp(session, runtime, factor, code, confirming=False)
        elif recovery_code is not None:
            ok = await _spend_recovery_code(session, runtime, user.id, recovery_code)
    if not ok:
        await _record_failure(
            session,
            runtime,
            user,
            challenge,
            factor=factor_used,
            device=device,
            request_id=request_id,
        )
        raise InvalidCode().keeping_changes()

    await _close_challenge(session, challenge, runtime.clock.now())
    details: dict[str, object] = {"factor": factor_used}
    if factor_used == METHOD_RECOVERY_CODE:
        details["recovery_left"] = (await mfa_status(session, user.id)).recovery_codes_left
    pair = await _finish_sign_in(
        session,
        runtime,
        user,
        challenge,
        device=device,
        request_id=request_id,
        details=details,
        headers=headers or {},
    )
    return CompletedSignIn(tokens=pair, factor=factor_used)


async def begin_challenge_enrollment(
    session: AsyncSession, runtime: Runtime, token: str
) -> TotpEnrollment:
    """A new authenticator secret for the user of an enrollment challenge. Asking again
    replaces the secret, like enrolling again from a session; it spends no attempt (the
    codes sent to confirm do), but the challenge must be live."""
    _, user = await _open_challenge(
        session, runtime, token, prefix=ENROLL_CHALLENGE_PREFIX, count_attempt=False
    )
    return await enroll_totp(session, runtime, user)


async def complete_challenge_enrollment(
    session: AsyncSession,
    runtime: Runtime,
    token: str,
    code: str,
    *,
    device: DeviceFacts,
    request_id: str,
    headers: Mapping[str, str] | None = None,
) -> EnrolledSignIn:
    """Confirm the authenticator enrolled with an enrollment challenge by its first
    code, and open the session (MFA verified: the code just proved the factor).

    A wrong code counts an attempt and raises :class:`InvalidCode` marked
    ``keeping_changes()``; the challenge is spent only by success."""
    challenge, user = await _open_challenge(
        session, runtime, token, prefix=ENROLL_CHALLENGE_PREFIX, count_attempt=True
    )
    factor = await _pending_factor(session, user.id, start_at="POST /api/v1/auth/mfa/enroll")
    if not await _spend_totp(session, runtime, factor, code, confirming=True):
        await _record_failure(
            session,
            runtime,
            user,
            challenge,
            factor=METHOD_ENROLL,
            device=device,
            request_id=request_id,
        )
        raise InvalidCode(
            "The code does not match; check the authenticator app's clock."
        ).keeping_changes()
    await _close_challenge(session, challenge, runtime.clock.now())
    codes = await _turn_on(
        session,
        runtime,
        user,
        ip=device.ip,
        request_id=request_id or None,
        audit_data={"factor": METHOD_TOTP, "method": challenge.method, "at_sign_in": True},
    )
    pair = await _finish_sign_in(
        session,
        runtime,
        user,
        challenge,
        device=device,
        request_id=request_id,
        details={"factor": METHOD_TOTP, "enrolled": True},
        headers=headers or {},
    )
    return EnrolledSignIn(tokens=pair, recovery_codes=codes)
