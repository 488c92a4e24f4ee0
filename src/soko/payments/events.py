"""The events the payments domain publishes (through the outbox).

``payment.succeeded`` is published when the provider confirmed a capture; ``outcome``
says what became of the money: ``paid`` (the group is paid) or why it is being given
back in full (``duplicate_payment``, ``stock_gone``, ``group_cancelled``).
``payment.failed`` when a payment failed or was abandoned; ``payment.flagged`` when an
admin must look at it (``flag``). ``refund.succeeded`` / ``refund.failed`` for each
refund, with the order and seller it concerns (``None`` for money from suspense).
Payloads carry ids and the facts of the change; the buyer's address is never in them.
"""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict

PAYMENT_SUCCEEDED = "payment.succeeded"
PAYMENT_FAILED = "payment.failed"
PAYMENT_FLAGGED = "payment.flagged"
REFUND_SUCCEEDED = "refund.succeeded"
REFUND_FAILED = "refund.failed"


class PaymentEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    payment_id: uuid.UUID
    group_id: uuid.UUID
    buyer_id: uuid.UUID
    seller_ids: list[uuid.UUID]
    provider: str
    amount_minor: int
    currency: str
    status: str
    outcome: str | None = None
    flag: str | None = None
    failure_reason: str | None = None


class RefundEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    refund_id: uuid.UUID
    payment_id: uuid.UUID
    group_id: uuid.UUID
    buyer_id: uuid.UUID
    seller_ids: list[uuid.UUID]
    order_id: uuid.UUID | None
    seller_id: uuid.UUID | None
    provider: str
    amount_minor: int
    currency: str
    reason: str
    source: str
    failure_reason: str | None = None
