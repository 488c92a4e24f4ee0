"""Request and response shapes of paying, payment webhooks, refunds and the payments desk."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from soko.payments.payment_models import Payment, Refund, WebhookEvent
from soko.platform.money import MAX_AMOUNT_MINOR

PROVIDER_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"


class PayIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: str = Field(
        "sandbox",
        pattern=PROVIDER_NAME_PATTERN,
        description="One of the enabled providers (SOKO_PAYMENT_PROVIDERS).",
    )


class NextActionOut(BaseModel):
    """What the buyer's client does next: open ``url`` (redirect) or confirm in the
    client with ``client_secret`` (Stripe)."""

    type: str
    url: str | None = None
    client_secret: str | None = None


class PaymentOut(BaseModel):
    id: uuid.UUID
    group_id: uuid.UUID
    provider: str
    status: str
    amount_minor: int
    currency: str
    refunded_minor: int
    next_action: NextActionOut | None
    failure_reason: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    succeeded_at: dt.datetime | None

    @classmethod
    def of(cls, payment: Payment) -> PaymentOut:
        open_ = payment.status in ("created", "pending")
        next_action = (
            NextActionOut(
                type=payment.next_action_type,
                url=payment.next_action_url,
                client_secret=payment.next_action_client_secret,
            )
            if payment.next_action_type and open_
            else None
        )
        return cls(
            id=payment.id,
            group_id=payment.group_id,
            provider=payment.provider,
            status=payment.status,
            amount_minor=payment.amount_minor,
            currency=payment.currency,
            refunded_minor=payment.refunded_minor,
            next_action=next_action,
            failure_reason=payment.failure_reason,
            created_at=payment.created_at,
            updated_at=payment.updated_at,
            succeeded_at=payment.succeeded_at,
        )


class PaymentListOut(BaseModel):
    items: list[PaymentOut]
    next_cursor: str | None = None


class WebhookReceivedOut(BaseModel):
    received: bool
    duplicate: bool


class RefundOut(BaseModel):
    id: uuid.UUID
    payment_id: uuid.UUID
    order_id: uuid.UUID | None
    seller_id: uuid.UUID | None
    amount_minor: int
    currency: str
    status: str
    reason: str
    source: str
    provider_refund_id: str | None
    failure_reason: str | None
    created_at: dt.datetime
    completed_at: dt.datetime | None

    @classmethod
    def of(cls, refund: Refund) -> RefundOut:
        return cls(
            id=refund.id,
            payment_id=refund.payment_id,
            order_id=refund.order_id,
            seller_id=refund.seller_id,
            amount_minor=refund.amount_minor,
            currency=refund.currency,
            status=refund.status,
            reason=refund.reason,
            source=refund.source,
            provider_refund_id=refund.provider_refund_id,
            failure_reason=refund.failure_reason,
            created_at=refund.created_at,
            completed_at=refund.completed_at,
        )


class WebhookEventOut(BaseModel):
    id: uuid.UUID
    provider: str
    event_id: str
    event_type: str
    reported_status: str | None
    reported_amount_minor: int | None
    reported_currency: str | None
    status: str
    received_at: dt.datetime
    processed_at: dt.datetime | None
    error: str | None
    headers: dict[str, Any]
    raw_body: str

    @classmethod
    def of(cls, event: WebhookEvent) -> WebhookEventOut:
        return cls(
            id=event.id,
            provider=event.provider,
            event_id=event.event_id,
            event_type=event.event_type,
            reported_status=event.reported_status,
            reported_amount_minor=event.reported_amount_minor,
            reported_currency=event.reported_currency,
            status=event.status,
            received_at=event.received_at,
            processed_at=event.processed_at,
            error=event.error,
            headers=dict(event.headers or {}),
            raw_body=event.raw_body.decode("utf-8", errors="replace"),
        )


class AdminPaymentOut(BaseModel):
    """A payment as the payments desk sees it (never the buyer's client secret)."""

    id: uuid.UUID
    group_id: uuid.UUID
    buyer_id: uuid.UUID
    provider: str
    provider_payment_id: str | None
    status: str
    amount_minor: int
    currency: str
    refunded_minor: int
    failure_reason: str | None
    flag: str | None
    flag_detail: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    succeeded_at: dt.datetime | None
    version: int

    @classmethod
    def of(cls, payment: Payment) -> AdminPaymentOut:
        return cls(
            id=payment.id,
            group_id=payment.group_id,
            buyer_id=payment.buyer_id,
            provider=payment.provider,
            provider_payment_id=payment.provider_payment_id,
            status=payment.status,
            amount_minor=payment.amount_minor,
            currency=payment.currency,
            refunded_minor=payment.refunded_minor,
            failure_reason=payment.failure_reason,
            flag=payment.flag,
            flag_detail=payment.flag_detail,
            created_at=payment.created_at,
            updated_at=payment.updated_at,
            succeeded_at=payment.succeeded_at,
            version=payment.version,
        )


class AdminPaymentDetailOut(AdminPaymentOut):
    events: list[WebhookEventOut]
    refunds: list[RefundOut]

    @classmethod
    def full(
        cls, payment: Payment, events: Sequence[WebhookEvent], refunds: Sequence[Refund]
    ) -> AdminPaymentDetailOut:
        return cls(
            **AdminPaymentOut.of(payment).model_dump(),
            events=[WebhookEventOut.of(event) for event in events],
            refunds=[RefundOut.of(refund) for refund in refunds],
        )


class RefundIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount_minor: int = Field(strict=True, gt=0, le=MAX_AMOUNT_MINOR)
    order_id: uuid.UUID | None = Field(
        None,
        description="The order whose share is refunded (required if it paid several)",
    )
    reason: str = Field(min_length=1, max_length=500)


class ResolveFlagIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str = Field("", max_length=500)
