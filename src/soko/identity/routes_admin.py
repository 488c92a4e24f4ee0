"""Administration of users and of sign-in (under ``/api/v1/admin``): find users (exact
email or phone through the blind index), block and unblock them, change their roles, see
their sessions and security events, and switch login methods at runtime.

Every change is recorded in the audit log with the admin as its actor. An admin cannot
block themselves nor take away their own admin role: there is always someone left who
can undo a mistake. (The audit log itself is listed by ``routes_audit``.)
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints
from sqlalchemy import exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity.accounts import (
    email_index,
    normalize_email,
    normalize_phone,
    phone_index,
    principal_tag,
    replace_roles,
    user_email,
    user_phone,
    user_roles,
)
from soko.identity.audit import record_request_audit_event
from soko.identity.login_methods import (
    OIDC_PREFIX,
    LoginSettings,
    change_login_settings,
    login_settings,
)
from soko.identity.models import (
    ApiKey,
    AuditEvent,
    AuthSession,
    Role,
    TotpFactor,
    User,
    UserRole,
    UserStatus,
)
from soko.identity.permissions import AUDIT_READ, IDENTITY_SETTINGS, USERS_MANAGE, USERS_READ
from soko.identity.routes_audit import AuditEventFields, AuditEventOut
from soko.identity.routes_oidc import ProvidersDep
from soko.identity.schemas import UserOut
from soko.identity.sessions import revoke_user_sessions
from soko.platform.auth import Principal, require
from soko.platform.errors import Conflict, NotFound, ValidationFailed
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
from soko.platform.runtime import Runtime, RuntimeDep, SessionDep, invalidate_after_commit

router = APIRouter()


# -- shapes -----------------------------------------------------------------------------------


class AdminUserOut(UserOut):
    """A user as an administrator sees them."""

    updated_at: dt.datetime
    version: int = Field(description="Bumped on every change; the ETag names it")


class BlockRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, StringConstraints(strip_whitespace=True, max_length=500)] = ""


class RolesChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    roles: list[Role] = Field(min_length=1, max_length=len(Role))


class UserSessionOut(BaseModel):
    """One of a user's sessions, live or ended."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    device_name: str
    ip: str
    method: str
    mfa_verified: bool
    created_at: dt.datetime
    last_seen_at: dt.datetime
    expires_at: dt.datetime
    revoked_at: dt.datetime | None
    revoked_reason: str | None


class LoginMethodsOut(BaseModel):
    methods: dict[str, bool] = Field(
        description="Each sign-in method (password, sms_code, oidc:<provider>) on or off"
    )
    mfa_required_roles: list[Role] = Field(
        description="Roles whose members must sign in with a second factor"
    )

    @classmethod
    def of(cls, current: LoginSettings) -> LoginMethodsOut:
        return cls(
            methods=current.methods,
            mfa_required_roles=sorted(Role(role) for role in current.mfa_required_roles),
        )


class LoginMethodsChange(BaseModel):
    """What to change: methods not named keep their setting; ``mfa_required_roles``,
    when given, replaces the list."""

    model_config = ConfigDict(extra="forbid")

    methods: dict[str, StrictBool] = Field(default_factory=dict, max_length=50)
    mfa_required_roles: list[Role] | None = None


UserFields = field_selection(AdminUserOut, always=("id",))
UserSessionFields = field_selection(UserSessionOut, always=("id",))

USER_LISTING = Keyset(
    "identity.admin.users", SortKey(User.created_at, descending=True), id_column=User.id
)


# -- service ----------------------------------------------------------------------------------


async def _audit(
    session: AsyncSession,
    request: Request,
    runtime: Runtime,
    admin: Principal,
    action: str,
    *,
    target_type: str,
    target_id: str,
    data: dict[str, object],
) -> None:
    await record_request_audit_event(
        session,
        request,
        runtime,
        action=action,
        actor_id=admin.user_id,
        target_type=target_type,
        target_id=target_id,
        data=data,
    )


async def admin_views(
    session: AsyncSession, runtime: Runtime, users: Sequence[User]
) -> list[AdminUserOut]:
    """Users as admins see them: two queries for the roles and MFA of the whole page."""
    ids = [user.id for user in users]
    roles: dict[uuid.UUID, list[str]] = {user_id: [] for user_id in ids}
    with_mfa: set[uuid.UUID] = set()
    if ids:
        for row in await session.execute(
            select(UserRole.user_id, UserRole.role).where(UserRole.user_id.in_(ids))
        ):
            roles[row.user_id].append(row.role)
        with_mfa = set(
            (
                await session.scalars(
                    select(TotpFactor.user_id).where(
                        TotpFactor.user_id.in_(ids), TotpFactor.confirmed_at.is_not(None)
                    )
                )
            ).all()
        )
    keys = runtime.data_keys
    return [
        AdminUserOut(
            id=user.id,
            email=user_email(keys, user),
            email_verified=user.email_verified_at is not None,
            phone=user_phone(keys, user),
            phone_verified=user.phone_verified_at is not None,
            display_name=user.display_name,
            status=user.status,
            roles=sorted(roles[user.id]),
            mfa_enabled=user.id in with_mfa,
            created_at=user.created_at,
            updated_at=user.updated_at,
            version=user.version,
        )
        for user in users
    ]


async def _user(session: AsyncSession, user_id: uuid.UUID) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise NotFound("No such user.")
    return user


def _query_problem(field: str, problem: ValidationFailed) -> ValidationFailed:
    return ValidationFailed.of_field(
        field, problem.detail.removeprefix(f"{field} "), location="query"
    )


def _check_not_self(admin: Principal, user: User, what: str) -> None:
    if user.id == admin.user_id:
        raise Conflict(f"You cannot {what} yourself: ask another administrator.")


async def _view(session: AsyncSession, runtime: Runtime, user: User) -> AdminUserOut:
    await session.refresh(user)
    return (await admin_views(session, runtime, [user]))[0]


# -- users ------------------------------------------------------------------------------------


@router.get("/users", response_model=Page[AdminUserOut], summary="List and search users")
async def list_users(
    _admin: Annotated[Principal, require(USERS_READ)],
    session: SessionDep,
    runtime: RuntimeDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(UserFields)],
    email: Annotated[
        str | None, Query(max_length=254, description="Only the user with exactly this email")
    ] = None,
    phone: Annotated[
        str | None,
        Query(max_length=32, description="Only the user with this phone number (E.164)"),
    ] = None,
    status: Annotated[UserStatus | None, Query(description="Only users in this status")] = None,
    role: Annotated[Role | None, Query(description="Only users holding this role")] = None,
) -> Response:
    statement = select(User)
    # Exact lookups go through the blind index: the database never sees the address.
    if email is not None:
        try:
            canonical = normalize_email(email)
        except ValidationFailed as problem:
            raise _query_problem("email", problem) from None
        statement = statement.where(User.email_index == email_index(runtime.data_keys, canonical))
    if phone is not None:
        try:
            e164 = normalize_phone(phone)
        except ValidationFailed as problem:
            raise _query_problem("phone", problem) from None
        statement = statement.where(User.phone_index == phone_index(runtime.data_keys, e164))
    if status is not None:
        statement = statement.where(User.status == status.value)
    if role is not None:
        statement = statement.where(
            exists().where(UserRole.user_id == User.id, UserRole.role == role.value)
        )
    rows, next_cursor = await USER_LISTING.fetch(session, statement, page)
    return page_response(await admin_views(session, runtime, rows), next_cursor, fields)


@router.get("/users/{user_id}", response_model=AdminUserOut, summary="One user")
async def read_user(
    _admin: Annotated[Principal, require(USERS_READ)],
    user_id: uuid.UUID,
    request: Request,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> AdminUserOut | Response:
    user = await _user(session, user_id)
    tag = etag_for_version(user.version)
    if (unchanged := not_modified(request, tag)) is not None:
        return unchanged
    tag_response(response, tag)
    return (await admin_views(session, runtime, [user]))[0]


@router.post("/users/{user_id}/block", response_model=AdminUserOut, summary="Block a user")
async def block_user(
    admin: Annotated[Principal, require(USERS_MANAGE)],
    user_id: uuid.UUID,
    request: Request,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
    body: Annotated[BlockRequest | None, Body()] = None,
) -> AdminUserOut:
    """Block the account: its sessions and API keys are revoked, and its tokens refused
    at once. Unblocking brings none of them back. Blocking a blocked user changes
    nothing."""
    user = await _user(session, user_id)
    _check_not_self(admin, user, "block")
    require_match(request, etag_for_version(user.version))
    now = runtime.clock.now()
    # Only an active account becomes blocked: a deleted one stays deleted even when an
    # admin acts on a stale page.
    changed = await session.execute(
        update(User)
        .where(User.id == user.id, User.status == UserStatus.active.value)
        .values(status=UserStatus.blocked.value, updated_at=now, version=User.version + 1)
        .execution_options(synchronize_session=False)
    )
    if changed.rowcount == 1:  # type: ignore[attr-defined]
        revoked = await revoke_user_sessions(session, user.id, now=now, reason="user_blocked")
        # A key made or stolen by whoever the block stops must not work again on unblock.
        keys = await session.execute(
            update(ApiKey)
            .where(ApiKey.user_id == user.id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=now)
            .execution_options(synchronize_session=False)
        )
        invalidate_after_commit(session, principal_tag(user.id))
        await _audit(
            session,
            request,
            runtime,
            admin,
            "admin.user_blocked",
            target_type="user",
            target_id=str(user.id),
            data={
                "reason": body.reason if body else "",
                "sessions_revoked": revoked,
                "api_keys_revoked": int(keys.rowcount),  # type: ignore[attr-defined]
            },
        )
    else:
        await session.refresh(user)
        if user.status != UserStatus.blocked.value:
            raise Conflict(f"A {user.status} account cannot be blocked.")
    view = await _view(session, runtime, user)
    tag_response(response, etag_for_version(view.version))
    return view


@router.post("/users/{user_id}/unblock", response_model=AdminUserOut, summary="Unblock a user")
async def unblock_user(
    admin: Annotated[Principal, require(USERS_MANAGE)],
    user_id: uuid.UUID,
    request: Request,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> AdminUserOut:
    """Let a blocked user sign in again (their old sessions and API keys stay revoked)."""
    user = await _user(session, user_id)
    require_match(request, etag_for_version(user.version))
    now = runtime.clock.now()
    changed = await session.execute(
        update(User)
        .where(User.id == user.id, User.status == UserStatus.blocked.value)
        .values(status=UserStatus.active.value, updated_at=now, version=User.version + 1)
        .execution_options(synchronize_session=False)
    )
    if changed.rowcount == 1:  # type: ignore[attr-defined]
        invalidate_after_commit(session, principal_tag(user.id))
        await _audit(
            session,
            request,
            runtime,
            admin,
            "admin.user_unblocked",
            target_type="user",
            target_id=str(user.id),
            data={},
        )
    else:
        await session.refresh(user)
        if user.status != UserStatus.active.value:
            raise Conflict(f"A {user.status} account cannot be unblocked.")
    view = await _view(session, runtime, user)
    tag_response(response, etag_for_version(view.version))
    return view


@router.put("/users/{user_id}/roles", response_model=AdminUserOut, summary="Set a user's roles")
async def set_user_roles(
    admin: Annotated[Principal, require(USERS_MANAGE)],
    user_id: uuid.UUID,
    change: RolesChange,
    request: Request,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> AdminUserOut:
    """Replace the user's roles; their tokens carry the new permissions at once."""
    user = await _user(session, user_id)
    require_match(request, etag_for_version(user.version))
    if user.status == UserStatus.deleted.value:
        raise Conflict("A deleted account's roles cannot change.")
    now = runtime.clock.now()
    # The version bump comes first: on PostgreSQL it locks the user's row, so two admins
    # changing roles at once take turns instead of interleaving their deletes and inserts.
    await session.execute(
        update(User)
        .where(User.id == user.id)
        .values(updated_at=now, version=User.version + 1)
        .execution_options(synchronize_session=False)
    )
    before = await user_roles(session, user.id)
    wanted = frozenset(role.value for role in change.roles)
    if user.id == admin.user_id and Role.admin.value in before and Role.admin.value not in wanted:
        raise Conflict("You cannot remove your own admin role: ask another administrator.")
    after = await replace_roles(session, user.id, wanted, now=now, granted_by=admin.user_id)
    invalidate_after_commit(session, principal_tag(user.id))
    if after != before:
        await _audit(
            session,
            request,
            runtime,
            admin,
            "admin.roles_changed",
            target_type="user",
            target_id=str(user.id),
            data={"before": sorted(before), "after": sorted(after)},
        )
    view = await _view(session, runtime, user)
    tag_response(response, etag_for_version(view.version))
    return view


@router.get(
    "/users/{user_id}/sessions", response_model=Page[UserSessionOut], summary="A user's sessions"
)
async def list_user_sessions(
    _admin: Annotated[Principal, require(USERS_READ)],
    user_id: uuid.UUID,
    session: SessionDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(UserSessionFields)],
    active: Annotated[
        bool, Query(description="Only sessions not revoked (they may still have expired)")
    ] = False,
) -> Response:
    await _user(session, user_id)
    statement = select(AuthSession).where(AuthSession.user_id == user_id)
    if active:
        statement = statement.where(AuthSession.revoked_at.is_(None))
    listing = Keyset(
        f"identity.admin.sessions:{user_id}",
        SortKey(AuthSession.created_at, descending=True),
        id_column=AuthSession.id,
    )
    rows, next_cursor = await listing.fetch(session, statement, page)
    return page_response([UserSessionOut.model_validate(row) for row in rows], next_cursor, fields)


@router.get(
    "/users/{user_id}/security-events",
    response_model=Page[AuditEventOut],
    summary="Audit events by or about a user, newest first",
)
async def list_user_security_events(
    _auditor: Annotated[Principal, require(AUDIT_READ)],
    user_id: uuid.UUID,
    session: SessionDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(AuditEventFields)],
) -> Response:
    await _user(session, user_id)
    listing = Keyset(
        f"identity.admin.security_events:{user_id}",
        id_column=AuditEvent.seq,
        id_descending=True,
    )
    statement = select(AuditEvent).where(
        or_(AuditEvent.target_id == str(user_id), AuditEvent.actor_id == user_id)
    )
    rows, next_cursor = await listing.fetch(session, statement, page)
    return page_response([AuditEventOut.model_validate(row) for row in rows], next_cursor, fields)


# -- login methods ------------------------------------------------------------------------------


@router.get("/login-methods", response_model=LoginMethodsOut, summary="Sign-in settings")
async def read_login_methods(
    _admin: Annotated[Principal, require(IDENTITY_SETTINGS)], session: SessionDep
) -> LoginMethodsOut:
    return LoginMethodsOut.of(await login_settings(session))


@router.put("/login-methods", response_model=LoginMethodsOut, summary="Change sign-in settings")
async def change_login_methods(
    admin: Annotated[Principal, require(IDENTITY_SETTINGS)],
    change: LoginMethodsChange,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    providers: ProvidersDep,
) -> LoginMethodsOut:
    """Switch sign-in methods on or off and choose the roles that must use MFA; every
    process applies the change from its next sign-in. A social provider is switched on
    only once it is configured (``SOKO_OIDC_PROVIDERS``); switching one off always works."""
    unconfigured = sorted(
        name
        for name, on in (change.methods or {}).items()
        if on
        and name.startswith(OIDC_PREFIX)
        and name.removeprefix(OIDC_PREFIX) not in providers.names()
    )
    if unconfigured:
        raise ValidationFailed.of_field(
            "methods",
            f"not configured in SOKO_OIDC_PROVIDERS, so they cannot be switched on: "
            f"{', '.join(unconfigured)}",
        )
    before = await login_settings(session)
    try:
        after = await change_login_settings(
            session,
            methods=change.methods,
            mfa_required_roles=(
                [role.value for role in change.mfa_required_roles]
                if change.mfa_required_roles is not None
                else None
            ),
            now=runtime.clock.now(),
            changed_by=admin.user_id,
        )
    except ValueError as exc:
        raise ValidationFailed.of_field("methods", str(exc)) from None
    if after != before:
        # Lists of names, not {"password": true}: the audit log masks any value under a
        # key named like a secret.
        await _audit(
            session,
            request,
            runtime,
            admin,
            "admin.login_methods_changed",
            target_type="identity_settings",
            target_id="login_methods",
            data={
                "enabled": sorted(name for name, on in after.methods.items() if on),
                "disabled": sorted(name for name, on in after.methods.items() if not on),
                "changed": sorted(
                    name for name, on in after.methods.items() if before.methods.get(name) is not on
                ),
                "mfa_required_roles": sorted(after.mfa_required_roles),
                "mfa_required_roles_before": sorted(before.mfa_required_roles),
            },
        )
    return LoginMethodsOut.of(after)
