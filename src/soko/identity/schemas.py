"""Response and request shapes shared by the identity routes."""

from __future__ import annotations

import datetime as dt
import uuid

from pydantic import BaseModel, ConfigDict, Field

from soko.identity.sessions import TokenPair


class TokenPairOut(BaseModel):
    """A signed-in session's credentials. Keep the refresh token secret: it is shown once."""

    model_config = ConfigDict(frozen=True)

    token_type: str = "Bearer"
    access_token: str
    expires_in: int = Field(description="Seconds until the access token expires")
    refresh_token: str
    refresh_expires_in: int
    session_id: uuid.UUID
    user_id: uuid.UUID

    @classmethod
    def of(cls, pair: TokenPair) -> TokenPairOut:
        return cls(
            token_type=pair.token_type,
            access_token=pair.access_token,
            expires_in=pair.expires_in,
            refresh_token=pair.refresh_token,
            refresh_expires_in=pair.refresh_expires_in,
            session_id=pair.session_id,
            user_id=pair.user_id,
        )


class MfaChallengeOut(BaseModel):
    """Sign-in needs a second factor: complete it at ``POST /api/v1/auth/mfa/verify``, or,
    when ``methods`` is ``["enroll"]`` (the role requires an authenticator the user has not
    set up), enroll at ``/api/v1/auth/mfa/enroll`` and then ``/api/v1/auth/mfa/enroll/confirm``."""

    mfa_required: bool = True
    challenge_token: str
    methods: list[str]
    expires_in: int


class UserOut(BaseModel):
    """An account as its owner sees it (and as admins see it)."""

    id: uuid.UUID
    email: str | None
    email_verified: bool
    phone: str | None
    phone_verified: bool
    display_name: str
    status: str
    roles: list[str]
    mfa_enabled: bool
    created_at: dt.datetime
