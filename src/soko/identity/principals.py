"""Turning a request's credentials into a :class:`~soko.platform.auth.Principal`.

Credentials are ``Authorization: Bearer <access token>`` or ``Authorization: Bearer
<API key>`` (API keys start with ``soko_``). An access token is checked against the
signing keys, and then against the state behind it (the user is active, the session is
not revoked, the user's roles), so blocking a user, changing their roles or revoking a
session takes effect at once.

That state is what the token's claims say when nothing about the user or the session
changed since the token was issued, which the process knows when it has heard every
invalidation since then (:meth:`~soko.platform.cache.Cache.unchanged_since`): a token
issued at sign-in or refresh is then taken as it stands, with no read (ADR 0019).
Otherwise (a change since, or a process that cannot know: just started, or its cache's
channel lost) the state is read from the database, cached briefly, and its cache entry
is invalidated when it changes.
"""

from __future__ import annotations

import datetime as dt
import uuid
from functools import lru_cache
from typing import Any

import structlog
from fastapi import Request
from prometheus_client import Counter
from sqlalchemy import bindparam, select

from soko.identity.accounts import principal_tag
from soko.identity.errors import InvalidApiKey
from soko.identity.models import ApiKey, AuthSession, User, UserRole, UserStatus
from soko.identity.permissions import permissions_for
from soko.identity.sessions import hash_secret, session_tag
from soko.platform.auth import Principal
from soko.platform.logging import bind_request_context
from soko.platform.runtime import Runtime
from soko.platform.tokens import InvalidToken, TokenRejection, VerifiedToken

API_KEY_PREFIX = "soko_"
PRINCIPAL_CACHE_SECONDS = 30
# What separates the read of a token's state from its `iat`, besides clock skew (the
# leeway): the issuer's delay between reading and signing, and `iat` being whole seconds.
ISSUE_DELAY_SECONDS = 2.0
log = structlog.get_logger("soko.identity")
ACCESS_TOKEN_STATES = Counter(
    "soko_access_token_states_total",
    "Where an access token's session state came from: its claims, trusted as issued "
    "(token), or a read (read)",
    ["source"],
)
# Bound once: a request only counts.
_FROM_TOKEN = ACCESS_TOKEN_STATES.labels("token")
_READ = ACCESS_TOKEN_STATES.labels("read")


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise InvalidToken(TokenRejection.malformed, "not a bearer credential")
    return value.strip()


async def authenticate(request: Request) -> Principal | None:
    """The principal behind the request's credentials; ``None`` without credentials.

    Bad credentials answer 401 even on public routes: a client that sends a token
    expects it to count, and silently treating it as anonymous hides bugs."""
    credential = _bearer(request)
    if credential is None:
        return None
    runtime: Runtime = request.app.state.runtime
    if credential.startswith(API_KEY_PREFIX):
        principal = await _from_api_key(runtime, credential)
    else:
        principal = await _from_access_token(runtime, credential)
    bind_request_context(user_id=str(principal.user_id))
    return principal


async def _from_access_token(runtime: Runtime, token: str) -> Principal:
    settings = runtime.settings
    verified = runtime.signing_keys.verify(
        token,
        audience=settings.token_audience,
        issuer=settings.effective_token_issuer,
        clock=runtime.clock,
        leeway=dt.timedelta(seconds=settings.token_leeway_seconds),
    )
    try:
        user_id = uuid.UUID(verified.subject)
        session_id = uuid.UUID(str(verified.claims.get("sid")))
    except ValueError:
        raise InvalidToken(TokenRejection.malformed, "subject or session is not an id") from None
    tags = (principal_tag(user_id), session_tag(session_id))
    state = _state_as_issued(runtime, verified, tags)
    if state is None:
        _READ.inc()
        state = await runtime.cache.get_or_set(
            f"identity:principal:{session_id}",
            lambda: _session_state(runtime, user_id, session_id),
            ttl=PRINCIPAL_CACHE_SECONDS,
            tags=tags,
            near=True,
        )
    else:
        _FROM_TOKEN.inc()
    if not state or not state.get("active"):
        raise InvalidToken(TokenRejection.bad_signature, "session revoked or user not active")
    roles = frozenset(state["roles"])
    return Principal(
        user_id=user_id,
        roles=roles,
        permissions=permissions_for(roles),
        session_id=session_id,
        extra={"mfa_verified": bool(state.get("mfa_verified"))},
    )


def _state_as_issued(
    runtime: Runtime, verified: VerifiedToken, tags: tuple[str, str]
) -> dict[str, Any] | None:
    """The session state the token was issued with, if it still holds; else ``None``.

    A token is issued only to an active user's live session, with the roles and second
    factor read in the same transaction (:func:`~soko.identity.sessions.issue_access_token`).
    That state still holds if neither the user's nor the session's tag was invalidated
    since it was read, which happened at most ``ISSUE_DELAY_SECONDS`` and the leeway
    (the clock skew allowed between the issuing and this process) before the token's
    ``iat``. A token without both claims (from an earlier release) is read."""
    claims = verified.claims
    roles, mfa = claims.get("roles"), claims.get("mfa")
    if not isinstance(mfa, bool) or not isinstance(roles, list):
        return None
    if not all(isinstance(role, str) for role in roles):
        return None
    read_by = (
        verified.issued_at.timestamp() - runtime.settings.token_leeway_seconds - ISSUE_DELAY_SECONDS
    )
    if not runtime.cache.unchanged_since(tags, read_by):
        return None
    return {"active": True, "roles": roles, "mfa_verified": mfa}


@lru_cache(maxsize=1)
def _session_state_statement() -> Any:
    """The session, its user and the user's roles, one row per role (``user_id``,
    ``session_id``), built once."""
    return (
        select(User.status, AuthSession.revoked_at, AuthSession.mfa_verified, UserRole.role)
        .join(AuthSession, AuthSession.user_id == User.id)
        .outerjoin(UserRole, UserRole.user_id == User.id)
        .where(User.id == bindparam("user_id"), AuthSession.id == bindparam("session_id"))
    )


async def _session_state(
    runtime: Runtime, user_id: uuid.UUID, session_id: uuid.UUID
) -> dict[str, Any]:
    # One statement, so one snapshot, outside any transaction: the read an access token
    # costs whenever its session's state is not cached.
    async with runtime.db.reading() as reader:
        rows = (
            await reader.execute(
                _session_state_statement(), {"user_id": user_id, "session_id": session_id}
            )
        ).all()
    if not rows:
        return {"active": False, "roles": []}
    status, revoked_at, mfa_verified, _ = rows[0]
    active = status == UserStatus.active.value and revoked_at is None
    roles = sorted({role for *_, role in rows if role is not None})
    return {"active": active, "roles": roles, "mfa_verified": mfa_verified}


async def _from_api_key(runtime: Runtime, credential: str) -> Principal:
    # soko_<prefix>_<secret>: the prefix finds the row, the hash of the whole key proves it.
    parts = credential.split("_")
    if len(parts) != 3 or len(credential) > 128:
        raise InvalidApiKey()
    prefix = f"{parts[0]}_{parts[1]}"
    now = runtime.clock.now()
    async with runtime.db.transaction(read_only=True) as session:
        key = (await session.scalars(select(ApiKey).where(ApiKey.prefix == prefix))).first()
        if key is None:
            raise InvalidApiKey()
        from soko.platform.crypto import digests_match

        if not digests_match(key.key_hash, hash_secret(credential)):
            raise InvalidApiKey()
        if key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now):
            raise InvalidApiKey()
        user = await session.get(User, key.user_id)
        if user is None or user.status != UserStatus.active.value:
            raise InvalidApiKey()
        roles = frozenset(
            (await session.scalars(select(UserRole.role).where(UserRole.user_id == user.id))).all()
        )
    await _touch_api_key(runtime, key.id, now)
    # A key never holds more than its owner: the intersection of both.
    granted = permissions_for(roles) & frozenset(key.permissions)
    return Principal(user_id=user.id, roles=roles, permissions=granted, api_key_id=key.id)


async def _touch_api_key(runtime: Runtime, key_id: uuid.UUID, now: dt.datetime) -> None:
    """Record last use at most once a minute per key, so busy keys do not write per call."""
    marker = f"identity:api-key-used:{key_id}"
    if await runtime.cache.get(marker):
        return
    await runtime.cache.set(marker, True, ttl=60)
    from sqlalchemy import update

    try:
        async with runtime.db.transaction() as session:
            await session.execute(
                update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now)
            )
    except Exception:  # last-used time is informative; never fail the request for it
        log.warning("could not record API key use", api_key_id=str(key_id))
