"""API keys for server-to-server calls: prefixed, shown once, stored hashed, scoped.

A key reads ``soko_<id>_<secret>``: ``soko_`` says what it is (secret scanners and
:mod:`soko.identity.principals` recognise it), ``<id>`` is 8 random lowercase base32
characters that find the row (``soko_<id>`` is stored as the key's public prefix, shown
in lists so an owner can tell keys apart), and ``<secret>`` is 43 random URL-safe
characters (about 256 bits) that prove possession. Only the SHA-256 of the whole key is
stored. Neither part holds an underscore, so a key always splits into exactly three.

A key holds the permissions it was created with, never more than its owner: the
principal behind a key is the intersection of the key's permissions and the owner's
current ones, so taking a role away from a user takes it away from their keys too.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import string
import uuid
from collections.abc import Iterable

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity.models import ApiKey
from soko.identity.principals import API_KEY_PREFIX
from soko.identity.sessions import hash_secret
from soko.platform.auth import Principal
from soko.platform.errors import Conflict, Forbidden, NotFound, ValidationFailed
from soko.platform.ids import uuid7

ID_LENGTH = 8
SECRET_LENGTH = 43
# URL-safe characters without "_", which separates the parts of a key.
SECRET_ALPHABET = string.ascii_letters + string.digits + "-"
# Enough for every integration a user runs; a cap keeps a stolen session from minting
# keys without bound.
MAX_ACTIVE_KEYS = 50


def new_api_key() -> tuple[str, str]:
    """A fresh key and its public prefix (``soko_<id>``)."""
    key_id = base64.b32encode(secrets.token_bytes(5)).decode("ascii").lower()
    secret = "".join(secrets.choice(SECRET_ALPHABET) for _ in range(SECRET_LENGTH))
    prefix = f"{API_KEY_PREFIX}{key_id}"
    return f"{prefix}_{secret}", prefix


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed.of_field(field, message)


async def create_api_key(
    session: AsyncSession,
    principal: Principal,
    *,
    name: str,
    permissions: Iterable[str],
    expires_at: dt.datetime | None,
    now: dt.datetime,
) -> tuple[ApiKey, str]:
    """Add a key for the caller; the row and the key in clear (to show once).

    The key's permissions must be among the caller's own: a key can narrow what its
    owner may do, never widen it."""
    if principal.api_key_id is not None:
        # A key minting keys would outlive its own expiry and revocation.
        raise Forbidden("API keys are created from a signed-in session, not with a key.")
    wanted = sorted(set(permissions))
    beyond = [permission for permission in wanted if permission not in principal.permissions]
    if beyond:
        raise _invalid("permissions", f"holds permissions you do not have: {', '.join(beyond)}")
    if expires_at is not None and expires_at <= now:
        raise _invalid("expires_at", "must be in the future")
    active = await session.scalar(
        select(func.count())
        .select_from(ApiKey)
        .where(
            ApiKey.user_id == principal.user_id,
            ApiKey.revoked_at.is_(None),
            (ApiKey.expires_at.is_(None)) | (ApiKey.expires_at > now),
        )
    )
    if (active or 0) >= MAX_ACTIVE_KEYS:
        raise Conflict(
            f"You already have {MAX_ACTIVE_KEYS} active API keys: revoke one you no longer use."
        )
    # 40 random bits of prefix rarely collide; when they do, the unique index says so and
    # another draw settles it.
    for _ in range(3):
        key, prefix = new_api_key()
        row = ApiKey(
            id=uuid7(),
            user_id=principal.user_id,
            name=name,
            prefix=prefix,
            key_hash=hash_secret(key),
            permissions=wanted,
            created_at=now,
            last_used_at=None,
            expires_at=expires_at,
            revoked_at=None,
        )
        try:
            async with session.begin_nested():
                session.add(row)
                await session.flush()
        except IntegrityError:
            continue
        return row, key
    raise RuntimeError("could not draw a unique API key prefix")  # pragma: no cover


async def revoke_api_key(
    session: AsyncSession, user_id: uuid.UUID, key_id: uuid.UUID, *, now: dt.datetime
) -> tuple[ApiKey, bool]:
    """Revoke one of ``user_id``'s keys; the key and whether this call revoked it (False
    when it already was). Another user's key answers :class:`NotFound`, like none."""
    key = (
        await session.scalars(select(ApiKey).where(ApiKey.id == key_id, ApiKey.user_id == user_id))
    ).first()
    if key is None:
        raise NotFound("No such API key.")
    changed = await session.execute(
        update(ApiKey)
        .where(ApiKey.id == key.id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )
    revoked = bool(changed.rowcount)  # type: ignore[attr-defined]
    if revoked:
        key.revoked_at = now
    else:
        await session.refresh(key)
    return key, revoked
