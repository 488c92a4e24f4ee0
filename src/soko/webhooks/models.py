"""The webhooks domain's tables: endpoints, one delivery per (event, endpoint), and the
log of every attempt.

An endpoint's signing secrets are never stored in clear: each is an AES-GCM ciphertext
bound to the endpoint's row and column (see :mod:`soko.webhooks.secrets`). An endpoint
with no ``seller_id`` is the marketplace's own.
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
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Mapped, mapped_column

from soko.platform.db import Base, UUIDPrimaryKey
from soko.platform.encrypted import encrypted_column
from soko.platform.ids import uuid7
from soko.platform.netguard import URL_MAX_LENGTH

DESCRIPTION_MAX_LENGTH = 200
EVENT_TYPE_MAX_LENGTH = 100
ERROR_MAX_LENGTH = 500
RESPONSE_EXCERPT_MAX_LENGTH = 1000

JsonType = JSON().with_variant(postgresql.JSONB(), "postgresql")


class DeliveryStatus(StrEnum):
    pending = "pending"  # waiting its turn, or a retry
    succeeded = "succeeded"  # the receiver answered 2xx
    failed = "failed"  # given up: the schedule ran out, or the endpoint was disabled


class AttemptTrigger(StrEnum):
    scheduled = "scheduled"  # the first attempt or a retry of the schedule
    manual = "manual"  # asked for with a redelivery


def _in(column: str, values: type[StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class WebhookEndpoint(UUIDPrimaryKey, Base):
    """A URL that receives the events it subscribed to, signed with its secret."""

    __tablename__ = "webhooks_endpoints"
    __table_args__ = (
        CheckConstraint("version >= 1", name="version_positive"),
        # A store's list, newest first; the marketplace's list has seller_id NULL.
        Index("ix_webhooks_endpoints_seller_id_created_at", "seller_id", "created_at"),
    )

    # NULL: the marketplace's own endpoint, which may receive every event.
    seller_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    url: Mapped[str] = mapped_column(String(URL_MAX_LENGTH))
    description: Mapped[str] = mapped_column(String(DESCRIPTION_MAX_LENGTH), default="")
    event_types: Mapped[list[str]] = mapped_column(JsonType)
    enabled: Mapped[bool] = mapped_column(default=True)
    disabled_reason: Mapped[str | None] = mapped_column(String(200), default=None)
    disabled_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    secret_ciphertext: Mapped[str] = mapped_column(Text)
    # The secret before the last rotation: it keeps signing until previous_secret_until.
    previous_secret_ciphertext: Mapped[str | None] = mapped_column(Text, default=None)
    previous_secret_until: Mapped[dt.datetime | None] = mapped_column(default=None)
    # The first failed attempt since the last success; NULL while the endpoint is healthy.
    failing_since: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_success_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    created_by: Mapped[uuid.UUID]
    created_at: Mapped[dt.datetime]
    updated_at: Mapped[dt.datetime]
    version: Mapped[int] = mapped_column(default=1)

    def __repr__(self) -> str:  # never the secret
        return f"<WebhookEndpoint {self.id} seller={self.seller_id} enabled={self.enabled}>"


class WebhookDelivery(UUIDPrimaryKey, Base):
    """Event ``event_id`` for endpoint ``endpoint_id``: one row, however many attempts.

    Deliveries of one endpoint are sent one at a time in ``queue_key`` order; a manual
    redelivery of a finished delivery gives it a new key (the back of the queue)."""

    __tablename__ = "webhooks_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "event_id"),
        CheckConstraint(_in("status", DeliveryStatus), name="status"),
        CheckConstraint("attempts >= 0 AND retry_step >= 0", name="counts_not_negative"),
        # The head of an endpoint's queue: its oldest pending delivery.
        Index("ix_webhooks_deliveries_endpoint_status_queue", "endpoint_id", "status", "queue_key"),
        # "Redeliver everything that failed since": by endpoint, status and time.
        Index(
            "ix_webhooks_deliveries_endpoint_status_created", "endpoint_id", "status", "created_at"
        ),
        # The retention purge: finished deliveries by the time they finished.
        Index(
            "ix_webhooks_deliveries_completed_at",
            "completed_at",
            postgresql_where=text("completed_at IS NOT NULL"),
            sqlite_where=text("completed_at IS NOT NULL"),
        ),
    )

    endpoint_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhooks_endpoints.id", ondelete="CASCADE")
    )
    event_id: Mapped[uuid.UUID]
    event_type: Mapped[str] = mapped_column(String(EVENT_TYPE_MAX_LENGTH))
    event_created_at: Mapped[dt.datetime]
    # The envelope's ``data`` as this endpoint may see it.
    data: Mapped[dict[str, Any]] = mapped_column(JsonType)
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.pending.value)
    queue_key: Mapped[uuid.UUID] = mapped_column(default=uuid7)
    attempts: Mapped[int] = mapped_column(default=0)
    # How far into the retry schedule the current round is (a redelivery restarts it).
    retry_step: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[dt.datetime]
    last_status_code: Mapped[int | None] = mapped_column(default=None)
    last_error: Mapped[str | None] = mapped_column(String(ERROR_MAX_LENGTH), default=None)
    created_at: Mapped[dt.datetime]
    completed_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class WebhookAttempt(UUIDPrimaryKey, Base):
    """One HTTP request of a delivery, as the endpoint's delivery log shows it. The row's
    id is sent as the request's ``X-Request-ID``."""

    __tablename__ = "webhooks_attempts"
    __table_args__ = (
        CheckConstraint(_in("cause", AttemptTrigger), name="cause"),
        Index("ix_webhooks_attempts_endpoint_id_at", "endpoint_id", "at"),
    )

    delivery_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhooks_deliveries.id", ondelete="CASCADE"), index=True
    )
    endpoint_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhooks_endpoints.id", ondelete="CASCADE")
    )
    event_id: Mapped[uuid.UUID]
    event_type: Mapped[str] = mapped_column(String(EVENT_TYPE_MAX_LENGTH))
    attempt: Mapped[int]
    cause: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None] = mapped_column(default=None)
    succeeded: Mapped[bool]
    duration_ms: Mapped[int]
    error: Mapped[str | None] = mapped_column(String(ERROR_MAX_LENGTH), default=None)
    response_excerpt: Mapped[str | None] = mapped_column(
        String(RESPONSE_EXCERPT_MAX_LENGTH), default=None
    )
    at: Mapped[dt.datetime]


# The signing secrets, encrypted with the data keys (see soko.platform.encrypted). The
# names are the contexts the stored values are bound to, so they stay as they are.
SECRET_COLUMN = encrypted_column(
    "webhooks_endpoints.secret_ciphertext", WebhookEndpoint.id, WebhookEndpoint.secret_ciphertext
)
PREVIOUS_SECRET_COLUMN = encrypted_column(
    "webhooks_endpoints.previous_secret_ciphertext",
    WebhookEndpoint.id,
    WebhookEndpoint.previous_secret_ciphertext,
)
