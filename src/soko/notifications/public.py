"""What other domains use to send SMS and email.

Both functions only write a delivery job into the caller's transaction (the outbox): the
message leaves once that transaction commits, and never if it rolls back. Delivery is
at least once with one effect (see :class:`soko.notifications.channels.Channel`).

The recipient and the text are encrypted in the job's payload with the runtime's field
encryption keys, which these functions find in ``session.info["data_keys"]``: the
runtime's session factory puts its :class:`~soko.platform.crypto.DataKeys` there, so
request and job sessions alike carry them. A session without them is refused
(:class:`MissingDataKeysError`) rather than written in clear.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession

from soko.notifications.channels import FileSink, read_sink_file
from soko.notifications.deliveries import new_delivery
from soko.notifications.messages import (
    CATEGORY,
    Email,
    Notification,
    NotificationKind,
    Sms,
    seal,
)
from soko.platform.crypto import DataKeys, canonical_email, canonical_phone
from soko.platform.ids import uuid7
from soko.platform.outbox import DEDUPE_KEY_MAX_LENGTH, enqueue, session_now

SESSION_DATA_KEYS = "data_keys"
SMS_BODY_MAX_LENGTH = 1600  # ten concatenated segments; longer texts belong in email
SUBJECT_MAX_LENGTH = 998  # RFC 5322's line limit
EMAIL_BODY_MAX_LENGTH = 1_000_000

__all__ = [
    "SESSION_DATA_KEYS",
    "MissingDataKeysError",
    "read_sink",
    "send_email",
    "send_sms",
]


class MissingDataKeysError(RuntimeError):
    """The session carries no ``DataKeys`` in ``session.info["data_keys"]``, so the
    message could not be encrypted; nothing was written."""


async def send_sms(
    session: AsyncSession,
    *,
    to: str,
    body: str,
    category: str,
    dedupe_key: str | None = None,
    user_id: uuid.UUID | None = None,
) -> bool:
    """Send ``body`` by SMS to ``to`` (E.164, such as ``+254712345678``) once the
    transaction of ``session`` commits.

    ``category`` names the kind of message in lowercase (``identity.sign_in_code``); it
    is stored in clear, as is ``dedupe_key``, which makes a second call with the same
    key a no-op. Neither may hold personal data or the code itself. ``user_id`` names
    the recipient's account on the delivery record, when there is one.

    Returns whether a message was queued (False: the dedupe key was used before). Its
    delivery record (``notifications_deliveries``) is written in the same transaction.
    """
    phone = canonical_phone(to)
    if not body.strip():
        raise ValueError("an SMS needs a body")
    if len(body) > SMS_BODY_MAX_LENGTH:
        raise ValueError(f"an SMS body is at most {SMS_BODY_MAX_LENGTH} characters")
    sms = Sms(
        id=uuid7(),
        created_at=session_now(session),
        category=_checked_category(category),
        to=phone,
        body=body,
    )
    return await _enqueue(session, sms, dedupe_key, user_id)


async def send_email(
    session: AsyncSession,
    *,
    to: str,
    subject: str,
    text: str,
    html: str | None = None,
    category: str,
    dedupe_key: str | None = None,
    user_id: uuid.UUID | None = None,
) -> bool:
    """Send an email to ``to`` once the transaction of ``session`` commits.

    ``text`` is the plain-text body and ``html`` an optional HTML alternative.
    ``category``, ``dedupe_key``, ``user_id`` and the answer are as for :func:`send_sms`.
    """
    address = to.strip()
    canonical_email(address)  # refuses what is not an address
    if any(ch in address for ch in "\r\n<>,;"):
        raise ValueError("not a single email address")
    if not subject.strip() or "\r" in subject or "\n" in subject:
        raise ValueError("an email subject is one non-empty line")
    if len(subject) > SUBJECT_MAX_LENGTH:
        raise ValueError(f"an email subject is at most {SUBJECT_MAX_LENGTH} characters")
    if not text.strip():
        raise ValueError("an email needs a plain-text body")
    if len(text) + len(html or "") > EMAIL_BODY_MAX_LENGTH:
        raise ValueError("the email is too long")
    email = Email(
        id=uuid7(),
        created_at=session_now(session),
        category=_checked_category(category),
        to=address,
        subject=subject,
        text=text,
        html=html,
    )
    return await _enqueue(session, email, dedupe_key, user_id)


def read_sink(data_dir: Path, kind: Literal["sms", "email"]) -> list[dict[str, Any]]:
    """The messages the embedded file sink has written under ``data_dir`` (the
    ``SOKO_DATA_DIR`` setting), oldest first, one dict per message as described in
    :class:`~soko.notifications.channels.FileSink`. For tests and local development."""
    sink = FileSink.in_data_dir(data_dir)
    return read_sink_file(sink.path_for(NotificationKind(kind)))


def _checked_category(category: str) -> str:
    if not CATEGORY.fullmatch(category):
        raise ValueError(
            "a category is 1 to 64 characters from a-z, 0-9, '.', '_' and '-', "
            "starting with a letter"
        )
    return category


async def _enqueue(
    session: AsyncSession,
    notification: Notification,
    dedupe_key: str | None,
    user_id: uuid.UUID | None = None,
) -> bool:
    keys = session.info.get(SESSION_DATA_KEYS)
    if not isinstance(keys, DataKeys):
        raise MissingDataKeysError(
            f'session.info["{SESSION_DATA_KEYS}"] holds no DataKeys: notifications are '
            "encrypted in the outbox with the runtime's keys"
        )
    outbox_key = None
    if dedupe_key is not None:
        outbox_key = f"{notification.kind.job}:{dedupe_key}"
        if not dedupe_key or len(outbox_key) > DEDUPE_KEY_MAX_LENGTH:
            raise ValueError("the dedupe key is empty or too long")
    queued = await enqueue(
        session,
        notification.kind.job,
        seal(notification, keys.keyring),
        dedupe_key=outbox_key,
        now=notification.created_at,
    )
    if queued is None:  # the dedupe key was used before: nothing new to deliver
        return False
    session.add(new_delivery(notification, keys, user_id))
    return True
