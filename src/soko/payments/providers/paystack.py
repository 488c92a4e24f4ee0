"""Paystack (https://paystack.com/docs/api/).

* start: ``POST /transaction/initialize`` {email, amount in subunits, currency,
  reference, callback_url, metadata}; the buyer is redirected to ``authorization_url``.
  Paystack needs the buyer's email. Soko's reference is Paystack's transaction
  reference, and it is what Soko stores as the provider's id (verify and refund both
  take it).
* fetch: ``GET /transaction/verify/{reference}``.
* refund: ``POST /refund`` {transaction, amount}. Paystack has no idempotency key, so a
  refund is sent once (see :mod:`soko.payments.providers.http`).
* webhooks: ``x-paystack-signature`` is hex HMAC-SHA512 of the raw body keyed with the
  secret key (https://paystack.com/docs/payments/webhooks/#verify-event-origin). It has
  no timestamp and events have no id: the event id is a digest of what identifies the
  delivery (event, data.id, data.reference, data.status), so a replay of the same body
  is the same event. A replay can therefore only repeat an event Soko already has, and
  every payment is confirmed with ``verify`` before any value is granted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx2

from soko.payments.providers.base import (
    InboundEvent,
    NextActionKind,
    PaymentStart,
    PaymentState,
    ProviderError,
    ProviderStatus,
    RefundRequest,
    RefundResult,
    RefundStatus,
    StartedPayment,
    WebhookRejectedError,
)
from soko.payments.providers.http import (
    HttpBackedProvider,
    HttpPolicy,
    ProviderHttp,
    unexpected_answer,
)
from soko.platform.clock import Clock
from soko.platform.config import Settings

NAME = "paystack"

# https://paystack.com/docs/api/transaction/#verify (data.status)
_TRANSACTION_STATUSES: dict[str, ProviderStatus] = {
    "success": ProviderStatus.succeeded,
    "failed": ProviderStatus.failed,
    # Money came and went back (a reversal): nothing is held for the buyer.
    "reversed": ProviderStatus.failed,
    "abandoned": ProviderStatus.abandoned,
    "ongoing": ProviderStatus.pending,
    "pending": ProviderStatus.pending,
    "processing": ProviderStatus.pending,
    "queued": ProviderStatus.pending,
}
_CHARGE_EVENTS: dict[str, ProviderStatus] = {
    "charge.success": ProviderStatus.succeeded,
    "charge.failed": ProviderStatus.failed,
}
# https://paystack.com/docs/api/refund/ (data.status)
_REFUND_STATUSES: dict[str, RefundStatus] = {
    "processed": RefundStatus.succeeded,
    "pending": RefundStatus.pending,
    "processing": RefundStatus.pending,
    "needs-attention": RefundStatus.pending,
    "failed": RefundStatus.failed,
}


class PaystackProvider(HttpBackedProvider):
    name = NAME
    refunds_are_idempotent = False  # its refund API takes no idempotency key

    def __init__(
        self,
        *,
        secret_key: str,
        api_base: str = "https://api.paystack.co",
        policy: HttpPolicy | None = None,
        clock: Clock,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        if not secret_key:
            raise ValueError("Paystack needs a secret key")
        self._signing_key = secret_key.encode("utf-8")
        self._http = ProviderHttp(
            NAME,
            base_url=api_base,
            headers={"Authorization": f"Bearer {secret_key}"},
            policy=policy or HttpPolicy(),
            clock=clock,
            transport=transport,
        )

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        clock: Clock,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> PaystackProvider:
        return cls(
            secret_key=settings.paystack_secret_key.get_secret_value(),
            api_base=settings.paystack_api_base,
            policy=HttpPolicy.from_settings(settings),
            clock=clock,
            transport=transport,
        )

    # -- outbound --------------------------------------------------------------------------

    async def start(self, payment: PaymentStart) -> StartedPayment:
        if not payment.customer_email:
            raise ProviderError(
                NAME,
                "Paystack needs the buyer's email address to start a payment; the buyer "
                "has none on file",
                retryable=False,
            )
        metadata = {**payment.metadata, "reference": payment.reference}
        answer = await self._http.request(
            "initialize",
            "POST",
            "/transaction/initialize",
            json_body={
                "email": payment.customer_email,
                "amount": str(payment.amount_minor),
                "currency": payment.currency,
                "reference": payment.reference,
                "callback_url": payment.return_url,
                # Paystack documents metadata as a stringified JSON object.
                "metadata": json.dumps(metadata, separators=(",", ":")),
            },
        )
        data = _data(answer, "initialize")
        url = _text(data, "authorization_url")
        reference = _text(data, "reference")
        if url is None or reference != payment.reference:
            raise unexpected_answer(NAME, "initialize", "no authorization_url or another reference")
        return StartedPayment(
            provider_payment_id=reference, next_action=NextActionKind.redirect, url=url
        )

    async def fetch(self, provider_payment_id: str, reference: str) -> PaymentState:
        if not reference:
            raise ProviderError(NAME, "no transaction reference to verify", retryable=False)
        # Verify takes the transaction reference, which is Soko's reference.
        answer = await self._http.request(
            "verify", "GET", f"/transaction/verify/{quote(reference, safe='')}"
        )
        data = _data(answer, "verify")
        raw_status = _text(data, "status")
        amount = _int(data, "amount")
        currency = _text(data, "currency")
        if raw_status is None or amount is None or currency is None:
            raise unexpected_answer(NAME, "verify", "no status, amount or currency")
        if _text(data, "reference") != reference:
            raise unexpected_answer(NAME, "verify", "the transaction has another reference")
        # A status Paystack adds later is treated as still pending: nothing is granted
        # on a state Soko does not understand.
        status = _TRANSACTION_STATUSES.get(raw_status, ProviderStatus.pending)
        failure = None
        if status in (ProviderStatus.failed, ProviderStatus.abandoned):
            failure = _text(data, "gateway_response") or raw_status
        return PaymentState(
            provider_payment_id=reference,
            reference=reference,
            status=status,
            amount_minor=amount,
            currency=currency.upper(),
            failure_reason=failure,
        )

    async def refund(self, refund: RefundRequest) -> RefundResult:
        body: dict[str, Any] = {
            "transaction": refund.provider_payment_id,
            "amount": refund.amount_minor,
            "currency": refund.currency,
            # Paystack keeps the note on the refund: it names Soko's refund so an admin
            # can match the two on Paystack's dashboard.
            "merchant_note": f"Soko refund {refund.reference}"
            + (f": {refund.reason}" if refund.reason else ""),
        }
        answer = await self._http.request("refund", "POST", "/refund", json_body=body)
        return _refund_result(answer, "refund")

    async def refund_status(self, provider_refund_id: str, refund: RefundRequest) -> RefundResult:
        """The refund's current state (``GET /refund/{id}``). Paystack has no
        idempotency key: sending the refund again would refund twice."""
        answer = await self._http.request(
            "fetch_refund", "GET", f"/refund/{quote(provider_refund_id, safe='')}"
        )
        return _refund_result(answer, "fetch_refund")

    # -- inbound ---------------------------------------------------------------------------

    def verify_webhook(
        self, headers: Mapping[str, str], raw_body: bytes, now: dt.datetime
    ) -> InboundEvent:
        signature = headers.get("x-paystack-signature")
        if not signature or not signature.isascii():
            raise WebhookRejectedError("no x-paystack-signature header, or not hex")
        expected = hmac.new(self._signing_key, raw_body, hashlib.sha512).hexdigest()
        if not hmac.compare_digest(expected, signature.strip().lower()):
            raise WebhookRejectedError("x-paystack-signature does not match the body")
        return parse_event(raw_body)


def parse_event(raw_body: bytes) -> InboundEvent:
    try:
        event = json.loads(raw_body)
    except (ValueError, UnicodeDecodeError):
        raise WebhookRejectedError("the body is not JSON") from None
    if not isinstance(event, dict):
        raise WebhookRejectedError("the body is not a JSON object")
    event_type = _text(event, "event")
    data = event.get("data")
    if event_type is None or not isinstance(data, dict):
        raise WebhookRejectedError("the event has no name or no data")
    data_id = data.get("id")
    data_status = _text(data, "status")
    if event_type.startswith("refund."):
        # Refund events describe the refund; the payment is the refunded transaction.
        reference = _text(data, "transaction_reference")
        status = None
    else:
        reference = _text(data, "reference")
        status = _CHARGE_EVENTS.get(event_type)
    identity = json.dumps(
        [event_type, data_id, _text(data, "reference"), data_status],
        separators=(",", ":"),
        default=str,
    )
    event_id = "psk_" + hashlib.sha256(identity.encode("utf-8")).hexdigest()[:40]
    currency = _text(data, "currency")
    return InboundEvent(
        provider=NAME,
        event_id=event_id,
        event_type=event_type,
        reference=reference,
        provider_payment_id=reference,
        status=status,
        amount_minor=_int(data, "amount"),
        currency=currency.upper() if currency else None,
        occurred_at=_moment(_text(data, "paid_at") or _text(data, "created_at")),
    )


def _refund_result(answer: Mapping[str, Any], operation: str) -> RefundResult:
    data = _data(answer, operation)
    refund_id = data.get("id")
    status = _REFUND_STATUSES.get(_text(data, "status") or "")
    if not isinstance(refund_id, int | str) or isinstance(refund_id, bool) or status is None:
        raise unexpected_answer(NAME, operation, "no id or unknown status")
    return RefundResult(provider_refund_id=str(refund_id), status=status)


def _data(answer: Mapping[str, Any], operation: str) -> Mapping[str, Any]:
    data = answer.get("data")
    if answer.get("status") is not True or not isinstance(data, dict):
        raise unexpected_answer(NAME, operation, "status is not true or no data")
    return data


def _text(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) and value else None


def _int(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _moment(text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment.astimezone(dt.UTC) if moment.tzinfo is not None else None
