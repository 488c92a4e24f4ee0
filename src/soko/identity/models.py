"""The identity domain's tables.

Emails and phone numbers are never stored in clear: each is an AES-GCM ciphertext bound
to its row and column (``*_ciphertext``) plus an HMAC blind index (``*_index``) for exact
lookup. Secrets (passwords, refresh tokens, codes, API keys) are stored only as hashes.
"""

from __future__ import annotations

import datetime as dt
import uuid
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from soko.platform.db import Base, UUIDPrimaryKey
from soko.platform.encrypted import encrypted_column


class UserStatus(StrEnum):
    active = "active"
    blocked = "blocked"
    deleted = "deleted"


class Role(StrEnum):
    customer = "customer"
    seller = "seller"
    provider = "provider"  # a service provider: tutor, trainer, doula
    operator = "operator"  # runs zones or a franchise
    support = "support"
    admin = "admin"


class User(UUIDPrimaryKey, Base):
    __tablename__ = "users"

    email_ciphertext: Mapped[str | None] = mapped_column(Text)
    email_index: Mapped[str | None] = mapped_column(String(64), unique=True)
    email_verified_at: Mapped[dt.datetime | None]
    phone_ciphertext: Mapped[str | None] = mapped_column(Text)
    phone_index: Mapped[str | None] = mapped_column(String(64), unique=True)
    phone_verified_at: Mapped[dt.datetime | None]
    display_name: Mapped[str] = mapped_column(String(120), default="")
    status: Mapped[str] = mapped_column(String(16), default=UserStatus.active.value)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    password_changed_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    deleted_at: Mapped[dt.datetime | None]
    # Bumped on every change an ETag or a cached principal must notice.
    version: Mapped[int] = mapped_column(Integer, default=1)


class UserRole(Base):
    __tablename__ = "user_roles"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    role: Mapped[str] = mapped_column(String(32), primary_key=True)
    granted_at: Mapped[dt.datetime]
    granted_by: Mapped[uuid.UUID | None]


class AuthSession(UUIDPrimaryKey, Base):
    """One sign-in on one device; refresh tokens rotate within it."""

    __tablename__ = "auth_sessions"
    __table_args__ = (
        # For the retention purge (soko.identity.retention): ended sessions by time.
        Index("ix_auth_sessions_expires_at", "expires_at"),
        Index(
            "ix_auth_sessions_revoked_at",
            "revoked_at",
            postgresql_where=text("revoked_at IS NOT NULL"),
            sqlite_where=text("revoked_at IS NOT NULL"),
        ),
    )

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    device_name: Mapped[str] = mapped_column(String(200), default="")
    user_agent: Mapped[str] = mapped_column(String(500), default="")
    ip: Mapped[str] = mapped_column(String(64), default="")
    method: Mapped[str] = mapped_column(String(32))  # password, sms, oidc:google, ...
    mfa_verified: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[dt.datetime]
    last_seen_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    revoked_at: Mapped[dt.datetime | None]
    revoked_reason: Mapped[str | None] = mapped_column(String(64))


class RefreshTokenState(StrEnum):
    active = "active"
    rotated = "rotated"
    revoked = "revoked"


class RefreshToken(UUIDPrimaryKey, Base):
    """One link of a session's refresh-token chain (its family), stored hashed."""

    __tablename__ = "refresh_tokens"

    session_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("auth_sessions.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    parent_id: Mapped[uuid.UUID | None]
    state: Mapped[str] = mapped_column(String(16), default=RefreshTokenState.active.value)
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    rotated_at: Mapped[dt.datetime | None]


class VerificationPurpose(StrEnum):
    email_verification = "email_verification"
    password_reset = "password_reset"


class VerificationToken(UUIDPrimaryKey, Base):
    """A single-use link token (email verification, password reset), stored hashed."""

    __tablename__ = "verification_tokens"
    __table_args__ = (Index("ix_verification_tokens_expires_at", "expires_at"),)

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    purpose: Mapped[str] = mapped_column(String(32))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    used_at: Mapped[dt.datetime | None]


class OneTimeCode(UUIDPrimaryKey, Base):
    """An SMS code for one phone and one purpose; at most N guesses, single use."""

    __tablename__ = "one_time_codes"
    __table_args__ = (
        Index("ix_one_time_codes_phone_created", "phone_index", "created_at"),
        Index("ix_one_time_codes_expires_at", "expires_at"),
    )

    phone_index: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(32))
    code_hash: Mapped[str] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    ip: Mapped[str] = mapped_column(String(64), default="", index=True)
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    consumed_at: Mapped[dt.datetime | None]


class LoginThrottle(Base):
    """Consecutive sign-in failures for one key (an account or an IP) and how long the
    next attempt must wait. Never a permanent lockout: the wait is capped."""

    __tablename__ = "login_throttles"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    blocked_until: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime]


class TotpFactor(Base):
    __tablename__ = "totp_factors"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    secret_ciphertext: Mapped[str] = mapped_column(Text)
    confirmed_at: Mapped[dt.datetime | None]
    last_used_step: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[dt.datetime]


class RecoveryCode(UUIDPrimaryKey, Base):
    __tablename__ = "recovery_codes"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    code_hash: Mapped[str] = mapped_column(String(64))
    used_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime]


class MfaChallenge(UUIDPrimaryKey, Base):
    """A half-finished sign-in waiting for its second factor."""

    __tablename__ = "mfa_challenges"
    __table_args__ = (Index("ix_mfa_challenges_expires_at", "expires_at"),)

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    method: Mapped[str] = mapped_column(String(32))
    device_name: Mapped[str] = mapped_column(String(200), default="")
    user_agent: Mapped[str] = mapped_column(String(500), default="")
    ip: Mapped[str] = mapped_column(String(64), default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    used_at: Mapped[dt.datetime | None]


class ApiKey(UUIDPrimaryKey, Base):
    __tablename__ = "api_keys"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    permissions: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime]
    last_used_at: Mapped[dt.datetime | None]
    expires_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]


class ExternalIdentity(UUIDPrimaryKey, Base):
    """A link from an OpenID Connect provider's subject to a Soko user."""

    __tablename__ = "external_identities"
    __table_args__ = (UniqueConstraint("provider", "subject"),)

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    provider: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime]
    last_used_at: Mapped[dt.datetime | None]


class IdentitySetting(Base):
    """Runtime settings an admin changes without a restart (login methods, MFA rules)."""

    __tablename__ = "identity_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON)
    updated_at: Mapped[dt.datetime]
    updated_by: Mapped[uuid.UUID | None]


class AuditEvent(Base):
    """An append-only, hash-chained record of a security or admin event.

    ``seq`` orders the chain; ``hash`` covers the event's canonical form and the previous
    event's hash, so editing, deleting or reordering any event breaks verification."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    id: Mapped[uuid.UUID] = mapped_column(unique=True)
    occurred_at: Mapped[dt.datetime]
    action: Mapped[str] = mapped_column(String(64), index=True)
    actor_id: Mapped[uuid.UUID | None] = mapped_column(index=True)
    target_type: Mapped[str | None] = mapped_column(String(32))
    target_id: Mapped[str | None] = mapped_column(String(64), index=True)
    ip: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(128))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditChainHead(Base):
    """The audit chain's last event (its ``seq``, ``prev_hash`` and ``hash``), one row,
    kept by PostgreSQL's appends: each append updates it and inserts the event in one
    statement, and the row's lock, held until commit, serializes appends (see
    ``soko.identity.audit``). SQLite never writes it: there a writing transaction
    already holds the database's one write lock, and an append reads the last event."""

    __tablename__ = "audit_chain_head"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(Integer)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


# The columns encrypted with the data keys (see soko.platform.encrypted): key rotation
# re-encrypts them. The names are the contexts each value is bound to.
EMAIL_COLUMN = encrypted_column("users.email", User.id, User.email_ciphertext)
PHONE_COLUMN = encrypted_column("users.phone", User.id, User.phone_ciphertext)
TOTP_SECRET_COLUMN = encrypted_column(
    "totp_factors.secret", TotpFactor.user_id, TotpFactor.secret_ciphertext
)
