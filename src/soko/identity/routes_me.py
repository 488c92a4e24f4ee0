"""The signed-in user's own account: profile, password, devices, sign out everywhere and
account deletion (under ``/api/v1/me``)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import bindparam, exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity.account_lifecycle import confirm_owner, delete_account
from soko.identity.accounts import email_of, phone_of, user_email, user_phone, user_roles
from soko.identity.audit import record_audit_event
from soko.identity.errors import AccountDeletionBlocked
from soko.identity.models import AuthSession, TotpFactor, User, UserRole, UserStatus
from soko.identity.passwords import NEW_PASSWORD_DESCRIPTION
from soko.identity.permissions import ACCOUNT_SELF
from soko.identity.schemas import UserOut
from soko.identity.sessions import revoke_session, revoke_user_sessions
from soko.identity.signin import RequestFacts, change_password
from soko.platform.auth import SESSION_ONLY, Principal, account_deletion_blockers, require
from soko.platform.errors import NotFound, PreconditionFailed, problem_responses
from soko.platform.etag import etag_for_version, not_modified, require_match, tag_response
from soko.platform.pagination import (
    FieldSelection,
    Keyset,
    Page,
    PageRequestDep,
    SortKey,
    field_selection,
    page_response,
)
from soko.platform.runtime import Runtime, RuntimeDep, SessionDep

router = APIRouter()

Me = Annotated[Principal, require(ACCOUNT_SELF)]


# -- shapes -----------------------------------------------------------------------------


DisplayName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=120)]


class ProfileUpdate(BaseModel):
    """The fields an account holder may change themselves. Anything else (roles, status,
    verified flags, email) is refused, not silently dropped."""

    model_config = ConfigDict(extra="forbid")

    display_name: DisplayName


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current_password: str = Field(max_length=1024)
    new_password: str = Field(max_length=1024, description=NEW_PASSWORD_DESCRIPTION)


class AccountDeletion(BaseModel):
    """Proof that the owner is asking: the current password (accounts without one prove
    it by a recent sign-in and may send nothing)."""

    model_config = ConfigDict(extra="forbid")

    password: str | None = Field(default=None, max_length=1024)


class SessionOut(BaseModel):
    """One signed-in device."""

    id: uuid.UUID
    device_name: str
    ip: str
    method: str
    created_at: dt.datetime
    last_seen_at: dt.datetime
    current: bool = Field(description="Whether this is the session making the request")


SessionFields = field_selection(SessionOut)


# -- service --------------------------------------------------------------------------------


async def account_view(session: AsyncSession, runtime: Runtime, user: User) -> UserOut:
    """The account as its owner sees it, with email and phone decrypted."""
    roles = await user_roles(session, user.id)
    mfa_enabled = (
        await session.scalar(
            select(TotpFactor.user_id).where(
                TotpFactor.user_id == user.id, TotpFactor.confirmed_at.is_not(None)
            )
        )
    ) is not None
    return UserOut(
        id=user.id,
        email=user_email(runtime.data_keys, user),
        email_verified=user.email_verified_at is not None,
        phone=user_phone(runtime.data_keys, user),
        phone_verified=user.phone_verified_at is not None,
        display_name=user.display_name,
        status=user.status,
        roles=sorted(roles),
        mfa_enabled=mfa_enabled,
        created_at=user.created_at,
    )


async def _own_user(session: AsyncSession, principal: Principal) -> User:
    user = await session.get(User, principal.user_id)
    # The principal was checked active a moment ago; a row gone or deleted since then is
    # answered as the account not existing.
    if user is None or user.status == UserStatus.deleted.value:
        raise NotFound("This account no longer exists.")
    return user


def _own_sessions(principal: Principal) -> Keyset:
    # The owner is part of the list's name, so a cursor cannot page through another
    # user's devices.
    return Keyset(
        f"identity.sessions:{principal.user_id}",
        SortKey(AuthSession.created_at, descending=True),
        id_column=AuthSession.id,
    )


# -- profile ---------------------------------------------------------------------------------


# The account, whether an authenticator is on and its roles, one row per role: a single
# statement (one snapshot), built once. The most frequent authenticated read of all.
_OWN_ACCOUNT = (
    select(
        User.id,
        User.email_ciphertext,
        User.email_verified_at,
        User.phone_ciphertext,
        User.phone_verified_at,
        User.display_name,
        User.status,
        User.created_at,
        User.version,
        exists()
        .where(TotpFactor.user_id == User.id, TotpFactor.confirmed_at.is_not(None))
        .label("mfa_enabled"),
        UserRole.role,
    )
    .outerjoin(UserRole, UserRole.user_id == User.id)
    .where(User.id == bindparam("user_id"))
)


@router.get(
    "", response_model=UserOut, summary="Your account", responses=problem_responses(401, 403)
)
async def read_me(
    principal: Me, request: Request, response: Response, runtime: RuntimeDep
) -> UserOut | Response:
    # No request transaction: one statement, on a reading connection.
    async with runtime.db.reading() as reader:
        rows = (await reader.execute(_OWN_ACCOUNT, {"user_id": principal.user_id})).all()
    # The principal was checked active a moment ago; a row gone or deleted since then is
    # answered as the account not existing.
    if not rows or rows[0].status == UserStatus.deleted.value:
        raise NotFound("This account no longer exists.")
    account = rows[0]
    tag = etag_for_version(account.version)
    if (unchanged := not_modified(request, tag)) is not None:
        return unchanged
    tag_response(response, tag)
    keys = runtime.data_keys
    return UserOut(
        id=account.id,
        email=email_of(keys, account.id, account.email_ciphertext),
        email_verified=account.email_verified_at is not None,
        phone=phone_of(keys, account.id, account.phone_ciphertext),
        phone_verified=account.phone_verified_at is not None,
        display_name=account.display_name,
        status=account.status,
        roles=sorted(row.role for row in rows if row.role is not None),
        mfa_enabled=bool(account.mfa_enabled),
        created_at=account.created_at,
    )


@router.patch(
    "",
    response_model=UserOut,
    summary="Change your display name",
    responses=problem_responses(401, 403, 412, 422),
)
async def update_me(
    principal: Me,
    change: ProfileUpdate,
    request: Request,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> UserOut:
    user = await _own_user(session, principal)
    seen = user.version
    require_match(request, etag_for_version(seen))
    # Guarded by the version read above: a concurrent change between the read and this
    # write makes it match nothing, and the client is told its version is stale.
    changed = await session.execute(
        update(User)
        .where(User.id == user.id, User.version == seen)
        .values(
            display_name=change.display_name,
            updated_at=runtime.clock.now(),
            version=User.version + 1,
        )
        .execution_options(synchronize_session=False)
    )
    if changed.rowcount != 1:  # type: ignore[attr-defined]
        raise PreconditionFailed(
            "The account changed while you were editing it: fetch it again and retry."
        )
    await session.refresh(user)
    tag_response(response, etag_for_version(user.version))
    return await account_view(session, runtime, user)


@router.post(
    "/password",
    dependencies=[SESSION_ONLY],
    status_code=204,
    summary="Change your password",
    responses=problem_responses(401, 403, 422, 429),
)
async def change_my_password(
    principal: Me,
    change: PasswordChange,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
) -> Response:
    await change_password(
        session,
        runtime,
        user_id=principal.user_id,
        current_password=change.current_password,
        new_password=change.new_password,
        keep_session_id=principal.session_id,
        facts=RequestFacts.of(request, runtime),
    )
    return Response(status_code=204)


@router.delete(
    "",
    status_code=204,
    summary="Delete your account",
    responses=problem_responses(401, 403, 409, 422, 429),
)
async def delete_me(
    principal: Me,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    proof: Annotated[AccountDeletion | None, Body()] = None,
) -> Response:
    facts = RequestFacts.of(request, runtime)
    user = await _own_user(session, principal)
    await confirm_owner(
        session,
        runtime,
        user,
        principal,
        password=proof.password if proof is not None else None,
        facts=facts,
    )
    blockers = await account_deletion_blockers(session, runtime, user.id)
    if blockers:
        raise AccountDeletionBlocked(" ".join(blockers), reasons=blockers)
    await delete_account(session, runtime, user, facts=facts)
    return Response(status_code=204)


# -- sessions (devices) ------------------------------------------------------------------------


@router.get(
    "/sessions",
    response_model=Page[SessionOut],
    summary="Your signed-in devices",
    responses=problem_responses(400, 401, 403),
)
async def list_my_sessions(
    principal: Me,
    session: SessionDep,
    runtime: RuntimeDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(SessionFields)],
) -> Response:
    now = runtime.clock.now()
    rows, next_cursor = await _own_sessions(principal).fetch(
        session,
        select(AuthSession).where(
            AuthSession.user_id == principal.user_id,
            AuthSession.revoked_at.is_(None),
            AuthSession.expires_at > now,
        ),
        page,
    )
    items = [
        SessionOut(
            id=row.id,
            device_name=row.device_name,
            ip=row.ip,
            method=row.method,
            created_at=row.created_at,
            last_seen_at=row.last_seen_at,
            current=row.id == principal.session_id,
        )
        for row in rows
    ]
    return page_response(items, next_cursor, fields)


@router.delete(
    "/sessions/{session_id}",
    dependencies=[SESSION_ONLY],
    status_code=204,
    summary="Sign a device out",
    responses=problem_responses(401, 403, 404),
)
async def revoke_my_session(
    principal: Me,
    session_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
) -> Response:
    auth_session = (
        await session.scalars(
            select(AuthSession).where(
                AuthSession.id == session_id, AuthSession.user_id == principal.user_id
            )
        )
    ).first()
    if auth_session is None:
        # Someone else's session answers exactly like one that does not exist.
        raise NotFound("No such session.")
    # Revoking a session already revoked is a no-op answered the same way: the device is
    # signed out either way.
    if await revoke_session(
        session, auth_session, now=runtime.clock.now(), reason="revoked_by_user"
    ):
        facts = RequestFacts.of(request, runtime)
        await record_audit_event(
            session,
            action="auth.session_revoked",
            actor_id=principal.user_id,
            target_type="session",
            target_id=str(auth_session.id),
            ip=facts.ip,
            request_id=facts.request_id,
            data={
                "user_id": str(principal.user_id),
                "current": auth_session.id == principal.session_id,
            },
            clock=runtime.clock,
        )
    return Response(status_code=204)


@router.post(
    "/sessions/revoke-all",
    dependencies=[SESSION_ONLY],
    status_code=204,
    summary="Sign out everywhere",
    responses=problem_responses(401, 403),
)
async def revoke_all_my_sessions(
    principal: Me,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    keep_current: Annotated[
        bool, Query(description="Keep the session making this request signed in")
    ] = False,
) -> Response:
    kept = principal.session_id if keep_current else None
    revoked = await revoke_user_sessions(
        session,
        principal.user_id,
        now=runtime.clock.now(),
        reason="signed_out_everywhere",
        keep=kept,
    )
    facts = RequestFacts.of(request, runtime)
    await record_audit_event(
        session,
        action="auth.sessions_revoked",
        actor_id=principal.user_id,
        target_type="user",
        target_id=str(principal.user_id),
        ip=facts.ip,
        request_id=facts.request_id,
        data={"revoked": revoked, "kept_current": kept is not None},
        clock=runtime.clock,
    )
    return Response(status_code=204)
