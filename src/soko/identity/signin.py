"""Password accounts: registration, sign-in, sign-out, email verification, and password
reset and change.

Hashing is slow on purpose (Argon2id, tens of milliseconds), so these flows hash and
verify while holding no database lock: what they must read first (the user, the
throttle state, the link token) is read in a short read-only transaction (a sign-in
reads the throttle and the account in one statement on a reading connection, see
``Database.reading``), and the request's own transaction starts only once the slow part
is done. On SQLite, where every writing transaction holds the one write lock, that keeps
sign-ins from queueing behind each other's hashing.

Link tokens (email verification, password reset) are ``ev_``/``pr_`` plus 256 random
bits, mailed once and stored only as their SHA-256; each is single use, spent by a
conditional ``UPDATE ... WHERE used_at IS NULL`` so two concurrent uses cannot both win.
"""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import Depends, Request
from limits import parse
from sqlalchemy import (
    CompoundSelect,
    bindparam,
    cast,
    delete,
    exists,
    null,
    select,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity import mfa, throttle
from soko.identity.accounts import (
    create_user,
    email_index,
    find_user_by_email,
    find_user_by_phone,
    normalize_email,
    normalize_phone,
    phone_index,
    principal_tag,
    user_email,
    user_phone,
)
from soko.identity.audit import record_audit_event
from soko.identity.errors import (
    AccountBlocked,
    AccountExists,
    InvalidCredentials,
    InvalidLinkToken,
    LoginMethodDisabled,
    WrongCurrentPassword,
)
from soko.identity.events import NEW_DEVICE_SIGN_IN, NewDeviceSignIn
from soko.identity.login_methods import (
    PASSWORD,
    LoginSettings,
    current_login_settings,
    method_enabled_in,
)
from soko.identity.models import (
    AuthSession,
    RefreshToken,
    Role,
    TotpFactor,
    User,
    UserRole,
    UserStatus,
    VerificationPurpose,
    VerificationToken,
)
from soko.identity.passwords import PasswordPolicy, password_hasher
from soko.identity.schemas import MfaChallengeOut
from soko.identity.sessions import (
    DeviceFacts,
    TokenPair,
    hash_secret,
    revoke_session,
    revoke_user_sessions,
    start_session,
)
from soko.notifications.public import send_email
from soko.platform.auth import Principal, run_sign_in_hooks
from soko.platform.errors import ProblemError, ValidationFailed, json_pointer
from soko.platform.http import client_ip
from soko.platform.ids import uuid7
from soko.platform.outbox import publish
from soko.platform.runtime import Runtime, RuntimeDep, invalidate_after_commit

PASSWORD_METHOD = PASSWORD
EMAIL_VERIFICATION_PREFIX = "ev_"
PASSWORD_RESET_PREFIX = "pr_"
EMAIL_VERIFICATION_LIFE = dt.timedelta(hours=24)
PASSWORD_RESET_LIFE = dt.timedelta(minutes=30)
MAX_LINK_TOKEN_LENGTH = 128
# Reset links one email address or phone number can be sent.
RESET_LINKS_PER_IDENTIFIER = parse("3/hour")

# Request headers a sign-in passes to other domains' hooks: an anonymous cart's token.
HOOK_HEADERS: tuple[str, ...] = ("x-cart-token",)

_LINK_PREFIXES = {
    VerificationPurpose.email_verification: EMAIL_VERIFICATION_PREFIX,
    VerificationPurpose.password_reset: PASSWORD_RESET_PREFIX,
}


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What the audit log and the session list need to know about the request."""

    device: DeviceFacts
    request_id: str | None = None
    # Headers other domains' sign-in hooks read (soko.platform.auth.on_sign_in), such as
    # an anonymous cart's token; lower-case names.
    headers: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def ip(self) -> str:
        return self.device.ip

    @classmethod
    def of(cls, request: Request, runtime: Runtime) -> RequestFacts:
        """The facts of ``request``: its device, its caller's address (believing
        ``X-Forwarded-For`` only from trusted proxies) and its request id."""
        return cls(
            device=DeviceFacts(
                user_agent=request.headers.get("user-agent", ""),
                ip=client_ip(request.scope, runtime.settings.trusted_proxies),
            ),
            request_id=getattr(request.state, "request_id", None),
            headers={
                name: request.headers[name] for name in HOOK_HEADERS if name in request.headers
            },
        )


async def request_facts(request: Request, runtime: RuntimeDep) -> RequestFacts:
    return RequestFacts.of(request, runtime)


FactsDep = Annotated[RequestFacts, Depends(request_facts)]


@dataclass(frozen=True, slots=True)
class Identifier:
    """What a person typed to name their account: a canonical email or E.164 phone."""

    kind: Literal["email", "phone"]
    value: str

    def index(self, runtime: Runtime) -> str:
        keys = runtime.data_keys
        return (
            email_index(keys, self.value) if self.kind == "email" else phone_index(keys, self.value)
        )


def parse_identifier(raw: str, *, field: str = "identifier") -> Identifier:
    """An email (anything with an ``@``) or an international phone number (``+...``)."""
    try:
        if "@" in raw:
            return Identifier("email", normalize_email(raw))
        return Identifier("phone", normalize_phone(raw.strip()))
    except ValidationFailed:
        message = "is neither an email address nor a phone number in international form (+...)"
        raise ValidationFailed(
            f"{field} {message}",
            errors=[
                {
                    "in": "body",
                    "field": field,
                    "pointer": json_pointer([field]),
                    "detail": message,
                    "code": "value_error",
                }
            ],
        ) from None


async def _find_user(
    session: AsyncSession, runtime: Runtime, identifier: Identifier
) -> User | None:
    if identifier.kind == "email":
        return await find_user_by_email(session, runtime.data_keys, identifier.value)
    return await find_user_by_phone(session, runtime.data_keys, identifier.value)


# -- collaborators ----------------------------------------------------------------------


async def _require_password_method(runtime: Runtime) -> LoginSettings:
    """The current login settings, once they allow passwords (from the runtime's cache:
    a change an admin makes is seen by every process at its next sign-in)."""
    settings = await current_login_settings(runtime)
    if not method_enabled_in(settings, PASSWORD_METHOD):
        raise LoginMethodDisabled("Signing in with a password is switched off.")
    return settings


# -- what a sign-in decides on ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccountFacts:
    """What the end of a sign-in decides on, read with one statement in its transaction:
    the account's roles (for the access token and the operator's MFA rule), whether it
    has a confirmed authenticator, and whether this device signed in to it before."""

    roles: frozenset[str]
    has_authenticator: bool
    known_device: bool


# The statements of every sign-in, built once with named parameters (building one costs
# more CPU than sending it). The facts come as one row per role (or one with no role),
# each carrying the two flags; the re-read adds the user itself.
_ACCOUNT_FACTS = (
    select(
        UserRole.role,
        exists()
        .where(TotpFactor.user_id == User.id, TotpFactor.confirmed_at.is_not(None))
        .label("has_authenticator"),
        exists()
        .where(AuthSession.user_id == User.id, AuthSession.user_agent == bindparam("user_agent"))
        .label("known_device"),
    )
    .select_from(User)
    .outerjoin(UserRole, UserRole.user_id == User.id)
    .where(User.id == bindparam("user_id"))
)
_USER_WITH_FACTS = _ACCOUNT_FACTS.add_columns(User).execution_options(populate_existing=True)
_CANDIDATE_COLUMNS = (User.id, User.password_hash, User.status)


def _throttle_and_candidate(index: Any) -> CompoundSelect[Any]:
    """What a password sign-in reads before the password is checked, in one statement:
    the throttle's rows of the keys bound as ``keys`` (each with no account), then the
    account whose blind index is bound as ``index`` (with no throttle key)."""
    throttled = throttle.state_of_keys(
        *(cast(null(), column.type).label(column.key) for column in _CANDIDATE_COLUMNS)
    )
    nothing_throttled = (cast(null(), column.type) for column in throttled.selected_columns[:2])
    account = select(*nothing_throttled, *_CANDIDATE_COLUMNS).where(index == bindparam("index"))
    return union_all(throttled, account)


_THROTTLE_AND_CANDIDATE_BY = {
    "email": _throttle_and_candidate(User.email_index),
    "phone": _throttle_and_candidate(User.phone_index),
}


def _facts_parameters(user_id: uuid.UUID, device: DeviceFacts) -> dict[str, object]:
    return {"user_id": user_id, "user_agent": device.user_agent[:500]}


def _facts_of(rows: Sequence[Any]) -> AccountFacts:
    return AccountFacts(
        roles=frozenset(row.role for row in rows if row.role is not None),
        has_authenticator=any(row.has_authenticator for row in rows),
        known_device=any(row.known_device for row in rows),
    )


async def read_account_facts(
    session: AsyncSession, user_id: uuid.UUID, device: DeviceFacts
) -> AccountFacts:
    """The :class:`AccountFacts` of ``user_id`` signing in from ``device``."""
    rows = (await session.execute(_ACCOUNT_FACTS, _facts_parameters(user_id, device))).all()
    return _facts_of(rows)


async def _decision_inputs(
    session: AsyncSession,
    runtime: Runtime,
    user: User,
    facts: RequestFacts,
    settings: LoginSettings | None,
    account: AccountFacts | None = None,
) -> tuple[AccountFacts, LoginSettings | None]:
    """What deciding between a session and a second-factor challenge reads, once, so the
    decision and the challenge it opens see the same state: the account's facts, and the
    login settings unless an authenticator decides alone."""
    if account is None:
        account = await read_account_facts(session, user.id, facts.device)
    if settings is None and not account.has_authenticator:
        settings = await current_login_settings(runtime)
    return account, settings


async def _reread_for_sign_in(
    session: AsyncSession, user_id: uuid.UUID, device: DeviceFacts
) -> tuple[User | None, AccountFacts]:
    """The user, read again in the request's transaction (as it is now, not as it was
    before the password was checked), with its :class:`AccountFacts`: one statement."""
    rows = (await session.execute(_USER_WITH_FACTS, _facts_parameters(user_id, device))).all()
    user: User | None = rows[0].User if rows else None
    return user, _facts_of(rows)


# -- link tokens ------------------------------------------------------------------------


async def issue_link_token(
    session: AsyncSession,
    runtime: Runtime,
    user_id: uuid.UUID,
    purpose: VerificationPurpose,
    life: dt.timedelta,
) -> str:
    """A new single-use link token for ``user_id``; only its hash is stored."""
    now = runtime.clock.now()
    token = _LINK_PREFIXES[purpose] + secrets.token_urlsafe(32)
    session.add(
        VerificationToken(
            id=uuid7(),
            user_id=user_id,
            purpose=purpose.value,
            token_hash=hash_secret(token),
            created_at=now,
            expires_at=now + life,
            used_at=None,
        )
    )
    await session.flush()
    return token


async def forget_link_tokens(
    session: AsyncSession, user_id: uuid.UUID, purpose: VerificationPurpose
) -> None:
    """Invalidate every unused link token of ``purpose``: after a new reset link is
    sent, a password is changed, or the email address changes (a verification link for
    the old address must not verify the new one)."""
    await session.execute(
        delete(VerificationToken).where(
            VerificationToken.user_id == user_id,
            VerificationToken.purpose == purpose.value,
            VerificationToken.used_at.is_(None),
        )
    )


async def _live_link_token(
    session: AsyncSession, runtime: Runtime, token: str, purpose: VerificationPurpose
) -> VerificationToken:
    if not token.startswith(_LINK_PREFIXES[purpose]) or len(token) > MAX_LINK_TOKEN_LENGTH:
        raise InvalidLinkToken()
    row = (
        await session.scalars(
            select(VerificationToken).where(
                VerificationToken.token_hash == hash_secret(token),
                VerificationToken.purpose == purpose.value,
            )
        )
    ).first()
    if row is None or row.used_at is not None or row.expires_at <= runtime.clock.now():
        raise InvalidLinkToken()
    return row


async def _spend_link_token(session: AsyncSession, runtime: Runtime, token_id: uuid.UUID) -> None:
    """Mark the token used, or refuse when another request spent it first (or it just
    expired): the database decides, so two concurrent uses cannot both succeed."""
    now = runtime.clock.now()
    spent = await session.execute(
        update(VerificationToken)
        .where(
            VerificationToken.id == token_id,
            VerificationToken.used_at.is_(None),
            VerificationToken.expires_at > now,
        )
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    if spent.rowcount != 1:  # type: ignore[attr-defined]
        raise InvalidLinkToken()


def _link(runtime: Runtime, path: str, token: str) -> str:
    """``<SOKO_APP_URL>/<path>?token=...``: the marketplace's own page, or Soko's
    (``routes_pages``) when it has none."""
    return f"{runtime.settings.effective_app_url}/{path}?token={token}"


async def send_email_verification(
    session: AsyncSession, runtime: Runtime, user_id: uuid.UUID, email: str
) -> None:
    """Mail ``email`` a link that marks it verified (24 hours, single use)."""
    token = await issue_link_token(
        session, runtime, user_id, VerificationPurpose.email_verification, EMAIL_VERIFICATION_LIFE
    )
    link = _link(runtime, "verify-email", token)
    await send_email(
        session,
        to=email,
        subject="Confirm your email address",
        text=(
            "Confirm this email address for your Soko account by opening this link:\n\n"
            f"{link}\n\n"
            "The link works once and expires in 24 hours. If you did not create an "
            "account, ignore this email."
        ),
        category="identity.email_verification",
    )


# -- registration -----------------------------------------------------------------------


async def register_with_password(
    session: AsyncSession,
    runtime: Runtime,
    *,
    email: str,
    password: str,
    display_name: str,
    facts: RequestFacts,
) -> TokenPair | MfaChallengeOut:
    """Create a customer account with ``email`` and ``password``, mail the verification
    link and sign the new user in (see :func:`finish_sign_up`).

    Raises :class:`WeakPassword` (422), :class:`AccountExists` (409, also for the loser
    of two registrations racing for one address) or :class:`LoginMethodDisabled`."""
    canonical = normalize_email(email)
    display_name = display_name.strip()
    PasswordPolicy.from_settings(runtime.settings).check(
        password, email=canonical, display_name=display_name or None
    )
    await _require_password_method(runtime)
    async with runtime.db.transaction(read_only=True) as reader:
        taken = await find_user_by_email(reader, runtime.data_keys, canonical) is not None
    if taken:  # spares the hash; the unique index still settles races below
        raise AccountExists("An account already uses this email address.")
    password_hash = await password_hasher(runtime).hash(password)

    user = await create_user(
        session,
        runtime.data_keys,
        now=runtime.clock.now(),
        email=canonical,
        display_name=display_name,
        password_hash=password_hash,
        roles=(Role.customer,),
    )
    await send_email_verification(session, runtime, user.id, canonical)
    return await finish_sign_up(session, runtime, user, method=PASSWORD_METHOD, facts=facts)


async def finish_sign_up(
    session: AsyncSession, runtime: Runtime, user: User, *, method: str, facts: RequestFacts
) -> TokenPair | MfaChallengeOut:
    """Record a new account and sign it in: with tokens, or, when the operator requires a
    second factor for new customers, with the challenge that enrolls one first (so a
    sign-up never hands out what a sign-in would not). The first sign-in is recorded as
    ``account.registered``, not as ``auth.login``."""
    outcome: TokenPair | MfaChallengeOut
    account, settings = await _decision_inputs(session, runtime, user, facts, None)
    if await mfa.second_factor_needed(session, runtime, user, account=account, settings=settings):
        outcome = await mfa.start_challenge(
            session,
            runtime,
            user,
            method=method,
            device=facts.device,
            account=account,
            settings=settings,
        )
        opened = None
    else:
        outcome = await start_session(
            session, runtime, user, method=method, device=facts.device, roles=account.roles
        )
        opened = str(outcome.session_id)
        await run_sign_in_hooks(session, runtime, user.id, facts.headers)
    await record_audit_event(
        session,
        action="account.registered",
        actor_id=user.id,
        target_type="user",
        target_id=str(user.id),
        ip=facts.ip,
        request_id=facts.request_id,
        data={"method": method, "session": opened},
        clock=runtime.clock,
    )
    return outcome


# -- sign-in ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Candidate:
    """The account an identifier named, as read before the password was checked."""

    user_id: uuid.UUID
    password_hash: str | None
    status: str


async def sign_in_with_password(
    session: AsyncSession,
    runtime: Runtime,
    *,
    identifier: str,
    password: str,
    facts: RequestFacts,
) -> TokenPair | MfaChallengeOut:
    """Check ``password`` for the account ``identifier`` names and open a session, or
    answer a second-factor challenge when the account needs one.

    Unknown accounts, accounts without a password and wrong passwords all take one
    verification's time and raise the same :class:`InvalidCredentials`; each failure is
    counted by the throttle and recorded in the audit log (the error keeps the
    request's changes). While the account or the address must wait, attempts answer 429
    without the password being looked at. A blocked account is told so only after its
    correct password."""
    named = parse_identifier(identifier)
    keys = [throttle.account_key(named.index(runtime)), throttle.ip_key(facts.ip)]
    settings = await _require_password_method(runtime)
    account_key, address_key = keys
    # The address is checked (429 while it waits) and counted only on a failure; the
    # account is counted now, before the password is looked at (throttle.begin_attempt).
    candidate = await _read_before_checking(runtime, [address_key], named)
    counts = await throttle.begin_attempt(runtime.db, [account_key], runtime.clock)
    usable = candidate is not None and candidate.status != UserStatus.deleted.value
    ok, new_hash = await password_hasher(runtime).verify(
        password, candidate.password_hash if candidate is not None and usable else None
    )
    if not ok or candidate is None:
        await _refuse_sign_in(session, runtime, address_key, counts, candidate, named, facts)
        raise InvalidCredentials().keeping_changes()

    user, account = await _reread_for_sign_in(session, candidate.user_id, facts.device)
    if user is None or user.password_hash != candidate.password_hash:
        # Deleted or given a new password while this sign-in was checking the old one.
        raise InvalidCredentials()
    await refuse_unless_active(
        session, runtime, user, method=PASSWORD_METHOD, facts=facts, otherwise=InvalidCredentials
    )

    now = runtime.clock.now()
    if new_hash is not None:
        user.password_hash = new_hash
        user.updated_at = now
    await throttle.record_success(session, account_key)
    return await sign_in_or_challenge(
        session,
        runtime,
        user,
        method=PASSWORD_METHOD,
        facts=facts,
        account=account,
        settings=settings,
    )


async def _read_before_checking(
    runtime: Runtime, keys: list[throttle.ThrottleKey], named: Identifier
) -> _Candidate | None:
    """The account ``named`` names, read in one statement with the throttle's state of
    ``keys`` on a reading connection; raises while one of those keys must wait."""
    parameters = {"keys": [key.key for key in keys], "index": named.index(runtime)}
    async with runtime.db.reading() as reader:
        rows = (await reader.execute(_THROTTLE_AND_CANDIDATE_BY[named.kind], parameters)).all()
    states = [(row.key, row.blocked_until) for row in rows if row.key is not None]
    throttle.judge(states, runtime.clock)
    found = [row for row in rows if row.id is not None]
    return _Candidate(found[0].id, found[0].password_hash, found[0].status) if found else None


async def refuse_unless_active(
    session: AsyncSession,
    runtime: Runtime,
    user: User,
    *,
    method: str,
    facts: RequestFacts,
    otherwise: type[ProblemError],
) -> None:
    """Let an active account through; record and refuse any other, after its proof
    passed: a blocked one with :class:`AccountBlocked`, a deleted one with ``otherwise``
    (the flow's own "not accepted", so deletion is not revealed)."""
    if user.status == UserStatus.active.value:
        return
    await record_audit_event(
        session,
        action="auth.login_refused",
        actor_id=user.id,
        target_type="user",
        target_id=str(user.id),
        ip=facts.ip,
        request_id=facts.request_id,
        data={"method": method, "reason": "account_" + user.status},
        clock=runtime.clock,
    )
    if user.status == UserStatus.blocked.value:
        raise AccountBlocked().keeping_changes()
    raise otherwise().keeping_changes()


async def sign_in_or_challenge(
    session: AsyncSession,
    runtime: Runtime,
    user: User,
    *,
    method: str,
    facts: RequestFacts,
    account: AccountFacts | None = None,
    settings: LoginSettings | None = None,
) -> TokenPair | MfaChallengeOut:
    """The end of every sign-in whose first factor passed: the second-factor challenge
    the account needs, or its session. ``account`` (read in this transaction) and
    ``settings`` save reads when the caller already holds them."""
    account, settings = await _decision_inputs(session, runtime, user, facts, settings, account)
    if await mfa.second_factor_needed(session, runtime, user, account=account, settings=settings):
        challenge = await mfa.start_challenge(
            session,
            runtime,
            user,
            method=method,
            device=facts.device,
            account=account,
            settings=settings,
        )
        await session.flush()
        return challenge
    return await finish_sign_in(session, runtime, user, method=method, facts=facts, account=account)


async def finish_sign_in(
    session: AsyncSession,
    runtime: Runtime,
    user: User,
    *,
    method: str,
    facts: RequestFacts,
    mfa_verified: bool = False,
    details: Mapping[str, object] | None = None,
    account: AccountFacts | None = None,
) -> TokenPair:
    """Open the session of a sign-in whose every factor passed, noting a device not
    seen before and recording ``auth.login`` (with ``mfa`` and any ``details``, such as
    the second factor used). Every sign-in ends here: password and SMS code directly,
    and any of them, or a social sign-in, through a completed MFA challenge.

    ``account`` is the user's :class:`AccountFacts` when the caller read them in this
    transaction; they are read here otherwise."""
    if account is None:
        account = await read_account_facts(session, user.id, facts.device)
    pair = await start_session(
        session,
        runtime,
        user,
        method=method,
        device=facts.device,
        mfa_verified=mfa_verified,
        roles=account.roles,
    )
    # Other domains' hooks first: the audit events below take the audit log's append
    # lock, held until commit, so nothing slow should follow them.
    await run_sign_in_hooks(session, runtime, user.id, facts.headers)
    data: dict[str, object] = {
        "method": method,
        "session": str(pair.session_id),
        "device": facts.device.device_name,
    }
    if not account.known_device:
        await publish(
            session,
            NEW_DEVICE_SIGN_IN,
            NewDeviceSignIn(
                user_id=user.id, device=facts.device.device_name, at=runtime.clock.now()
            ),
        )
        await record_audit_event(
            session,
            action="auth.new_device",
            actor_id=user.id,
            target_type="user",
            target_id=str(user.id),
            ip=facts.ip,
            request_id=facts.request_id,
            data=data,
            clock=runtime.clock,
        )
    await record_audit_event(
        session,
        action="auth.login",
        actor_id=user.id,
        target_type="user",
        target_id=str(user.id),
        ip=facts.ip,
        request_id=facts.request_id,
        data={**data, "mfa": mfa_verified, **(details or {})},
        clock=runtime.clock,
    )
    return pair


async def _refuse_sign_in(
    session: AsyncSession,
    runtime: Runtime,
    address: throttle.ThrottleKey,
    counts: list[throttle.FailureCount],
    candidate: _Candidate | None,
    named: Identifier,
    facts: RequestFacts,
) -> None:
    # The account's count was taken before the password was checked
    # (throttle.begin_attempt). The address's is taken now, in a transaction of its own;
    # the request's transaction has not been touched yet, so on SQLite nothing holds the
    # write lock it needs.
    counts = [
        *counts,
        *await throttle.record_failure(runtime.db, [address], runtime.clock, abandon=session),
    ]
    waits = [count.blocked_until for count in counts if count.blocked_until is not None]
    if candidate is None or candidate.status == UserStatus.deleted.value:
        reason = "unknown_account"
    elif candidate.password_hash is None:
        reason = "no_password"
    else:
        reason = "wrong_password"
    await record_audit_event(
        session,
        action="auth.login_failed",
        actor_id=None,
        target_type="user" if candidate is not None else None,
        target_id=str(candidate.user_id) if candidate is not None else None,
        ip=facts.ip,
        request_id=facts.request_id,
        data={
            "method": PASSWORD_METHOD,
            "identifier_type": named.kind,
            "reason": reason,
            "throttled_until": max(waits).isoformat() if waits else None,
        },
        clock=runtime.clock,
    )


# -- sign-out ---------------------------------------------------------------------------


async def sign_out(
    session: AsyncSession,
    runtime: Runtime,
    principal: Principal,
    *,
    refresh_token: str | None,
    facts: RequestFacts,
) -> None:
    """End the caller's session and, when a refresh token of the caller's is given, the
    session it belongs to. Tokens of other users are ignored without a word."""
    now = runtime.clock.now()
    session_ids: set[uuid.UUID] = set()
    if principal.session_id is not None:
        session_ids.add(principal.session_id)
    if refresh_token:
        owner = await session.scalar(
            select(RefreshToken.session_id).where(
                RefreshToken.token_hash == hash_secret(refresh_token)
            )
        )
        if owner is not None:
            session_ids.add(owner)
    ended: list[str] = []
    for session_id in sorted(session_ids):
        auth_session = await session.get(AuthSession, session_id)
        if auth_session is None or auth_session.user_id != principal.user_id:
            continue
        if await revoke_session(session, auth_session, now=now, reason="logout"):
            ended.append(str(session_id))
    await record_audit_event(
        session,
        action="auth.logout",
        actor_id=principal.user_id,
        target_type="user",
        target_id=str(principal.user_id),
        ip=facts.ip,
        request_id=facts.request_id,
        data={"sessions": ended},
        clock=runtime.clock,
    )


# -- email verification -----------------------------------------------------------------


async def verify_email(
    session: AsyncSession, runtime: Runtime, *, token: str, facts: RequestFacts
) -> None:
    """Spend an email verification link and mark the address verified."""
    row = await _live_link_token(session, runtime, token, VerificationPurpose.email_verification)
    await _spend_link_token(session, runtime, row.id)
    user = await session.get(User, row.user_id)
    if user is None or user.status == UserStatus.deleted.value or user.email_index is None:
        raise InvalidLinkToken()
    now = runtime.clock.now()
    if user.email_verified_at is None:
        user.email_verified_at = now
        user.updated_at = now
        user.version += 1
        invalidate_after_commit(session, principal_tag(user.id))
    await record_audit_event(
        session,
        action="account.email_verified",
        actor_id=user.id,
        target_type="user",
        target_id=str(user.id),
        ip=facts.ip,
        request_id=facts.request_id,
        clock=runtime.clock,
    )


# -- password reset ---------------------------------------------------------------------


async def request_password_reset(
    session: AsyncSession,
    runtime: Runtime,
    *,
    identifier: str,
    facts: RequestFacts,
) -> bool:
    """Mail a password reset link (30 minutes, single use) when ``identifier`` names an
    active account with an email address; earlier unused reset links stop working.

    At most :data:`RESET_LINKS_PER_IDENTIFIER` links go to one identifier, whether or
    not it has an account, so nobody can flood someone's inbox; requests beyond that
    are dropped without a word. Returns whether a link was sent, for the caller's logs
    only: the HTTP answer must be the same either way, or it would tell who has an
    account."""
    named = parse_identifier(identifier)
    if runtime.settings.ratelimit_enabled:
        allowed = await runtime.limiter.hit(
            RESET_LINKS_PER_IDENTIFIER, "password-reset-identifier", named.index(runtime)
        )
        if not allowed.allowed:
            return False
    user = await _find_user(session, runtime, named)
    if user is None or user.status != UserStatus.active.value:
        return False
    address = user_email(runtime.data_keys, user)
    if address is None:
        return False  # a phone-only account resets by signing in with an SMS code
    await forget_link_tokens(session, user.id, VerificationPurpose.password_reset)
    token = await issue_link_token(
        session, runtime, user.id, VerificationPurpose.password_reset, PASSWORD_RESET_LIFE
    )
    link = _link(runtime, "reset-password", token)
    await send_email(
        session,
        to=address,
        subject="Reset your password",
        text=(
            "Someone (hopefully you) asked to reset the password of your Soko account. "
            f"Choose a new password here:\n\n{link}\n\n"
            "The link works once and expires in 30 minutes. If you did not ask, ignore "
            "this email: your password stays as it is."
        ),
        category="identity.password_reset",
    )
    await record_audit_event(
        session,
        action="auth.password_reset_requested",
        actor_id=None,
        target_type="user",
        target_id=str(user.id),
        ip=facts.ip,
        request_id=facts.request_id,
        clock=runtime.clock,
    )
    return True


@dataclass(frozen=True, slots=True)
class _ResetTarget:
    token_id: uuid.UUID
    user_id: uuid.UUID
    email: str | None
    phone: str | None


async def reset_password(
    session: AsyncSession,
    runtime: Runtime,
    *,
    token: str,
    new_password: str,
    facts: RequestFacts,
) -> None:
    """Set a new password through a reset link, spend the link and sign every session
    of the account out. The link proves the email address, so it is marked verified,
    and the account's sign-in throttle is cleared: an owner locked out by someone
    guessing can get back in at once."""
    async with runtime.db.transaction(read_only=True) as reader:
        row = await _live_link_token(reader, runtime, token, VerificationPurpose.password_reset)
        user = await reader.get(User, row.user_id)
        if user is None or user.status != UserStatus.active.value:
            raise InvalidLinkToken()
        target = _ResetTarget(
            token_id=row.id,
            user_id=user.id,
            email=user_email(runtime.data_keys, user),
            phone=user_phone(runtime.data_keys, user),
        )
        display_name = user.display_name
    PasswordPolicy.from_settings(runtime.settings).check(
        new_password, email=target.email, phone=target.phone, display_name=display_name or None
    )
    password_hash = await password_hasher(runtime).hash(new_password)

    await _spend_link_token(session, runtime, target.token_id)
    user = await session.get(User, target.user_id, populate_existing=True)
    if user is None or user.status != UserStatus.active.value:
        raise InvalidLinkToken()
    now = runtime.clock.now()
    _set_password(user, password_hash, now)
    if user.email_verified_at is None and target.email is not None:
        user.email_verified_at = now
    await forget_link_tokens(session, user.id, VerificationPurpose.password_reset)
    revoked = await revoke_user_sessions(session, user.id, now=now, reason="password_reset")
    for identifier_index in (user.email_index, user.phone_index):
        if identifier_index is not None:
            await throttle.record_success(session, throttle.account_key(identifier_index))
    await record_audit_event(
        session,
        action="auth.password_reset",
        actor_id=user.id,
        target_type="user",
        target_id=str(user.id),
        ip=facts.ip,
        request_id=facts.request_id,
        data={"sessions_revoked": revoked},
        clock=runtime.clock,
    )


def _set_password(user: User, password_hash: str, now: dt.datetime) -> None:
    user.password_hash = password_hash
    user.password_changed_at = now
    user.updated_at = now
    user.version += 1


# -- password change --------------------------------------------------------------------


async def change_password(
    session: AsyncSession,
    runtime: Runtime,
    *,
    user_id: uuid.UUID,
    current_password: str,
    new_password: str,
    keep_session_id: uuid.UUID | None,
    facts: RequestFacts,
) -> int:
    """Replace a signed-in user's password, given the current one, and sign out every
    other session (``keep_session_id`` stays: the one making the change). Returns how
    many sessions were signed out.

    Wrong current passwords count against the account's sign-in throttle like failed
    sign-ins (a stolen access token must not become a password oracle) and raise
    :class:`WrongCurrentPassword`; accounts without a password set one through a reset
    link instead."""
    async with runtime.db.transaction(read_only=True) as reader:
        user = await reader.get(User, user_id)
        if user is None or user.status != UserStatus.active.value:
            raise InvalidCredentials()
        keys = [
            throttle.account_key(index)
            for index in (user.email_index, user.phone_index)
            if index is not None
        ]
        await throttle.check(reader, keys, runtime.clock)
        stored_hash = user.password_hash
        email, phone = user_email(runtime.data_keys, user), user_phone(runtime.data_keys, user)
        display_name = user.display_name
    PasswordPolicy.from_settings(runtime.settings).check(
        new_password, email=email, phone=phone, display_name=display_name or None
    )
    hasher = password_hasher(runtime)
    ok, _ = await hasher.verify(current_password, stored_hash)
    if not ok:
        if keys:
            await throttle.record_failure(runtime.db, keys, runtime.clock, abandon=session)
        await record_audit_event(
            session,
            action="auth.password_change_failed",
            actor_id=user_id,
            target_type="user",
            target_id=str(user_id),
            ip=facts.ip,
            request_id=facts.request_id,
            clock=runtime.clock,
        )
        raise WrongCurrentPassword().keeping_changes()
    password_hash = await hasher.hash(new_password)

    user = await session.get(User, user_id, populate_existing=True)
    if user is None or user.password_hash != stored_hash:
        raise WrongCurrentPassword()  # changed meanwhile by another request
    now = runtime.clock.now()
    _set_password(user, password_hash, now)
    await forget_link_tokens(session, user.id, VerificationPurpose.password_reset)
    revoked = await revoke_user_sessions(
        session, user.id, now=now, reason="password_changed", keep=keep_session_id
    )
    await record_audit_event(
        session,
        action="auth.password_changed",
        actor_id=user.id,
        target_type="user",
        target_id=str(user.id),
        ip=facts.ip,
        request_id=facts.request_id,
        data={"sessions_revoked": revoked},
        clock=runtime.clock,
    )
    return revoked
