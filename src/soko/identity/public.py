"""What other domains may use of identity: frozen facts, never ORM rows."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from sqlalchemy import and_, bindparam, exists, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity.accounts import (
    create_user,
    email_index,
    email_of,
    normalize_email,
    normalize_phone,
    phone_index,
    phone_of,
    principal_tag,
    user_roles,
)
from soko.identity.audit import record_audit_event, record_request_audit_event
from soko.identity.errors import AccountExists
from soko.identity.models import Role, User, UserRole, UserStatus
from soko.identity.passwords import password_hasher
from soko.identity.permissions import (
    ACCOUNT_SELF,
    CATALOG_MANAGE,
    DISPUTES_RESOLVE,
    IDENTITY_SETTINGS,
    ORDERS_READ_ALL,
    PAYMENTS_MANAGE,
    PAYMENTS_READ_ALL,
    PAYOUTS_MANAGE,
    SELLERS_REVIEW,
    WEBHOOKS_MANAGE,
)
from soko.identity.principals import authenticate
from soko.platform.config import Settings
from soko.platform.errors import ValidationFailed
from soko.platform.runtime import Runtime, invalidate_after_commit

__all__ = [
    "ACCOUNT_SELF",
    "CATALOG_MANAGE",
    "DISPUTES_RESOLVE",
    "IDENTITY_SETTINGS",
    "ORDERS_READ_ALL",
    "PAYMENTS_MANAGE",
    "PAYMENTS_READ_ALL",
    "PAYOUTS_MANAGE",
    "SELLERS_REVIEW",
    "WEBHOOKS_MANAGE",
    "AccountExists",
    "Contact",
    "ContactAddress",
    "UserCard",
    "authenticate",
    "configuration_problems",
    "contact_address",
    "contact_of",
    "contacts_of",
    "create_account",
    "grant_role",
    "has_accounts",
    "is_reachable",
    "reachable_user",
    "record_audit_event",
    "record_request_audit_event",
    "start_password_hashing",
    "user_cards",
    "user_ids_with_role",
    "verified_address_indexes",
]


@dataclass(frozen=True, slots=True)
class UserCard:
    """What another domain may show of a user: never their email or phone."""

    id: uuid.UUID
    display_name: str
    active: bool


def configuration_problems(settings: Settings) -> list[str]:
    """Problems with the identity settings the platform cannot check by itself."""
    from soko.identity.oidc import parse_oidc_providers

    raw = settings.oidc_providers.get_secret_value()
    if not raw.strip():
        return []
    try:
        parse_oidc_providers(raw, allow_http=not settings.is_production)
    except ValueError as exc:
        return [f"SOKO_OIDC_PROVIDERS: {line}" for line in str(exc).splitlines() if line]
    return []


async def start_password_hashing(runtime: Runtime) -> None:
    """Start the runtime's password hashing workers now rather than on the first
    sign-in (the server does at startup); a worker that cannot start raises."""
    await password_hasher(runtime).start()


async def has_accounts(session: AsyncSession) -> bool:
    """Whether anyone has an account yet (a new marketplace has none)."""
    return await session.scalar(select(User.id).limit(1)) is not None


async def user_cards(
    session: AsyncSession, user_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, UserCard]:
    """The cards of the users among ``user_ids`` that exist (one query)."""
    wanted = set(user_ids)
    if not wanted:
        return {}
    rows = await session.execute(
        select(User.id, User.display_name, User.status).where(User.id.in_(wanted))
    )
    return {
        row.id: UserCard(row.id, row.display_name, row.status == UserStatus.active.value)
        for row in rows
    }


@dataclass(frozen=True, slots=True)
class ContactAddress:
    """An email address or phone number in its canonical form, with the blind index
    that finds it among accounts' verified addresses (never the address itself)."""

    kind: Literal["email", "phone"]
    value: str
    index: str


def contact_address(runtime: Runtime, raw: str, *, field: str) -> ContactAddress:
    """``raw`` as an email address or an E.164 phone number; a 422 on ``field``
    otherwise."""
    try:
        if "@" in raw:
            email = normalize_email(raw)
            return ContactAddress("email", email, email_index(runtime.data_keys, email))
        phone = normalize_phone(raw)
        return ContactAddress("phone", phone, phone_index(runtime.data_keys, phone))
    except ValidationFailed:
        raise ValidationFailed.of_field(
            field, "is neither an email address nor a phone number in international form (+...)"
        ) from None


def reachable_user(user_id: Any) -> Any:
    """``EXISTS (an active user with this id and a verified email or phone)``, to embed
    in another domain's statement (``user_id`` a value or the caller's bind parameter),
    so the check costs no statement of its own: a checkout, which holds stock, is only
    for accounts whose owner proved an address or number theirs."""
    return exists(
        select(User.id).where(
            User.id == user_id,
            User.status == UserStatus.active.value,
            or_(
                and_(User.email_index.is_not(None), User.email_verified_at.is_not(None)),
                and_(User.phone_index.is_not(None), User.phone_verified_at.is_not(None)),
            ),
        )
    )


async def is_reachable(session: AsyncSession, user_id: uuid.UUID) -> bool:
    """Whether :func:`reachable_user` holds for ``user_id`` (one query): to tell why a
    statement that embedded it wrote nothing."""
    return bool(await session.scalar(select(reachable_user(user_id))))


async def verified_address_indexes(session: AsyncSession, user_id: uuid.UUID) -> frozenset[str]:
    """The blind indexes of the email address and phone number ``user_id`` has verified
    (:attr:`ContactAddress.index`); none for an account that is not active."""
    row = (
        await session.execute(
            select(
                User.status,
                User.email_index,
                User.email_verified_at,
                User.phone_index,
                User.phone_verified_at,
            ).where(User.id == user_id)
        )
    ).first()
    if row is None or row.status != UserStatus.active.value:
        return frozenset()
    found = set()
    if row.email_index is not None and row.email_verified_at is not None:
        found.add(row.email_index)
    if row.phone_index is not None and row.phone_verified_at is not None:
        found.add(row.phone_index)
    return frozenset(found)


async def grant_role(
    session: AsyncSession,
    runtime: Runtime,
    user_id: uuid.UUID,
    role: str,
    *,
    granted_by: uuid.UUID | None,
) -> bool:
    """Give ``user_id`` the role ``role`` (such as ``seller`` when their store is
    approved) unless they hold it; whether it was added. Their cached authorization is
    dropped once the transaction commits."""
    wanted = Role(role).value
    if wanted in await user_roles(session, user_id):
        return False
    session.add(
        UserRole(
            user_id=user_id, role=wanted, granted_at=runtime.clock.now(), granted_by=granted_by
        )
    )
    await session.flush()
    invalidate_after_commit(session, principal_tag(user_id))
    return True


async def create_account(
    session: AsyncSession,
    runtime: Runtime,
    *,
    email: str | None = None,
    phone: str | None = None,
    password: str | None = None,
    display_name: str = "",
    roles: Iterable[str] = (Role.customer.value,),
) -> uuid.UUID:
    """Create a verified account directly (demo data, operators' scripts), skipping the
    sign-up flow; the password is hashed like any other. Raises :class:`AccountExists`."""
    hashed = await password_hasher(runtime).hash(password) if password else None
    user = await create_user(
        session,
        runtime.data_keys,
        now=runtime.clock.now(),
        email=normalize_email(email) if email else None,
        phone=normalize_phone(phone) if phone else None,
        display_name=display_name,
        password_hash=hashed,
        roles=[Role(role) for role in roles],
        email_verified=bool(email),
        phone_verified=bool(phone),
    )
    return user.id


@dataclass(frozen=True, slots=True)
class Contact:
    """How to reach a user, decrypted: for a payment provider's receipt or a message.
    Only for the user's own business (their payment, their notification); never shown
    to another user."""

    user_id: uuid.UUID
    email: str | None
    phone: str | None
    display_name: str
    # Whether the user proved they receive at that address or number. A message the
    # user did not ask for goes only to a verified one: anyone can sign up with someone
    # else's address, and must not be able to have the marketplace mail them.
    email_verified: bool = False
    phone_verified: bool = False


async def contact_of(session: AsyncSession, runtime: Runtime, user_id: uuid.UUID) -> Contact | None:
    """The active user's email and phone in clear (one query); ``None`` for a user who
    does not exist, was deleted or is blocked."""
    return (await contacts_of(session, runtime, [user_id])).get(user_id)


@lru_cache(maxsize=1)
def _contacts_statement() -> Any:
    """The read behind :func:`contacts_of` (``user_ids``), built once: every
    notification a handler sends runs it."""
    users: Any = User.__table__
    return select(
        users.c.id,
        users.c.email_ciphertext,
        users.c.phone_ciphertext,
        users.c.display_name,
        users.c.email_verified_at,
        users.c.phone_verified_at,
    ).where(
        users.c.id.in_(bindparam("user_ids", expanding=True)),
        users.c.status == UserStatus.active.value,
    )


async def contacts_of(
    session: AsyncSession, runtime: Runtime, user_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, Contact]:
    """:func:`contact_of` for many users in one query: the active ones' contacts by id
    (a user who does not exist, was deleted or is blocked is left out)."""
    wanted = list(dict.fromkeys(user_ids))
    if not wanted:
        return {}
    rows = await session.execute(_contacts_statement(), {"user_ids": wanted})
    return {
        row.id: Contact(
            user_id=row.id,
            email=email_of(runtime.data_keys, row.id, row.email_ciphertext),
            phone=phone_of(runtime.data_keys, row.id, row.phone_ciphertext),
            display_name=row.display_name,
            email_verified=row.email_verified_at is not None,
            phone_verified=row.phone_verified_at is not None,
        )
        for row in rows
    }


async def user_ids_with_role(session: AsyncSession, role: str) -> list[uuid.UUID]:
    """The active users holding ``role`` (e.g. every admin, to tell them something)."""
    rows = await session.scalars(
        select(UserRole.user_id)
        .join(User, User.id == UserRole.user_id)
        .where(UserRole.role == Role(role).value, User.status == UserStatus.active.value)
        .order_by(UserRole.user_id)
    )
    return list(rows)
