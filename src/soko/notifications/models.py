"""The notifications domain's tables.

* ``notifications_deliveries``: one row per SMS or email, written with its delivery job
  (same id as the notification) and moved by the job and the providers' reports.
* ``notifications_suppressions``: addresses and numbers that bounced or were reported
  invalid, by blind index only, so nothing is sent to them again.
* ``notifications_inbox``: in-app notifications, per user.
* ``notifications_templates``: an administrator's override of a bundled template.
* ``notifications_preferences``: a user's channels for one category of messages.

No row holds an address or a phone number in clear.
"""

from __future__ import annotations

import datetime as dt
import uuid
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, CheckConstraint, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from soko.platform.db import Base, UUIDPrimaryKey


def _in(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class DeliveryStatus(StrEnum):
    """Where one message is. ``queued`` until a channel took it; ``sent`` when the
    provider accepted it; ``delivered`` when the provider reported it reached the
    handset or mailbox; ``failed`` when Soko gave up (attempts spent, or the provider
    refused for good); ``undeliverable`` when the address or number is invalid, bounced
    or suppressed."""

    queued = "queued"
    sent = "sent"
    delivered = "delivered"
    failed = "failed"
    undeliverable = "undeliverable"


# How far along each status is: a provider's report never moves a delivery backwards
# (a late "sent" after "delivered"), and a final status never changes.
STATUS_RANK: dict[DeliveryStatus, int] = {
    DeliveryStatus.queued: 0,
    DeliveryStatus.sent: 1,
    DeliveryStatus.delivered: 2,
    DeliveryStatus.failed: 3,
    DeliveryStatus.undeliverable: 3,
}

PROVIDER_MESSAGE_ID_MAX_LENGTH = 200
LAST_ERROR_MAX_LENGTH = 1000


class Delivery(Base):
    __tablename__ = "notifications_deliveries"
    __table_args__ = (
        CheckConstraint(_in("status", DeliveryStatus), name="status"),
        CheckConstraint("kind IN ('sms', 'email')", name="kind"),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        # Provider reports find their delivery by the provider's id.
        Index("ix_notifications_deliveries_provider_message", "provider", "provider_message_id"),
        Index("ix_notifications_deliveries_status_created", "status", "created_at"),
    )

    # The notification's id: the same as in the sink, the job payload and the provider.
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))
    category: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(8))
    provider: Mapped[str | None] = mapped_column(String(32), default=None)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.queued.value)
    provider_message_id: Mapped[str | None] = mapped_column(
        String(PROVIDER_MESSAGE_ID_MAX_LENGTH), default=None
    )
    # The blind index of the canonical recipient, to suppress it on a bounce report.
    recipient_index: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[uuid.UUID | None] = mapped_column(default=None, index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    sent_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(default=None)

    def __repr__(self) -> str:
        return f"<Delivery {self.id} {self.kind} {self.provider} {self.status}>"


class Suppression(UUIDPrimaryKey, Base):
    __tablename__ = "notifications_suppressions"
    __table_args__ = (UniqueConstraint("kind", "address_index"),)

    kind: Mapped[str] = mapped_column(String(8))
    address_index: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[dt.datetime]


class InboxNotification(UUIDPrimaryKey, Base):
    __tablename__ = "notifications_inbox"
    __table_args__ = (
        # The user's list, newest first, and their unread count.
        Index("ix_notifications_inbox_user_id_id", "user_id", "id"),
        Index("ix_notifications_inbox_user_unread", "user_id", "read_at"),
        UniqueConstraint("user_id", "dedupe_key"),
    )

    user_id: Mapped[uuid.UUID]
    category: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    link: Mapped[str | None] = mapped_column(String(500), default=None)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # A trigger's event id and template: one entry per event for each user, whatever
    # the number of deliveries of the event.
    dedupe_key: Mapped[str | None] = mapped_column(String(300), default=None)
    created_at: Mapped[dt.datetime]
    read_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class TemplateOverride(Base):
    __tablename__ = "notifications_templates"

    # ``<template name>:<locale>``, such as ``order.paid.buyer:sw``.
    key: Mapped[str] = mapped_column(String(120), primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(default=1)
    updated_at: Mapped[dt.datetime]
    updated_by: Mapped[uuid.UUID | None] = mapped_column(default=None)


class Preference(UUIDPrimaryKey, Base):
    __tablename__ = "notifications_preferences"
    __table_args__ = (UniqueConstraint("user_id", "category"),)

    user_id: Mapped[uuid.UUID]
    category: Mapped[str] = mapped_column(String(32))
    email: Mapped[bool] = mapped_column(default=True)
    sms: Mapped[bool] = mapped_column(default=True)
    in_app: Mapped[bool] = mapped_column(default=True)
    updated_at: Mapped[dt.datetime]


class RecipientLocale(Base):
    """The language a user reads their messages in (``en``, ``sw``); without a row,
    ``SOKO_NOTIFICATIONS_DEFAULT_LOCALE``."""

    __tablename__ = "notifications_locales"

    user_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    locale: Mapped[str] = mapped_column(String(8))
    updated_at: Mapped[dt.datetime]
