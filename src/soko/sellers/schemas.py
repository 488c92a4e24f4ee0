"""Request and response shapes of the sellers domain."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Annotated, Literal

import phonenumbers
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from soko.sellers.models import SLUG_MAX_LENGTH, STORE_NAME_MAX_LENGTH, SellerRole, SellerStatus

SLUG_MIN_LENGTH = 3
# Lower-case letters, digits and hyphens, starting and ending with a letter or digit: a
# slug is a storefront's address and must read well in a URL.
SLUG_PATTERN = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
PAYOUT_DETAILS_MAX_KEYS = 20
PAYOUT_VALUE_MAX_LENGTH = 200
_EMAIL_MAX_LENGTH = 254


def is_slug(text: str) -> bool:
    return SLUG_MIN_LENGTH <= len(text) <= SLUG_MAX_LENGTH and bool(SLUG_PATTERN.fullmatch(text))


def _slug(value: str) -> str:
    value = value.strip().lower()
    if not is_slug(value):
        raise ValueError(
            f"must be {SLUG_MIN_LENGTH} to {SLUG_MAX_LENGTH} characters from a-z, 0-9 and "
            "'-', starting and ending with a letter or digit"
        )
    # The product list's seller filter reads a UUID-shaped value as a store id, so a
    # slug shaped like one could never be filtered on (nor pose as another store's id).
    try:
        uuid.UUID(value)
    except ValueError:
        return value
    raise ValueError("must not look like a store id (a UUID)")


def _contact_email(value: str) -> str:
    value = value.strip()
    local, at, domain = value.rpartition("@")
    if (
        not at
        or not local
        or "." not in domain.strip(".")
        or len(value) > _EMAIL_MAX_LENGTH
        or any(ch.isspace() for ch in value)
    ):
        raise ValueError("is not a valid email address")
    return local + "@" + domain.lower()


def _contact_phone(value: str) -> str:
    try:
        number = phonenumbers.parse(value.strip(), None)
    except phonenumbers.NumberParseException:
        raise ValueError("is not a phone number in international form (+254...)") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("is not a valid phone number")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _payout_details(value: dict[str, str]) -> dict[str, str]:
    for key, item in value.items():
        if not 1 <= len(key) <= 64 or len(item) > PAYOUT_VALUE_MAX_LENGTH:
            raise ValueError(
                f"keys must be 1 to 64 characters and values at most {PAYOUT_VALUE_MAX_LENGTH}"
            )
    return value


Slug = Annotated[str, AfterValidator(_slug)]
StoreName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=STORE_NAME_MAX_LENGTH),
]
Description = Annotated[str, StringConstraints(strip_whitespace=True, max_length=5000)]
ContactEmail = Annotated[str, AfterValidator(_contact_email)]
ContactPhone = Annotated[str, AfterValidator(_contact_phone)]
PayoutDetails = Annotated[
    dict[str, str],
    Field(
        max_length=PAYOUT_DETAILS_MAX_KEYS,
        description="Where the store is paid (a placeholder until payments: for example "
        '{"method": "mpesa", "till": "123456"}). Stored encrypted; only owners read it.',
    ),
    AfterValidator(_payout_details),
]
Reason = Annotated[str, StringConstraints(strip_whitespace=True, max_length=500)]


class SellerApplication(BaseModel):
    """An application for a store; the applicant becomes its owner."""

    model_config = ConfigDict(extra="forbid")

    slug: Slug = Field(description="The storefront's address: /api/v1/sellers/{slug}")
    store_name: StoreName
    description: Description = ""
    contact_email: ContactEmail | None = None
    contact_phone: ContactPhone | None = Field(default=None, description="E.164, e.g. +254...")
    payout_details: PayoutDetails | None = None


class ProfileChange(BaseModel):
    """What to change in the store's profile; fields left out keep their value."""

    model_config = ConfigDict(extra="forbid")

    store_name: StoreName | None = None
    description: Description | None = None
    contact_email: ContactEmail | None = None
    contact_phone: ContactPhone | None = None
    payout_details: PayoutDetails | None = Field(
        default=None, description="Owners only; replaces the stored details"
    )


class ReviewDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Reason = Field(default="", description="Shown to the store's members")


class ReasonedDecision(BaseModel):
    """A decision that must say why (reject, suspend)."""

    model_config = ConfigDict(extra="forbid")

    reason: Annotated[Reason, StringConstraints(min_length=1)] = Field(
        description="Shown to the store's members"
    )


class InvitationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: Annotated[str, StringConstraints(strip_whitespace=True, min_length=3)] = Field(
        max_length=254,
        description="The email address or phone number (E.164, +...) to send the invitation to",
    )
    role: SellerRole = SellerRole.staff


InvitationStatusOut = Literal["pending", "accepted", "declined", "revoked", "expired"]


class InvitationOut(BaseModel):
    """An invitation as the store's owners see it."""

    id: uuid.UUID
    address: str
    address_kind: Literal["email", "phone"]
    role: SellerRole
    status: InvitationStatusOut = Field(
        description="`expired`: still pending when its time ran out"
    )
    invited_by: uuid.UUID
    created_at: dt.datetime
    expires_at: dt.datetime
    decided_at: dt.datetime | None = Field(description="When it was accepted, declined or revoked")


class MyInvitationOut(BaseModel):
    """An open invitation to one of the caller's verified addresses."""

    id: uuid.UUID
    seller_id: uuid.UUID
    slug: str
    store_name: str
    role: SellerRole
    invited_by_name: str
    created_at: dt.datetime
    expires_at: dt.datetime


class MemberChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: SellerRole


class StorefrontOut(BaseModel):
    """A store as anyone sees it."""

    id: uuid.UUID
    slug: str
    store_name: str
    description: str
    created_at: dt.datetime


class SellerOut(BaseModel):
    """A store as its members see it."""

    id: uuid.UUID
    slug: str
    store_name: str
    description: str
    contact_email: str | None
    contact_phone: str | None
    status: SellerStatus
    status_reason: str = Field(description="Why the store was last rejected or suspended")
    has_payout_details: bool
    payout_details: dict[str, str] | None = Field(default=None, description="Shown to owners only")
    created_at: dt.datetime
    updated_at: dt.datetime
    reviewed_at: dt.datetime | None
    version: int = Field(description="Bumped on every change; the ETag names it")


class MyStoreOut(BaseModel):
    """A store the caller belongs to."""

    id: uuid.UUID
    slug: str
    store_name: str
    status: SellerStatus
    role: SellerRole
    added_at: dt.datetime


class MemberOut(BaseModel):
    user_id: uuid.UUID
    display_name: str
    role: SellerRole
    added_at: dt.datetime
    added_by: uuid.UUID | None


class StatusEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    from_status: SellerStatus | None
    to_status: SellerStatus
    actor_id: uuid.UUID | None
    reason: str
    at: dt.datetime


class AdminSellerOut(BaseModel):
    """A store as a reviewer sees it in a list."""

    id: uuid.UUID
    slug: str
    store_name: str
    description: str
    contact_email: str | None
    contact_phone: str | None
    status: SellerStatus
    status_reason: str
    has_payout_details: bool
    created_by: uuid.UUID
    created_at: dt.datetime
    updated_at: dt.datetime
    reviewed_at: dt.datetime | None
    reviewed_by: uuid.UUID | None
    version: int


class AdminSellerDetail(AdminSellerOut):
    """One store with its members and the history of decisions about it."""

    members: list[MemberOut]
    history: list[StatusEventOut]
