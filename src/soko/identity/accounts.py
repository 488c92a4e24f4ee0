"""Accounts: creating and finding users by email or phone without storing either in clear.

Each email or phone is encrypted bound to its row and column and indexed by an HMAC blind
index of its canonical form, so an exact lookup works and a database dump reveals
neither.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
import uuid
from collections.abc import Iterable

import phonenumbers
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity.errors import AccountExists
from soko.identity.models import EMAIL_COLUMN, PHONE_COLUMN, Role, User, UserRole, UserStatus
from soko.platform.crypto import DataKeys, canonical_email, canonical_phone
from soko.platform.errors import ValidationFailed
from soko.platform.ids import uuid7

MAX_EMAIL_LENGTH = 254


def normalize_email(raw: str) -> str:
    """The canonical email, or a validation problem naming the field.

    Only what a mail system delivers and a person can tell apart is accepted: a
    dot-atom local part (RFC 5322 ``atext``, and letters, marks and digits of any
    script, RFC 6531) and a domain of host-name labels. Quoted local parts, address
    literals (``[127.0.0.1]``), control and invisible characters (a zero-width space
    made a second account for the same mailbox), compatibility forms (a full-width
    letter a, U+FF41, for ``a``) and parts that mix scripts (a Cyrillic a, U+0430, among Latin
    letters, which passes for another address; see :func:`_one_script`) are refused."""
    value = raw.strip()
    local, at, domain = value.rpartition("@")
    if (
        not at
        or len(value) > MAX_EMAIL_LENGTH
        or not _is_local_part(local)
        or not _is_domain(domain)
        or unicodedata.normalize("NFKC", value) != unicodedata.normalize("NFC", value)
        or not all(_one_script(part) for part in (*local.split("."), *domain.split(".")))
    ):
        raise _field_error("email", "is not a valid email address")
    return canonical_email(value)


# RFC 5322 atext, the characters of a dot-atom besides letters and digits.
_ATEXT_SYMBOLS = frozenset("!#$%&'*+-/=?^_`{|}~")
_MAX_LOCAL_PART = 64  # RFC 5321 section 4.5.3.1.1
_MAX_LABEL = 63


def _is_word_character(character: str) -> bool:
    if character.isascii():
        return character.isalnum()
    # Letters, combining marks and digits of any script; no symbols, spaces, controls
    # or format characters (zero-width joiners, direction marks).
    return unicodedata.category(character)[0] in "LMN"


# Scripts that are written together, after Unicode's "highly restrictive" profile (UTS
# #39 section 5.2): Latin with Han and Japanese kana, with Han and Bopomofo, or with Han
# and Hangul. Any other mix within one part of an address is refused. Scripts are told
# by the first word of a letter's Unicode name ("LATIN SMALL LETTER A", "CYRILLIC SMALL
# LETTER A", "CJK UNIFIED IDEOGRAPH-4E00"), which names its script for every letter an
# address can hold; digits and marks belong to any script.
_SCRIPTS_WRITTEN_TOGETHER = (
    frozenset({"LATIN", "CJK", "HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA"}),
    frozenset({"LATIN", "CJK", "BOPOMOFO"}),
    frozenset({"LATIN", "CJK", "HANGUL"}),
)


def _one_script(part: str) -> bool:
    """Whether the letters of ``part`` (a dot-separated piece of an address) are of one
    script, or of scripts that are written together. ASCII letters are Latin."""
    scripts = {
        "LATIN" if c.isascii() else unicodedata.name(c, "UNKNOWN").split(" ", 1)[0]
        for c in part
        if c.isalpha()
    }
    return len(scripts) <= 1 or any(scripts <= together for together in _SCRIPTS_WRITTEN_TOGETHER)


def _is_local_part(local: str) -> bool:
    if not 1 <= len(local) <= _MAX_LOCAL_PART or local.startswith(".") or local.endswith("."):
        return False
    if ".." in local:
        return False
    return all(c == "." or c in _ATEXT_SYMBOLS or _is_word_character(c) for c in local)


def _is_domain(domain: str) -> bool:
    labels = domain.split(".")
    if len(labels) < 2 or len(domain) > 253:
        return False
    for label in labels:
        if not 1 <= len(label) <= _MAX_LABEL or label.startswith("-") or label.endswith("-"):
            return False
        if not all(c == "-" or _is_word_character(c) for c in label):
            return False
    # A top-level domain is never all digits: "10.0.0.1" is an address, not a domain.
    return not labels[-1].isdigit()


# An account's phone number receives its sign-in codes and messages by SMS. Numbers of
# these kinds cannot, or cost whoever texts them (premium-rate numbers are how SMS
# pumping makes its money), so no account, code or invitation is sent to one.
_NO_TEXT_MESSAGES = frozenset(
    {
        phonenumbers.PhoneNumberType.FIXED_LINE,
        phonenumbers.PhoneNumberType.PREMIUM_RATE,
        phonenumbers.PhoneNumberType.SHARED_COST,
        phonenumbers.PhoneNumberType.TOLL_FREE,
        phonenumbers.PhoneNumberType.UAN,
        phonenumbers.PhoneNumberType.VOICEMAIL,
        phonenumbers.PhoneNumberType.PAGER,
    }
)
# Numbers of no country (+881 satellite phones, +882/+883 international networks): the
# costliest destinations a text can have.
_NON_GEOGRAPHIC = "001"


def normalize_phone(raw: str, default_region: str | None = None) -> str:
    """The number in E.164 (``+254712345678``), or a validation problem naming the field.

    Numbers without a ``+`` need ``default_region`` (an ISO 3166 code such as ``KE``).
    Only numbers that can take text messages are accepted: mobile numbers, and those a
    country does not tell apart from landlines (``+1``), personal and VoIP numbers."""
    try:
        number = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException:
        raise _field_error("phone", "is not a phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise _field_error("phone", "is not a valid phone number")
    if (
        phonenumbers.number_type(number) in _NO_TEXT_MESSAGES
        or phonenumbers.region_code_for_number(number) == _NON_GEOGRAPHIC
    ):
        raise _field_error(
            "phone",
            "cannot take text messages here: use a mobile number, not a landline, "
            "premium-rate, toll-free, shared-cost, pager or satellite number",
        )
    return canonical_phone(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def _field_error(field: str, message: str) -> ValidationFailed:
    return ValidationFailed.of_field(field, message)


def email_index(keys: DataKeys, canonical: str) -> str:
    return keys.blind_index.compute(EMAIL_COLUMN, canonical)


def phone_index(keys: DataKeys, e164: str) -> str:
    return keys.blind_index.compute(PHONE_COLUMN, e164)


def _context(column: str, user_id: uuid.UUID) -> str:
    return f"{column}:{user_id}"


def set_email(keys: DataKeys, user: User, canonical: str | None) -> None:
    if canonical is None:
        user.email_ciphertext = user.email_index = None
        return
    user.email_ciphertext = keys.keyring.encrypt(canonical, context=_context(EMAIL_COLUMN, user.id))
    user.email_index = email_index(keys, canonical)


def set_phone(keys: DataKeys, user: User, e164: str | None) -> None:
    if e164 is None:
        user.phone_ciphertext = user.phone_index = None
        return
    user.phone_ciphertext = keys.keyring.encrypt(e164, context=_context(PHONE_COLUMN, user.id))
    user.phone_index = phone_index(keys, e164)


def user_email(keys: DataKeys, user: User) -> str | None:
    return email_of(keys, user.id, user.email_ciphertext)


def user_phone(keys: DataKeys, user: User) -> str | None:
    return phone_of(keys, user.id, user.phone_ciphertext)


def email_of(keys: DataKeys, user_id: uuid.UUID, ciphertext: str | None) -> str | None:
    """The email in ``ciphertext``, the ``users.email_ciphertext`` of ``user_id`` read as
    a plain column (no ``User`` loaded)."""
    if ciphertext is None:
        return None
    return keys.keyring.decrypt(ciphertext, context=_context(EMAIL_COLUMN, user_id))


def phone_of(keys: DataKeys, user_id: uuid.UUID, ciphertext: str | None) -> str | None:
    """The phone number in ``ciphertext``, like :func:`email_of`."""
    if ciphertext is None:
        return None
    return keys.keyring.decrypt(ciphertext, context=_context(PHONE_COLUMN, user_id))


async def find_user_by_email(session: AsyncSession, keys: DataKeys, canonical: str) -> User | None:
    result = await session.scalars(
        select(User).where(User.email_index == email_index(keys, canonical))
    )
    return result.first()


async def find_user_by_phone(session: AsyncSession, keys: DataKeys, e164: str) -> User | None:
    result = await session.scalars(select(User).where(User.phone_index == phone_index(keys, e164)))
    return result.first()


async def get_user(session: AsyncSession, user_id: uuid.UUID) -> User | None:
    return await session.get(User, user_id)


async def create_user(
    session: AsyncSession,
    keys: DataKeys,
    *,
    now: dt.datetime,
    email: str | None = None,
    phone: str | None = None,
    display_name: str = "",
    password_hash: str | None = None,
    roles: Iterable[Role | str] = (Role.customer,),
    email_verified: bool = False,
    phone_verified: bool = False,
    granted_by: uuid.UUID | None = None,
) -> User:
    """Add a user with canonical ``email``/``phone`` (already normalized).

    A second account for the same email or phone is refused by the unique blind indexes,
    even when two registrations race: the loser gets :class:`AccountExists`."""
    user = User(
        id=uuid7(),
        display_name=display_name,
        status=UserStatus.active.value,
        password_hash=password_hash,
        password_changed_at=now if password_hash else None,
        created_at=now,
        updated_at=now,
        email_verified_at=now if email and email_verified else None,
        phone_verified_at=now if phone and phone_verified else None,
    )
    set_email(keys, user, email)
    set_phone(keys, user, phone)
    try:
        async with session.begin_nested():
            session.add(user)
            await session.flush()
            for role in set(roles):
                session.add(
                    UserRole(
                        user_id=user.id,
                        role=Role(role).value,
                        granted_at=now,
                        granted_by=granted_by,
                    )
                )
            await session.flush()
    except IntegrityError:
        raise AccountExists("An account already uses this email or phone number.") from None
    return user


async def user_roles(session: AsyncSession, user_id: uuid.UUID) -> frozenset[str]:
    rows = await session.scalars(select(UserRole.role).where(UserRole.user_id == user_id))
    return frozenset(rows.all())


async def replace_roles(
    session: AsyncSession,
    user_id: uuid.UUID,
    roles: Iterable[Role | str],
    *,
    now: dt.datetime,
    granted_by: uuid.UUID | None,
) -> frozenset[str]:
    wanted = {Role(role).value for role in roles}
    await session.execute(delete(UserRole).where(UserRole.user_id == user_id))
    for role in sorted(wanted):
        session.add(UserRole(user_id=user_id, role=role, granted_at=now, granted_by=granted_by))
    await session.flush()
    return frozenset(wanted)


def principal_tag(user_id: uuid.UUID) -> str:
    """The cache tag of everything cached about a user's authorization."""
    return f"identity:user:{user_id}"
