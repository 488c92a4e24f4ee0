"""Stripe, through PaymentIntents (https://docs.stripe.com/api/payment_intents).

* start: ``POST /v1/payment_intents`` (form-encoded) with automatic payment methods and
  Soko's reference in ``metadata[reference]``; the reference is also the
  ``Idempotency-Key``, so a repeated start returns the same intent. The buyer's client
  confirms it with the ``client_secret`` (Stripe.js / Payment Element).
* fetch: ``GET /v1/payment_intents/{id}``.
* refund: ``POST /v1/refunds`` with the refund's reference as ``Idempotency-Key``.
* webhooks: ``Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>...]`` where each ``v1`` may
  be hex HMAC-SHA256 of ``"{t}.{raw body}"`` keyed with the endpoint's whole ``whsec_``
  secret (https://docs.stripe.com/webhooks#verify-manually). Any ``v1`` may match (Stripe
  sends several while a secret is being rolled); the timestamp must be within five
  minutes of now, either way.

Amounts: Stripe counts the smallest unit of each currency, which is Soko's minor unit
except where Stripe's list of zero-decimal currencies disagrees with ISO 4217 (MGA:
ISO has 2 decimals, Stripe none). Three-decimal currencies are sent with three decimals
but Stripe requires the last digit to be 0
(https://docs.stripe.com/currencies#special-cases). Amounts that cannot be expressed
exactly are refused, never rounded.
"""

from __future__ import annotations

import contextlib
import datetime as dt
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
from soko.payments.providers.signatures import TOLERANCE_SECONDS, verify_timestamped
from soko.platform.clock import Clock
from soko.platform.config import Settings
from soko.platform.money import UnknownCurrencyError, minor_units

NAME = "stripe"
SIGNATURE_TOLERANCE_SECONDS = TOLERANCE_SECONDS

# https://docs.stripe.com/currencies#zero-decimal
ZERO_DECIMAL = frozenset(
    {
        "BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "UGX", "VND",
        "VUV", "XAF", "XOF", "XPF",
    }
)  # fmt: skip
# Sent with three decimals, the last of which must be 0.
THREE_DECIMAL = frozenset({"BHD", "JOD", "KWD", "OMR", "TND"})

_INTENT_EVENTS: dict[str, ProviderStatus] = {
    "payment_intent.succeeded": ProviderStatus.succeeded,
    "payment_intent.payment_failed": ProviderStatus.failed,
    "payment_intent.processing": ProviderStatus.pending,
    "payment_intent.canceled": ProviderStatus.abandoned,
}
_PENDING_INTENT_STATUSES = frozenset(
    {
        "processing",
        "requires_payment_method",
        "requires_confirmation",
        "requires_action",
        "requires_capture",
    }
)
_REFUND_STATUSES: dict[str, RefundStatus] = {
    "succeeded": RefundStatus.succeeded,
    "pending": RefundStatus.pending,
    "requires_action": RefundStatus.pending,
    "failed": RefundStatus.failed,
    "canceled": RefundStatus.failed,
}


def _exponent_shift(currency: str) -> int:
    """How many decimal places Soko's minor unit has beyond Stripe's unit."""
    try:
        ours = minor_units(currency)
    except UnknownCurrencyError:
        raise ProviderError(NAME, f"unknown currency {currency!r}", retryable=False) from None
    theirs = 0 if currency in ZERO_DECIMAL else ours
    return ours - theirs


def to_stripe_amount(amount_minor: int, currency: str) -> int:
    """Soko's minor units as Stripe's amount; refuses what Stripe cannot take exactly."""
    scale: int = 10 ** _exponent_shift(currency)
    quotient, remainder = divmod(amount_minor, scale)
    if remainder:
        raise ProviderError(
            NAME, f"{currency} {amount_minor} minor units are not whole for Stripe", retryable=False
        )
    if currency in THREE_DECIMAL and quotient % 10:
        raise ProviderError(
            NAME, f"Stripe takes {currency} amounts only in multiples of 10", retryable=False
        )
    return quotient


def from_stripe_amount(amount: int, currency: str) -> int:
    scale: int = 10 ** _exponent_shift(currency)
    return amount * scale


class StripeProvider(HttpBackedProvider):
    name = NAME
    refunds_are_idempotent = True  # the refund id is sent as its Idempotency-Key

    def __init__(
        self,
        *,
        secret_key: str,
        webhook_secret: str,
        api_base: str = "https://api.stripe.com",
        policy: HttpPolicy | None = None,
        clock: Clock,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        if not secret_key or not webhook_secret:
            raise ValueError("Stripe needs a secret key and a webhook signing secret")
        self._webhook_secret = webhook_secret.encode("utf-8")
        self._http = ProviderHttp(
            NAME,
            base_url=api_base,
            headers={"Authorization": f"Bearer {secret_key}"},
            policy=policy or HttpPolicy(),
            clock=clock,
            transport=transport,
            idempotency_header="Idempotency-Key",
            # https://docs.stripe.com/error-low-level#idempotency (Stripe's own
            # libraries follow this header and retry 409s of keyed requests too).
            retry_hint_header="Stripe-Should-Retry",
        )

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        clock: Clock,
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> StripeProvider:
        return cls(
            secret_key=settings.stripe_secret_key.get_secret_value(),
            webhook_secret=settings.stripe_webhook_secret.get_secret_value(),
            api_base=settings.stripe_api_base,
            policy=HttpPolicy.from_settings(settings),
            clock=clock,
            transport=transport,
        )

    # -- outbound --------------------------------------------------------------------------

    async def start(self, payment: PaymentStart) -> StartedPayment:
        form = {
            "amount": str(to_stripe_amount(payment.amount_minor, payment.currency)),
            "currency": payment.currency.lower(),
            "automatic_payment_methods[enabled]": "true",
        }
        for key, value in payment.metadata.items():
            form[f"metadata[{key}]"] = value
        # Set last, so no caller metadata can replace the reference Soko matches on.
        form["metadata[reference]"] = payment.reference
        if payment.description:
            form["description"] = payment.description
        intent = await self._http.request(
            "create_intent",
            "POST",
            "/v1/payment_intents",
            form=form,
            idempotency_key=payment.reference,
        )
        intent_id = _text(intent, "id")
        secret = _text(intent, "client_secret")
        if intent_id is None or secret is None:
            raise unexpected_answer(NAME, "create_intent", "no id or client_secret")
        return StartedPayment(
            provider_payment_id=intent_id,
            next_action=NextActionKind.client_secret,
            client_secret=secret,
        )

    async def fetch(self, provider_payment_id: str, reference: str) -> PaymentState:
        if not provider_payment_id:
            # Without an id the path would name the list of every intent.
            raise ProviderError(NAME, "no PaymentIntent id to fetch", retryable=False)
        intent = await self._http.request(
            "fetch_intent", "GET", f"/v1/payment_intents/{quote(provider_payment_id, safe='')}"
        )
        state = intent_state(intent)
        if state.reference is not None and state.reference != reference:
            raise unexpected_answer(NAME, "fetch_intent", "the intent belongs to another payment")
        return state

    async def refund(self, refund: RefundRequest) -> RefundResult:
        form = {
            "payment_intent": refund.provider_payment_id,
            "amount": str(to_stripe_amount(refund.amount_minor, refund.currency)),
            "metadata[reference]": refund.reference,
            "metadata[payment_reference]": refund.payment_reference,
        }
        if refund.reason:
            form["metadata[reason]"] = refund.reason
        answer = await self._http.request(
            "refund", "POST", "/v1/refunds", form=form, idempotency_key=refund.reference
        )
        return _refund_result(answer, "refund")

    async def refund_status(self, provider_refund_id: str, refund: RefundRequest) -> RefundResult:
        """The refund's current state (``GET /v1/refunds/{id}``). Repeating the refund
        POST would only replay its first answer, and not at all after the idempotency
        key expires (24 hours)."""
        answer = await self._http.request(
            "fetch_refund", "GET", f"/v1/refunds/{quote(provider_refund_id, safe='')}"
        )
        return _refund_result(answer, "fetch_refund")

    # -- inbound ---------------------------------------------------------------------------

    def verify_webhook(
        self, headers: Mapping[str, str], raw_body: bytes, now: dt.datetime
    ) -> InboundEvent:
        verify_timestamped(
            headers.get("stripe-signature"),
            key=self._webhook_secret,
            raw_body=raw_body,
            now=now,
            name="Stripe-Signature",
            tolerance_seconds=SIGNATURE_TOLERANCE_SECONDS,
        )
        return parse_event(raw_body)


def parse_event(raw_body: bytes) -> InboundEvent:
    """A verified Stripe event (https://docs.stripe.com/api/events/object) in Soko's
    words. Events Soko does not act on are kept with ``status`` None."""
    try:
        event = json.loads(raw_body)
    except (ValueError, UnicodeDecodeError):
        raise WebhookRejectedError("the body is not JSON") from None
    if not isinstance(event, dict):
        raise WebhookRejectedError("the body is not a JSON object")
    event_id = _text(event, "id")
    event_type = _text(event, "type")
    if event_id is None or not event_id.startswith("evt_") or event_type is None:
        raise WebhookRejectedError("the event has no evt_ id or no type")
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        raise WebhookRejectedError("the event has no data.object")
    created = event.get("created")
    occurred_at = None
    if isinstance(created, int) and not isinstance(created, bool):
        try:
            occurred_at = dt.datetime.fromtimestamp(created, dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise WebhookRejectedError("the event's time is out of range") from None
    metadata = obj.get("metadata")
    reference = _text(metadata, "reference") if isinstance(metadata, dict) else None
    status: ProviderStatus | None = None
    if event_type.startswith("payment_intent."):
        payment_id = _text(obj, "id")
        status = _INTENT_EVENTS.get(event_type)
        amount = _int(obj, "amount_received" if status is ProviderStatus.succeeded else "amount")
    elif event_type.startswith("charge."):
        payment_id = _text(obj, "payment_intent")
        amount = _int(obj, "amount_refunded" if event_type == "charge.refunded" else "amount")
    else:
        payment_id = None
        amount = None
    currency = _currency(obj)
    amount_minor = None
    if amount is not None and currency is not None:
        # A currency Soko does not know: keep the event, leave the amount out.
        with contextlib.suppress(ProviderError):
            amount_minor = from_stripe_amount(amount, currency)
    return InboundEvent(
        provider=NAME,
        event_id=event_id,
        event_type=event_type,
        reference=reference,
        provider_payment_id=payment_id,
        status=status,
        amount_minor=amount_minor,
        currency=currency,
        occurred_at=occurred_at,
    )


def intent_state(intent: Mapping[str, Any]) -> PaymentState:
    """A PaymentIntent object (https://docs.stripe.com/api/payment_intents/object) as
    Soko's :class:`PaymentState`."""
    intent_id = _text(intent, "id")
    raw_status = _text(intent, "status")
    currency = _currency(intent)
    if intent_id is None or raw_status is None or currency is None:
        raise unexpected_answer(NAME, "fetch_intent", "no id, status or currency")
    error = intent.get("last_payment_error")
    failure: str | None = None
    if raw_status == "succeeded":
        status = ProviderStatus.succeeded
        amount = _int(intent, "amount_received")
    elif raw_status == "canceled":
        status = ProviderStatus.abandoned
        amount = _int(intent, "amount")
        failure = _text(intent, "cancellation_reason")
    elif raw_status == "requires_payment_method" and isinstance(error, dict):
        # The last attempt was declined; the buyer may still try another method on the
        # same intent, which is why a failure may later become a success.
        status = ProviderStatus.failed
        amount = _int(intent, "amount")
        failure = _text(error, "message") or _text(error, "code") or "payment failed"
    elif raw_status in _PENDING_INTENT_STATUSES:
        status = ProviderStatus.pending
        amount = _int(intent, "amount")
    else:
        raise unexpected_answer(NAME, "fetch_intent", f"unknown status {raw_status!r}")
    if amount is None:
        raise unexpected_answer(NAME, "fetch_intent", "no amount")
    metadata = intent.get("metadata")
    return PaymentState(
        provider_payment_id=intent_id,
        reference=_text(metadata, "reference") if isinstance(metadata, dict) else None,
        status=status,
        amount_minor=from_stripe_amount(amount, currency),
        currency=currency,
        failure_reason=failure,
    )


def _refund_result(answer: Mapping[str, Any], operation: str) -> RefundResult:
    refund_id = _text(answer, "id")
    status = _REFUND_STATUSES.get(_text(answer, "status") or "")
    if refund_id is None or status is None:
        raise unexpected_answer(NAME, operation, "no id or unknown status")
    return RefundResult(provider_refund_id=refund_id, status=status)


def _text(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    return value if isinstance(value, str) and value else None


def _int(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _currency(obj: Mapping[str, Any]) -> str | None:
    value = _text(obj, "currency")
    return value.upper() if value is not None and len(value) == 3 else None
