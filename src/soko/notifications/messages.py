"""The notifications Soko sends, and how they cross the outbox sealed.

The outbox stores job payloads in clear, and a notification's recipient and text are
personal data (a phone number, an email address, a sign-in code). So the payload of a
delivery job carries only what an operator may see (the notification id, its category
and creation time) in clear; the recipient and the text travel as one field-encryption
ciphertext (:class:`soko.platform.crypto.Keyring`) bound to ``outbox:<job>:<id>``, so a
sealed value copied into another message does not open.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from soko.platform.crypto import Keyring

SMS_JOB = "notifications.deliver_sms"
EMAIL_JOB = "notifications.deliver_email"

PAYLOAD_VERSION = 1
CATEGORY = re.compile(r"[a-z][a-z0-9_.-]{0,63}")


class NotificationKind(StrEnum):
    sms = "sms"
    email = "email"

    @property
    def job(self) -> str:
        return SMS_JOB if self is NotificationKind.sms else EMAIL_JOB


@dataclass(frozen=True)
class Sms:
    """A text message to a phone number in E.164."""

    id: uuid.UUID
    created_at: dt.datetime
    category: str
    to: str
    body: str

    kind = NotificationKind.sms


@dataclass(frozen=True)
class Email:
    """An email with a plain-text body and, optionally, an HTML alternative."""

    id: uuid.UUID
    created_at: dt.datetime
    category: str
    to: str
    subject: str
    text: str
    html: str | None = None

    kind = NotificationKind.email


Notification = Sms | Email


def sealing_context(kind: NotificationKind, notification_id: uuid.UUID) -> str:
    return f"outbox:{kind.job}:{notification_id}"


def _private_fields(notification: Notification) -> dict[str, Any]:
    if isinstance(notification, Sms):
        return {"to": notification.to, "body": notification.body}
    return {
        "to": notification.to,
        "subject": notification.subject,
        "text": notification.text,
        "html": notification.html,
    }


def seal(notification: Notification, keyring: Keyring) -> dict[str, Any]:
    """The job payload for ``notification``: recipient and text encrypted."""
    private = json.dumps(_private_fields(notification), ensure_ascii=False)
    return {
        "v": PAYLOAD_VERSION,
        "notification_id": str(notification.id),
        "category": notification.category,
        "created_at": notification.created_at.isoformat(),
        "sealed": keyring.encrypt(
            private, context=sealing_context(notification.kind, notification.id)
        ),
    }


def unseal(kind: NotificationKind, payload: dict[str, Any], keyring: Keyring) -> Notification:
    """The notification a job payload made by :func:`seal` carries.

    Raises :class:`soko.platform.crypto.DecryptionError` when the sealed part was made
    for another message or under a key the keyring no longer holds, and ``ValueError``
    for a payload of an unknown shape; neither message quotes the payload.
    """
    if payload.get("v") != PAYLOAD_VERSION:
        raise ValueError("the notification payload has an unknown version")
    try:
        notification_id = uuid.UUID(str(payload["notification_id"]))
        created_at = dt.datetime.fromisoformat(str(payload["created_at"]))
        category = str(payload["category"])
        sealed = str(payload["sealed"])
    except (KeyError, ValueError):
        raise ValueError("the notification payload is malformed") from None
    private = json.loads(keyring.decrypt(sealed, context=sealing_context(kind, notification_id)))
    if kind is NotificationKind.sms:
        return Sms(
            id=notification_id,
            created_at=created_at,
            category=category,
            to=private["to"],
            body=private["body"],
        )
    return Email(
        id=notification_id,
        created_at=created_at,
        category=category,
        to=private["to"],
        subject=private["subject"],
        text=private["text"],
        html=private.get("html"),
    )
