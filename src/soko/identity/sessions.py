"""Sign-in sessions and their tokens.

A session is one sign-in on one device. It issues short-lived access tokens (JWTs that
name the user and the session) and opaque refresh tokens, stored only as SHA-256 hashes
and rotated on every use (RFC 9700 section 4.14). The chain of refresh tokens of a session
is its *family*:

* presenting a token that was already rotated means it was copied: the whole family
  and its session are revoked and a security event recorded;
* except within a short grace window, when a client sent the same token twice at once
  (two tabs, a retried request on a flaky network): both get the *same* successor. The
  successor is derived from its parent with a keyed HMAC, so it can be handed out again
  without storing any token in clear.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Insert, Table, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity.accounts import principal_tag, user_roles
from soko.identity.errors import InvalidRefreshToken
from soko.identity.models import AuthSession, RefreshToken, RefreshTokenState, User, UserStatus
from soko.platform.crypto import hkdf_sha256
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime, invalidate_after_commit

REFRESH_PREFIX = "rt_"
SESSION_TAG_PREFIX = "identity:session:"

# Plain Core INSERTs into the tables under the models, built once (every sign-in runs
# them; building a statement costs more CPU than sending it).
_SESSIONS = cast(Table, AuthSession.__table__)
_REFRESH_TOKENS = cast(Table, RefreshToken.__table__)
_INSERT_SESSION = insert(_SESSIONS)
_INSERT_REFRESH_TOKEN = insert(_REFRESH_TOKENS)


def _session_with_token() -> Insert:
    """PostgreSQL: the session and its first refresh token in one statement, the token
    inserted from the session's row (a data-modifying CTE). Parameters are the columns'
    names, prefixed ``session_`` and ``token_``."""
    opened = (
        insert(_SESSIONS)
        .values({column.key: bindparam(f"session_{column.key}") for column in _SESSIONS.columns})
        .returning(_SESSIONS.c.id)
        .cte("opened")
    )
    columns = [column.key for column in _REFRESH_TOKENS.columns]
    values = [
        opened.c.id if key == "session_id" else bindparam(f"token_{key}", type_=column.type)
        for key, column in zip(columns, _REFRESH_TOKENS.columns, strict=True)
    ]
    return insert(_REFRESH_TOKENS).from_select(columns, select(*values))


_INSERT_SESSION_WITH_TOKEN = _session_with_token()

# A presented refresh token with its session and user, for the rotation.
_TOKEN_WITH_OWNERS = (
    select(RefreshToken, AuthSession, User)
    .join(AuthSession, AuthSession.id == RefreshToken.session_id)
    .join(User, User.id == AuthSession.user_id)
    .where(RefreshToken.token_hash == bindparam("token_hash"))
)


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    refresh_expires_in: int
    session_id: uuid.UUID
    user_id: uuid.UUID
    token_type: str = "Bearer"


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What a request tells about the device signing in."""

    user_agent: str
    ip: str

    @property
    def device_name(self) -> str:
        return describe_device(self.user_agent)


def describe_device(user_agent: str) -> str:
    """A short human name for a User-Agent ("Chrome on Android"), for the device list."""
    ua = user_agent.lower()
    browser = next(
        (
            name
            for key, name in (
                ("edg/", "Edge"),
                ("opr/", "Opera"),
                ("chrome/", "Chrome"),
                ("firefox/", "Firefox"),
                ("safari/", "Safari"),
                ("okhttp", "Android app"),
                ("cfnetwork", "iOS app"),
                ("curl/", "curl"),
                ("python", "Python client"),
            )
            if key in ua
        ),
        "Browser" if "mozilla" in ua else "Unknown client",
    )
    system = next(
        (
            name
            for key, name in (
                ("android", "Android"),
                ("iphone", "iPhone"),
                ("ipad", "iPad"),
                ("windows", "Windows"),
                ("mac os", "macOS"),
                ("linux", "Linux"),
                ("kaios", "KaiOS"),
            )
            if key in ua
        ),
        "",
    )
    return f"{browser} on {system}" if system else browser


def session_tag(session_id: uuid.UUID) -> str:
    return f"{SESSION_TAG_PREFIX}{session_id}"


def hash_secret(value: str) -> str:
    """SHA-256 hex of a high-entropy secret (refresh tokens, link tokens, API keys).

    A plain hash is right here: the inputs carry 256 random bits, so there is nothing to
    guess, and lookups by hash must be exact and fast."""
    return hashlib.sha256(value.encode()).hexdigest()


def new_refresh_token() -> str:
    return REFRESH_PREFIX + secrets.token_urlsafe(32)


def _successor_of(runtime: Runtime, token: str) -> str:
    key = hkdf_sha256(
        runtime.settings.secret_key.get_secret_value().encode(),
        info=b"soko/identity/refresh-successor/v1",
    )
    digest = hmac.new(key, token.encode(), hashlib.sha256).digest()
    return REFRESH_PREFIX + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def issue_access_token(
    runtime: Runtime,
    *,
    user_id: uuid.UUID,
    session_id: uuid.UUID,
    roles: frozenset[str],
    mfa_verified: bool,
) -> str:
    """An access token for an active user's live session, carrying what authorizes its
    requests as it stands now: the user's ``roles`` and whether the session passed a
    second factor (``mfa``). Requests trust these claims for as long as nothing about
    the user or the session changes (:mod:`soko.identity.principals`, ADR 0019), so
    the caller has just read them, in the transaction that checked the user active."""
    settings = runtime.settings
    return runtime.signing_keys.issue(
        {"sid": str(session_id), "roles": sorted(roles), "mfa": mfa_verified},
        ttl=dt.timedelta(seconds=settings.access_token_ttl_seconds),
        clock=runtime.clock,
        issuer=settings.effective_token_issuer,
        audience=settings.token_audience,
        subject=str(user_id),
        jti=uuid7().hex,
    )


async def start_session(
    session: AsyncSession,
    runtime: Runtime,
    user: User,
    *,
    method: str,
    device: DeviceFacts,
    mfa_verified: bool = False,
    roles: frozenset[str] | None = None,
) -> TokenPair:
    """Open a session for ``user`` and issue its first token pair. ``roles`` are the
    user's roles when the caller has just read them in this transaction (they go into
    the access token); otherwise they are read here. Only an active user gets one."""
    if user.status != UserStatus.active.value:
        # Every sign-in refuses such a user first; an access token is trusted as issued.
        raise ValueError(f"a session is opened only for an active account, not {user.status}")
    now = runtime.clock.now()
    settings = runtime.settings
    refresh_life = dt.timedelta(seconds=settings.refresh_token_ttl_seconds)
    session_id = uuid7()
    token = new_refresh_token()
    # Plain INSERTs: nothing reads these rows back as objects in this transaction, so
    # the unit of work would only add bookkeeping. The caller's pending changes (a user
    # created a moment ago) are flushed first, as an ORM add would have done.
    await session.flush()
    opened = {
        "id": session_id,
        "user_id": user.id,
        "device_name": device.device_name,
        "user_agent": device.user_agent[:500],
        "ip": device.ip[:64],
        "method": method,
        "mfa_verified": mfa_verified,
        "created_at": now,
        "last_seen_at": now,
        "expires_at": now + refresh_life,
        "revoked_at": None,
        "revoked_reason": None,
    }
    first_token = {
        "id": uuid7(),
        "session_id": session_id,
        "token_hash": hash_secret(token),
        "parent_id": None,
        "state": RefreshTokenState.active.value,
        "created_at": now,
        "expires_at": now + refresh_life,
        "rotated_at": None,
    }
    if session.get_bind().dialect.name == "postgresql":
        parameters = {f"session_{key}": value for key, value in opened.items()}
        parameters.update({f"token_{key}": value for key, value in first_token.items()})
        del parameters["token_session_id"]  # the session's row gives it
        await session.execute(_INSERT_SESSION_WITH_TOKEN, parameters)
    else:
        await session.execute(_INSERT_SESSION, opened)
        await session.execute(_INSERT_REFRESH_TOKEN, first_token)
    if roles is None:
        roles = await user_roles(session, user.id)
    return TokenPair(
        access_token=issue_access_token(
            runtime,
            user_id=user.id,
            session_id=session_id,
            roles=roles,
            mfa_verified=mfa_verified,
        ),
        refresh_token=token,
        expires_in=settings.access_token_ttl_seconds,
        refresh_expires_in=int(refresh_life.total_seconds()),
        session_id=session_id,
        user_id=user.id,
    )


async def refresh_session(
    session: AsyncSession, runtime: Runtime, presented: str, *, device: DeviceFacts
) -> TokenPair:
    """Rotate ``presented`` into a new pair, or refuse it.

    Refusals that revoke a family raise :class:`InvalidRefreshToken` marked
    ``keeping_changes()`` so the revocation commits with the refusal."""
    now = runtime.clock.now()
    if not presented.startswith(REFRESH_PREFIX) or len(presented) > 128:
        raise InvalidRefreshToken()
    # The token, its session and its user in one statement (a token without either
    # is refused the same way).
    found = (
        await session.execute(_TOKEN_WITH_OWNERS, {"token_hash": hash_secret(presented)})
    ).first()
    if found is None:
        raise InvalidRefreshToken()
    row, auth_session, user = found
    if auth_session.revoked_at is not None or row.expires_at <= now:
        raise InvalidRefreshToken()
    if user.status != UserStatus.active.value:
        raise InvalidRefreshToken()

    successor = _successor_of(runtime, presented)
    successor_hash = hash_secret(successor)
    won = await session.execute(
        update(RefreshToken)
        .where(RefreshToken.id == row.id, RefreshToken.state == RefreshTokenState.active.value)
        .values(state=RefreshTokenState.rotated.value, rotated_at=now)
        .execution_options(synchronize_session=False)
    )
    if won.rowcount == 1:  # type: ignore[attr-defined]
        session.add(
            RefreshToken(
                id=uuid7(),
                session_id=auth_session.id,
                token_hash=successor_hash,
                parent_id=row.id,
                state=RefreshTokenState.active.value,
                created_at=now,
                expires_at=auth_session.expires_at,
            )
        )
    else:
        await session.refresh(row)
        grace = dt.timedelta(seconds=runtime.settings.refresh_reuse_grace_seconds)
        rotated_at = row.rotated_at
        child = (
            await session.scalars(
                select(RefreshToken).where(RefreshToken.token_hash == successor_hash)
            )
        ).first()
        concurrent = (
            row.state == RefreshTokenState.rotated.value
            and rotated_at is not None
            and now - rotated_at <= grace
            and child is not None
            and child.state == RefreshTokenState.active.value
        )
        if not concurrent:
            await revoke_session(session, auth_session, now=now, reason="refresh_token_reuse")
            await _record_reuse(session, runtime, auth_session, device)
            raise InvalidRefreshToken(
                "This refresh token was already used; the session has been signed out."
            ).keeping_changes()
    auth_session.last_seen_at = now
    auth_session.ip = device.ip[:64]
    await session.flush()
    roles = await user_roles(session, user.id)
    return TokenPair(
        access_token=issue_access_token(
            runtime,
            user_id=user.id,
            session_id=auth_session.id,
            roles=roles,
            mfa_verified=auth_session.mfa_verified,
        ),
        refresh_token=successor,
        expires_in=runtime.settings.access_token_ttl_seconds,
        refresh_expires_in=max(0, int((auth_session.expires_at - now).total_seconds())),
        session_id=auth_session.id,
        user_id=user.id,
    )


async def _record_reuse(
    session: AsyncSession, runtime: Runtime, auth_session: AuthSession, device: DeviceFacts
) -> None:
    from soko.identity.audit import record_audit_event

    await record_audit_event(
        session,
        action="auth.refresh_token_reused",
        actor_id=auth_session.user_id,
        target_type="session",
        target_id=str(auth_session.id),
        ip=device.ip,
        data={"auth_session": str(auth_session.id), "device": device.device_name},
        clock=runtime.clock,
    )


async def revoke_session(
    session: AsyncSession, auth_session: AuthSession, *, now: dt.datetime, reason: str
) -> bool:
    """Revoke one session and every refresh token of its family. False if it already was."""
    changed = await session.execute(
        update(AuthSession)
        .where(AuthSession.id == auth_session.id, AuthSession.revoked_at.is_(None))
        .values(revoked_at=now, revoked_reason=reason)
        .execution_options(synchronize_session=False)
    )
    await session.execute(
        update(RefreshToken)
        .where(
            RefreshToken.session_id == auth_session.id,
            RefreshToken.state != RefreshTokenState.revoked.value,
        )
        .values(state=RefreshTokenState.revoked.value)
        .execution_options(synchronize_session=False)
    )
    auth_session.revoked_at = auth_session.revoked_at or now
    invalidate_after_commit(session, session_tag(auth_session.id))
    return bool(changed.rowcount)  # type: ignore[attr-defined]


async def revoke_user_sessions(
    session: AsyncSession,
    user_id: uuid.UUID,
    *,
    now: dt.datetime,
    reason: str,
    keep: uuid.UUID | None = None,
) -> int:
    """Revoke every live session of a user (all but ``keep``); the count revoked."""
    query = select(AuthSession).where(
        AuthSession.user_id == user_id, AuthSession.revoked_at.is_(None)
    )
    if keep is not None:
        query = query.where(AuthSession.id != keep)
    revoked = 0
    for auth_session in (await session.scalars(query)).all():
        if await revoke_session(session, auth_session, now=now, reason=reason):
            revoked += 1
    invalidate_after_commit(session, principal_tag(user_id))
    return revoked
