"""Request and response shapes of ``/api/v1/webhooks``."""

from __future__ import annotations

import datetime as dt
import uuid

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from soko.platform.netguard import URL_MAX_LENGTH
from soko.webhooks.models import (
    DESCRIPTION_MAX_LENGTH,
    EVENT_TYPE_MAX_LENGTH,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)

EventTypes = list[str]


class EndpointIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=URL_MAX_LENGTH)
    event_types: list[str] = Field(min_length=1, max_length=100)
    description: str = Field("", max_length=DESCRIPTION_MAX_LENGTH)


class EndpointPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, min_length=1, max_length=URL_MAX_LENGTH)
    event_types: list[str] | None = Field(None, min_length=1, max_length=100)
    description: str | None = Field(None, max_length=DESCRIPTION_MAX_LENGTH)
    enabled: bool | None = None


class EndpointOut(BaseModel):
    """An endpoint as its owner sees it: never its secret."""

    id: uuid.UUID
    seller_id: uuid.UUID | None
    url: str
    description: str
    event_types: list[str]
    enabled: bool
    disabled_reason: str | None
    disabled_at: dt.datetime | None
    failing_since: dt.datetime | None
    last_success_at: dt.datetime | None
    previous_secret_until: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def of(cls, endpoint: WebhookEndpoint, now: dt.datetime) -> EndpointOut:
        until = endpoint.previous_secret_until
        return cls(
            id=endpoint.id,
            seller_id=endpoint.seller_id,
            url=endpoint.url,
            description=endpoint.description,
            event_types=list(endpoint.event_types),
            enabled=endpoint.enabled,
            disabled_reason=endpoint.disabled_reason,
            disabled_at=endpoint.disabled_at,
            failing_since=endpoint.failing_since,
            last_success_at=endpoint.last_success_at,
            previous_secret_until=until if until is not None and until > now else None,
            created_at=endpoint.created_at,
            updated_at=endpoint.updated_at,
        )


class EndpointWithSecret(EndpointOut):
    """The answer that shows a secret, once: on creation and on rotation."""

    secret: str = Field(description="The signing secret (whsec_...). Shown only this once.")


class DeliveryOut(BaseModel):
    id: uuid.UUID
    event_id: uuid.UUID
    webhook_id: str
    event_type: str = Field(max_length=EVENT_TYPE_MAX_LENGTH)
    status: str
    attempts: int
    next_attempt_at: dt.datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: dt.datetime
    completed_at: dt.datetime | None

    @classmethod
    def of(cls, delivery: WebhookDelivery) -> DeliveryOut:
        pending = delivery.status == "pending"
        return cls(
            id=delivery.id,
            event_id=delivery.event_id,
            webhook_id=f"evt_{delivery.event_id.hex}",
            event_type=delivery.event_type,
            status=delivery.status,
            attempts=delivery.attempts,
            next_attempt_at=delivery.next_attempt_at if pending else None,
            last_status_code=delivery.last_status_code,
            last_error=delivery.last_error,
            created_at=delivery.created_at,
            completed_at=delivery.completed_at,
        )


class AttemptOut(BaseModel):
    """One line of the delivery log."""

    id: uuid.UUID = Field(description="The request id, sent as X-Request-ID")
    delivery_id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    attempt: int
    cause: str
    status_code: int | None
    succeeded: bool
    duration_ms: int
    error: str | None
    response_excerpt: str | None
    at: dt.datetime

    @classmethod
    def of(cls, row: WebhookAttempt) -> AttemptOut:
        return cls(
            id=row.id,
            delivery_id=row.delivery_id,
            event_id=row.event_id,
            event_type=row.event_type,
            attempt=row.attempt,
            cause=row.cause,
            status_code=row.status_code,
            succeeded=row.succeeded,
            duration_ms=row.duration_ms,
            error=row.error,
            response_excerpt=row.response_excerpt,
            at=row.at,
        )


class RedeliverFailedIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: AwareDatetime = Field(description="Failed deliveries of events since this time")


class RedeliverFailedOut(BaseModel):
    requeued: int
    more: bool = Field(description="True when more are left: call again")


class EventTypesOut(BaseModel):
    event_types: EventTypes
