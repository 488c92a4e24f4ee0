"""The end of an account: confirming it is really the owner, then erasing what identifies
them while keeping the row.

The ``users`` row (and its id) survives deletion, anonymized: orders, payments and audit
events that the law makes us keep still name a user, but that user no longer has an
email, a phone, a name or a password. Everything else the account held (sessions,
API keys, second factors, social links, pending links and codes) is revoked or deleted
in the same transaction (sessions lose their device, user agent and address, keys their
name), and an ``identity.user_deleted`` event tells the other domains to anonymize their
own copies. Before any of it, the checks other domains registered
(:func:`soko.platform.auth.on_account_deletion`) may refuse: orders still on their way,
a store the person alone owns.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity import throttle
from soko.identity.accounts import principal_tag
from soko.identity.audit import record_audit_event
from soko.identity.errors import ReauthenticationRequired
from soko.identity.events import USER_DELETED, UserDeleted
from soko.identity.models import (
    ApiKey,
    AuthSession,
    ExternalIdentity,
    LoginThrottle,
    MfaChallenge,
    OneTimeCode,
    RecoveryCode,
    TotpFactor,
    User,
    UserRole,
    UserStatus,
    VerificationToken,
)
from soko.identity.passwords import password_hasher
from soko.identity.sessions import revoke_user_sessions
from soko.identity.signin import RequestFacts
from soko.platform.auth import Principal
from soko.platform.outbox import publish
from soko.platform.runtime import Runtime, invalidate_after_commit

USER_DELETED_EVENT = USER_DELETED
DELETED_DISPLAY_NAME = "Deleted user"
# A password-less account (SMS code, social sign-in) proves it is the owner by having
# signed in this recently: a stolen long-lived session cannot delete the account.
RECENT_SIGN_IN = dt.timedelta(minutes=10)


def _throttle_keys(user: User, ip: str) -> list[throttle.ThrottleKey]:
    # The same account keys sign-in uses, so guesses here and at the login form share
    # one budget: the deletion form is no side door for password guessing.
    keys = [throttle.account_key(index) for index in (user.email_index, user.phone_index) if index]
    keys.append(throttle.ip_key(ip))
    return keys


async def confirm_owner(
    session: AsyncSession,
    runtime: Runtime,
    user: User,
    principal: Principal,
    *,
    password: str | None,
    facts: RequestFacts,
) -> None:
    """Refuse unless the caller proves again that they own the account: its current
    password, or for an account without one, a sign-in within :data:`RECENT_SIGN_IN`.

    Wrong passwords count against the sign-in throttle and are audited; while the
    throttle makes the account wait, the password is not even looked at (429)."""
    if principal.session_id is None:
        raise ReauthenticationRequired(
            "Only a signed-in session can do this, not an API key: sign in and retry."
        )
    if user.password_hash is None:
        auth_session = await session.get(AuthSession, principal.session_id)
        now = runtime.clock.now()
        if auth_session is None or now - auth_session.created_at > RECENT_SIGN_IN:
            raise ReauthenticationRequired(
                "Sign in again and retry within 10 minutes of signing in."
            )
        return
    if not password:
        raise ReauthenticationRequired("Send your current password to confirm.")
    keys = _throttle_keys(user, facts.ip)
    await throttle.check(session, keys, runtime.clock)
    ok, _ = await password_hasher(runtime).verify(password, user.password_hash)
    if ok:
        return
    user_id = user.id
    await throttle.record_failure(runtime.db, keys, runtime.clock, abandon=session)
    # The failure is counted in its own transaction; the audit event commits with the
    # refusal in the request's (rolled back, now fresh) transaction.
    await record_audit_event(
        session,
        action="account.reauthentication_failed",
        actor_id=user_id,
        target_type="user",
        target_id=str(user_id),
        ip=facts.ip,
        request_id=facts.request_id,
        data={"purpose": "account_deletion"},
        clock=runtime.clock,
    )
    raise ReauthenticationRequired("The password is not correct.").keeping_changes()


async def delete_account(
    session: AsyncSession, runtime: Runtime, user: User, *, facts: RequestFacts
) -> bool:
    """Delete ``user``'s account in the caller's transaction: revoke and erase what it
    holds and anonymize its row. False when it was already deleted (a concurrent
    deletion won); nothing is then changed."""
    now = runtime.clock.now()
    user_id = user.id
    identifier_indexes = [index for index in (user.email_index, user.phone_index) if index]
    anonymized = await session.execute(
        update(User)
        .where(User.id == user_id, User.status != UserStatus.deleted.value)
        .values(
            email_ciphertext=None,
            email_index=None,
            email_verified_at=None,
            phone_ciphertext=None,
            phone_index=None,
            phone_verified_at=None,
            display_name=DELETED_DISPLAY_NAME,
            password_hash=None,
            password_changed_at=None,
            status=UserStatus.deleted.value,
            deleted_at=now,
            updated_at=now,
            version=User.version + 1,
        )
        .execution_options(synchronize_session=False)
    )
    if anonymized.rowcount != 1:  # type: ignore[attr-defined]
        return False
    revoked_sessions = await revoke_user_sessions(
        session, user_id, now=now, reason="account_deleted"
    )
    # The revoked sessions stay (their ids are in audit events) without where and on
    # what they signed in from.
    await session.execute(
        update(AuthSession)
        .where(AuthSession.user_id == user_id)
        .values(device_name="", user_agent="", ip="")
        .execution_options(synchronize_session=False)
    )
    revoked_keys = await session.execute(
        update(ApiKey)
        .where(ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )
    # A key's name is the person's own words.
    await session.execute(
        update(ApiKey)
        .where(ApiKey.user_id == user_id)
        .values(name="")
        .execution_options(synchronize_session=False)
    )
    for table in (
        TotpFactor,
        RecoveryCode,
        MfaChallenge,
        ExternalIdentity,
        VerificationToken,
        UserRole,
    ):
        await session.execute(
            delete(table)
            .where(table.user_id == user_id)
            .execution_options(synchronize_session=False)
        )
    if identifier_indexes:
        # Codes and throttle counters are keyed by the blind index of the phone or email,
        # which would otherwise outlive the account as a pseudonym of the person.
        await session.execute(
            delete(OneTimeCode)
            .where(OneTimeCode.phone_index.in_(identifier_indexes))
            .execution_options(synchronize_session=False)
        )
        await session.execute(
            delete(LoginThrottle)
            .where(
                LoginThrottle.key.in_(
                    [throttle.account_key(index).key for index in identifier_indexes]
                )
            )
            .execution_options(synchronize_session=False)
        )
    await record_audit_event(
        session,
        action="account.deleted",
        actor_id=user_id,
        target_type="user",
        target_id=str(user_id),
        ip=facts.ip,
        request_id=facts.request_id,
        data={
            "sessions_revoked": revoked_sessions,
            "api_keys_revoked": int(revoked_keys.rowcount),  # type: ignore[attr-defined]
        },
        clock=runtime.clock,
    )
    await publish(session, USER_DELETED_EVENT, UserDeleted(user_id=user_id), now=now)
    invalidate_after_commit(session, principal_tag(user_id))
    await session.refresh(user)
    return True
