"""Flutterwave v3 (https://developer.flutterwave.com/v3.0/reference).

* start: ``POST /v3/payments`` (Flutterwave Standard) {tx_ref, amount, currency,
  redirect_url, customer {email}, meta}; the buyer is redirected to ``data.link``.
  Flutterwave counts amounts in MAJOR units ("12.50"), so Soko's minor units are
  converted exactly with the currency's ISO 4217 exponent, and back with ``Decimal``
  (an amount that does not convert exactly is an error, never rounded). Soko's
  reference is the ``tx_ref`` and what Soko stores as the provider's id; Flutterwave's
  own numeric transaction id exists only once the buyer has paid.
* fetch: ``GET /v3/transactions/verify_by_reference?tx_ref=...``.
* refund: ``POST /v3/transactions/{id}/refund`` {amount}, where ``id`` is Flutterwave's
  numeric transaction id (looked up by ``tx_ref`` when Soko does not have it). Sent once:
  v3 has no idempotency key.
* webhooks: the ``verif-hash`` header carries the secret hash set on Flutterwave's
  dashboard, compared in constant time. It proves the sender knows the secret but does
  not authenticate the body, which is why Soko acts on nothing a webhook says before
  ``fetch`` has confirmed it. Events have no delivery id: the event id is the
  transaction id plus a digest of the event type and status.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
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
from soko.platform.money import Money, UnknownCurrencyError

NAME = "flutterwave"

_TRANSACTION_STATUSES: dict[str, ProviderStatus] = {
    "successful": ProviderStatus.succeeded,
    "failed": ProviderStatus.failed,
    "cancelled": ProviderStatus.abandoned,
    "pending": ProviderStatus.pending,
}
_REFUND_STATUSES: dict[str, RefundStatus] = {
    "completed": RefundStatus.succeeded,
    "successful": RefundStatus.succeeded,
    "pending": RefundStatus.pending,
    "pending-approval": RefundStatus.pending,
    "failed": RefundStatus.failed,
}


def to_major(amount_minor: int, currency: str) -> str:
    """``1250`` KES -> ``"12.50"``; exact, from the currency's exponent."""
    try:
        return Money(amount_minor, currency).to_decimal_string()
    except UnknownCurrencyError:
        raise ProviderError(NAME, f"unknown currency {currency!r}", retryable=False) from None


def to_minor(amount: object, currency: str) -> int:
    """Flutterwave's major-unit amount (a JSON number, read as ``Decimal``, or a decimal
    string) as minor units; raises ``ValueError`` unless the conversion is exact."""
    if isinstance(amount, bool):
        raise ValueError("amount is a boolean")
    if isinstance(amount, int | Decimal):
        value = Decimal(amount)
    elif isinstance(amount, str):
        try:
            value = Decimal(amount.strip())
        except InvalidOperation:
            raise ValueError(f"{amount!r} is not a number") from None
    else:
        raise ValueError("amount is not a number")
    return Money.from_decimal(value, currency).amount


class FlutterwaveProvider(HttpBackedProvider):
    name = NAME
    refunds_are_idempotent = False  # its refund API takes no idempotency key

    def __init__(
        self,
        *,
        secret_key: str,
        secret_hash: str,
        api_base: str = "https://api.flutterwave.com",
        policy: HttpPolicy | None = None,
        clock: Clock,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        if not secret_key or not secret_hash:
            raise ValueError("Flutterwave needs a secret key and a webhook secret hash")
        self._secret_hash = secret_hash.encode("utf-8")
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
    ) -> FlutterwaveProvider:
        return cls(
            secret_key=settings.flutterwave_secret_key.get_secret_value(),
            secret_hash=settings.flutterwave_secret_hash.get_secret_value(),
            api_base=settings.flutterwave_api_base,
            policy=HttpPolicy.from_settings(settings),
            clock=clock,
            transport=transport,
        )

    # -- outbound --------------------------------------------------------------------------

    async def start(self, payment: PaymentStart) -> StartedPayment:
        if not payment.customer_email:
            raise ProviderError(
                NAME,
                "Flutterwave needs the buyer's email address to start a payment; the "
                "buyer has none on file",
                retryable=False,
            )
        body: dict[str, Any] = {
            "tx_ref": payment.reference,
            "amount": to_major(payment.amount_minor, payment.currency),
            "currency": payment.currency,
            "redirect_url": payment.return_url,
            "customer": {"email": payment.customer_email},
            "meta": {**payment.metadata, "reference": payment.reference},
        }
        if payment.description:
            body["customizations"] = {"description": payment.description}
        answer = await self._http.request("create_payment", "POST", "/v3/payments", json_body=body)
        data = _data(answer, "create_payment")
        link = _text(data, "link")
        if link is None:
            raise unexpected_answer(NAME, "create_payment", "no data.link")
        return StartedPayment(
            provider_payment_id=payment.reference, next_action=NextActionKind.redirect, url=link
        )

    async def fetch(self, provider_payment_id: str, reference: str) -> PaymentState:
        if not reference:
            raise ProviderError(NAME, "no tx_ref to verify", retryable=False)
        data = await self._verify(reference)
        raw_status = _text(data, "status")
        currency = _text(data, "currency")
        tx_ref = _text(data, "tx_ref")
        if raw_status is None or currency is None or tx_ref is None:
            raise unexpected_answer(NAME, "verify", "no status, currency or tx_ref")
        if tx_ref != reference:
            raise unexpected_answer(NAME, "verify", "the transaction has another tx_ref")
        currency = currency.upper()
        try:
            amount_minor = to_minor(data.get("amount"), currency)
        except (ValueError, UnknownCurrencyError) as exc:
            raise unexpected_answer(NAME, "verify", f"amount: {exc}") from None
        # A status Flutterwave adds later reads as pending: nothing is granted on it.
        status = _TRANSACTION_STATUSES.get(raw_status.lower(), ProviderStatus.pending)
        failure = None
        if status in (ProviderStatus.failed, ProviderStatus.abandoned):
            failure = _text(data, "processor_response") or raw_status
        return PaymentState(
            provider_payment_id=tx_ref,
            reference=tx_ref,
            status=status,
            amount_minor=amount_minor,
            currency=currency,
            failure_reason=failure,
        )

    async def refund(self, refund: RefundRequest) -> RefundResult:
        transaction_id = refund.provider_payment_id
        if not transaction_id.isdigit():
            # Soko keeps the tx_ref; the refund endpoint wants Flutterwave's id.
            found = (await self._verify(refund.payment_reference)).get("id")
            if not isinstance(found, int) or isinstance(found, bool):
                raise unexpected_answer(NAME, "verify", "no transaction id")
            transaction_id = str(found)
        answer = await self._http.request(
            "refund",
            "POST",
            f"/v3/transactions/{quote(transaction_id, safe='')}/refund",
            json_body={
                "amount": to_major(refund.amount_minor, refund.currency),
                "comments": f"Soko refund {refund.reference}"
                + (f": {refund.reason}" if refund.reason else ""),
            },
        )
        return _refund_result(answer, "refund")

    async def refund_status(self, provider_refund_id: str, refund: RefundRequest) -> RefundResult:
        """The refund's current state (``GET /v3/refunds/{id}``). v3 has no idempotency
        key: sending the refund again would refund twice."""
        answer = await self._http.request(
            "fetch_refund", "GET", f"/v3/refunds/{quote(provider_refund_id, safe='')}"
        )
        return _refund_result(answer, "fetch_refund")

    async def _verify(self, reference: str) -> Mapping[str, Any]:
        answer = await self._http.request(
            "verify",
            "GET",
            "/v3/transactions/verify_by_reference",
            params={"tx_ref": reference},
        )
        return _data(answer, "verify")

    # -- inbound ---------------------------------------------------------------------------

    def verify_webhook(
        self, headers: Mapping[str, str], raw_body: bytes, now: dt.datetime
    ) -> InboundEvent:
        given = headers.get("verif-hash")
        if not given:
            raise WebhookRejectedError("no verif-hash header")
        if not hmac.compare_digest(self._secret_hash, given.encode("utf-8", "surrogateescape")):
            raise WebhookRejectedError("verif-hash is not the configured secret hash")
        return parse_event(raw_body)


def parse_event(raw_body: bytes) -> InboundEvent:
    try:
        event = json.loads(raw_body, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError):
        raise WebhookRejectedError("the body is not JSON") from None
    if not isinstance(event, dict):
        raise WebhookRejectedError("the body is not a JSON object")
    event_type = _text(event, "event") or _text(event, "event.type")
    data = event.get("data")
    if event_type is None or not isinstance(data, dict):
        raise WebhookRejectedError("the event has no name or no data")
    data_id = data.get("id")
    if not isinstance(data_id, int | str) or isinstance(data_id, bool):
        raise WebhookRejectedError("the event has no data.id")
    raw_status = _text(data, "status")
    digest = hashlib.sha256(
        json.dumps([event_type, raw_status], separators=(",", ":")).encode("utf-8")
    ).hexdigest()[:16]
    status: ProviderStatus | None = None
    if event_type == "charge.completed" and raw_status is not None:
        status = _TRANSACTION_STATUSES.get(raw_status.lower())
    currency = _text(data, "currency")
    currency = currency.upper() if currency else None
    amount_minor: int | None = None
    if currency is not None:
        try:
            amount_minor = to_minor(data.get("amount"), currency)
        except (ValueError, UnknownCurrencyError):
            amount_minor = None  # informational only: fetch() gives the amount Soko uses
    tx_ref = _text(data, "tx_ref")
    return InboundEvent(
        provider=NAME,
        event_id=f"flw_{data_id}_{digest}",
        event_type=event_type,
        reference=tx_ref,
        provider_payment_id=tx_ref,
        status=status,
        amount_minor=amount_minor,
        currency=currency,
        occurred_at=_moment(_text(data, "created_at")),
    )


def _refund_result(answer: Mapping[str, Any], operation: str) -> RefundResult:
    data = _data(answer, operation)
    refund_id = data.get("id")
    status = _REFUND_STATUSES.get((_text(data, "status") or "").lower())
    if not isinstance(refund_id, int | str) or isinstance(refund_id, bool) or status is None:
        raise unexpected_answer(NAME, operation, "no id or unknown status")
    return RefundResult(provider_refund_id=str(refund_id), status=status)


def _data(answer: Mapping[str, Any], operation: str) -> Mapping[str, Any]:
    data = answer.get("data")
    if answer.get("status") != "success" or not isinstance(data, dict):
        raise unexpected_answer(NAME, operation, "status is not success or no data")
    return data


def _text(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) and value else None


def _moment(text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.astimezone(dt.UTC) if moment.tzinfo is not None else None
