"""Login methods and MFA requirements: runtime settings an admin changes without a restart.

They live in ``identity_settings`` rows and are read from the database in the caller's
own transaction, so a change is seen by every process at its next sign-in, and a
sign-in never sees half a change. Each method is its own row (``login_method:<name>``),
so two admins switching different methods at once cannot undo each other; the roles
that require MFA are one row replaced as a whole.

Social providers are ``oidc:<provider>`` and start switched off: configuring a provider
makes it available, an admin turning it on makes it live.

Sign-ins, the hot path, may read them through :func:`current_login_settings` instead:
one whole snapshot (one statement, never half a change) kept in the runtime's cache and
invalidated in every process when :func:`change_login_settings` commits in a request,
so no sign-in pays two database reads for settings that change a few times a year.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity.models import IdentitySetting, Role
from soko.platform.db import dialect_insert
from soko.platform.runtime import invalidate_after_commit

if TYPE_CHECKING:
    from soko.platform.runtime import Runtime

PASSWORD = "password"
SMS_CODE = "sms_code"
OIDC_PREFIX = "oidc:"

DEFAULT_LOGIN_METHODS: Mapping[str, bool] = {
    PASSWORD: True,
    SMS_CODE: True,
    "oidc:google": False,
    "oidc:apple": False,
}
METHOD_KEY_PREFIX = "login_method:"
MFA_REQUIRED_ROLES_KEY = "mfa_required_roles"
LOGIN_SETTINGS_TAG = "identity:login-settings"
LOGIN_SETTINGS_CACHE_KEY = "identity:login-settings"
# A backstop only: a change through change_login_settings in a request invalidates at
# once; one written any other way (a script, a failed invalidation) shows within this.
LOGIN_SETTINGS_CACHE_SECONDS = 30
# Provider names as the OIDC configuration spells them.
_OIDC_METHOD = re.compile(r"^oidc:[a-z0-9][a-z0-9_-]{0,31}$")


def oidc_method(provider: str) -> str:
    """The login method name of a social provider (``oidc:google``)."""
    return f"{OIDC_PREFIX}{provider}"


def is_known_method(name: str) -> bool:
    return name in DEFAULT_LOGIN_METHODS or bool(_OIDC_METHOD.match(name))


@dataclass(frozen=True, slots=True)
class LoginSettings:
    methods: dict[str, bool]
    mfa_required_roles: frozenset[str]


async def login_method_enabled(session: AsyncSession, name: str) -> bool:
    """Whether sign-in by ``name`` (``password``, ``sms_code``, ``oidc:<provider>``) is on.
    A method nobody has set has its default: password and SMS on, social providers off."""
    if not is_known_method(name):
        return False
    value = await session.scalar(
        select(IdentitySetting.value).where(IdentitySetting.key == METHOD_KEY_PREFIX + name)
    )
    if isinstance(value, bool):
        return value
    return DEFAULT_LOGIN_METHODS.get(name, False)


async def mfa_required_roles(session: AsyncSession) -> frozenset[str]:
    """The roles whose members must sign in with a second factor."""
    value = await session.scalar(
        select(IdentitySetting.value).where(IdentitySetting.key == MFA_REQUIRED_ROLES_KEY)
    )
    if not isinstance(value, list):
        return frozenset()
    return frozenset(str(role) for role in value)


async def login_settings(session: AsyncSession) -> LoginSettings:
    """Every login method (defaults and any social provider ever set) and the MFA rule."""
    stored = await _stored_all(session)
    methods = dict(DEFAULT_LOGIN_METHODS)
    for key, value in stored.items():
        if key.startswith(METHOD_KEY_PREFIX) and isinstance(value, bool):
            methods[key.removeprefix(METHOD_KEY_PREFIX)] = value
    roles = stored.get(MFA_REQUIRED_ROLES_KEY)
    return LoginSettings(
        methods=dict(sorted(methods.items())),
        mfa_required_roles=frozenset(roles) if isinstance(roles, list) else frozenset(),
    )


async def current_login_settings(runtime: Runtime) -> LoginSettings:
    """:func:`login_settings` as of the last change, from the runtime's cache (read in a
    short read-only transaction of its own on a miss), kept near in each process.

    Code changing the settings outside a request (a script, a test) invalidates with
    ``await runtime.cache.invalidate_tags(LOGIN_SETTINGS_TAG)`` after its commit."""

    async def read() -> dict[str, Any]:
        async with runtime.db.transaction(read_only=True) as session:
            found = await login_settings(session)
        return {"methods": found.methods, "mfa_required_roles": sorted(found.mfa_required_roles)}

    cached = await runtime.cache.get_or_set(
        LOGIN_SETTINGS_CACHE_KEY,
        read,
        ttl=LOGIN_SETTINGS_CACHE_SECONDS,
        tags=(LOGIN_SETTINGS_TAG,),
        # Read by every sign-in, changed by an admin now and then: a near copy in each
        # process, dropped everywhere on a change, saves a round trip to Redis each time.
        near=True,
    )
    return LoginSettings(
        methods={str(name): bool(on) for name, on in cached["methods"].items()},
        mfa_required_roles=frozenset(str(role) for role in cached["mfa_required_roles"]),
    )


def method_enabled_in(settings: LoginSettings, name: str) -> bool:
    """:func:`login_method_enabled` answered from a :class:`LoginSettings` snapshot."""
    if not is_known_method(name):
        return False
    return settings.methods.get(name, DEFAULT_LOGIN_METHODS.get(name, False))


async def _stored_all(session: AsyncSession) -> dict[str, Any]:
    rows = await session.execute(
        select(IdentitySetting.key, IdentitySetting.value).where(
            IdentitySetting.key.startswith(METHOD_KEY_PREFIX)
            | (IdentitySetting.key == MFA_REQUIRED_ROLES_KEY)
        )
    )
    return {row.key: row.value for row in rows}


async def _put(
    session: AsyncSession, key: str, value: Any, *, now: dt.datetime, by: uuid.UUID | None
) -> None:
    # An upsert, so two first writes of the same setting cannot collide on the key.
    insert = dialect_insert(session)
    statement = insert(IdentitySetting).values(key=key, value=value, updated_at=now, updated_by=by)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=[IdentitySetting.key],
            set_={"value": value, "updated_at": now, "updated_by": by},
        )
    )


def _unknown(values: Iterable[str], valid: Any) -> list[str]:
    return sorted(value for value in values if not valid(value))


async def change_login_settings(
    session: AsyncSession,
    *,
    methods: Mapping[str, bool] | None = None,
    mfa_required_roles: Iterable[str] | None = None,
    now: dt.datetime,
    changed_by: uuid.UUID | None,
) -> LoginSettings:
    """Switch the named ``methods`` on or off (others keep their setting) and, when given,
    replace the roles that require MFA. Raises ``ValueError`` naming unknown methods or
    roles; callers answer it as a validation problem."""
    if methods:
        unknown = _unknown(methods, is_known_method)
        if unknown:
            raise ValueError(f"unknown login methods: {', '.join(unknown)}")
    roles: list[str] | None = None
    if mfa_required_roles is not None:
        roles = sorted(set(mfa_required_roles))
        unknown = _unknown(roles, lambda role: role in Role.__members__)
        if unknown:
            raise ValueError(f"unknown roles: {', '.join(unknown)}")
    for name, enabled in sorted((methods or {}).items()):
        await _put(session, METHOD_KEY_PREFIX + name, bool(enabled), now=now, by=changed_by)
    if roles is not None:
        await _put(session, MFA_REQUIRED_ROLES_KEY, roles, now=now, by=changed_by)
    invalidate_after_commit(session, LOGIN_SETTINGS_TAG)
    return await login_settings(session)
