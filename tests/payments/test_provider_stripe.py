"""The Stripe adapter against spec-derived exchanges (PaymentIntents, Refunds, Events
as https://docs.stripe.com/api documents them) and ``Stripe-Signature`` headers minted
independently by the ``stripe`` package."""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import httpx2
import pytest
import stamina
import stripe as stripe_sdk

from soko.payments.providers.base import (
    NextActionKind,
    PaymentProvider,
    PaymentStart,
    ProviderError,
    ProviderStatus,
    RefundRequest,
    RefundStatus,
    RefundStatusReader,
    WebhookRejectedError,
)
from soko.payments.providers.http import HttpPolicy
from soko.payments.providers.stripe import StripeProvider, to_stripe_amount
from soko.platform.clock import ManualClock

SECRET_KEY = "sk_test_51Soko0000000000000000000000"
WEBHOOK_SECRET = "whsec_test_0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e"
REFERENCE = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"

# https://docs.stripe.com/api/payment_intents/object (the documented example, with
# Soko's reference in its metadata).
INTENT: dict[str, Any] = {
    "id": "pi_3MtwBwLkdIwHu7ix28a3tqPa",
    "object": "payment_intent",
    "amount": 2000,
    "amount_capturable": 0,
    "amount_details": {"tip": {}},
    "amount_received": 0,
    "application": None,
    "application_fee_amount": None,
    "automatic_payment_methods": {"enabled": True},
    "canceled_at": None,
    "cancellation_reason": None,
    "capture_method": "automatic",
    "client_secret": "pi_3MtwBwLkdIwHu7ix28a3tqPa_secret_YrKJUKribcBjcG8HVhfZluoGH",
    "confirmation_method": "automatic",
    "created": 1680800504,
    "currency": "usd",
    "customer": None,
    "description": None,
    "last_payment_error": None,
    "latest_charge": None,
    "livemode": False,
    "metadata": {"reference": REFERENCE},
    "next_action": None,
    "on_behalf_of": None,
    "payment_method": None,
    "payment_method_types": ["card", "link"],
    "processing": None,
    "receipt_email": None,
    "status": "requires_payment_method",
}


def intent(**changes: Any) -> dict[str, Any]:
    value = copy.deepcopy(INTENT)
    value.update(changes)
    return value


def event(
    event_type: str, obj: dict[str, Any], event_id: str = "evt_1NG8Du2eZvKYlo2CUI79vXWy"
) -> dict[str, Any]:
    # https://docs.stripe.com/api/events/object
    return {
        "id": event_id,
        "object": "event",
        "api_version": "2024-06-20",
        "created": 1893456000,
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": "req_2j3JvV5Zg0d1rT", "idempotency_key": REFERENCE},
        "type": event_type,
    }


@pytest.fixture(autouse=True)
def instant_retries() -> Iterator[None]:
    with stamina.set_testing(True, attempts=100, cap=True):
        yield


class Provider:
    """A Stripe adapter over a scripted transport."""

    def __init__(self, *answers: httpx2.Response | Exception, clock: ManualClock | None = None):
        self.answers = list(answers)
        self.requests: list[httpx2.Request] = []
        self.clock = clock or ManualClock()
        self.adapter = StripeProvider(
            secret_key=SECRET_KEY,
            webhook_secret=WEBHOOK_SECRET,
            policy=HttpPolicy(timeout_seconds=5, attempts=3, breaker_failures=10),
            clock=self.clock,
            transport=httpx2.MockTransport(self.handle),
        )

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def form(self, index: int = 0) -> dict[str, str]:
        request = self.requests[index]
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"
        pairs = parse_qsl(
            request.content.decode("ascii"), keep_blank_values=True, strict_parsing=True
        )
        assert len(pairs) == len(dict(pairs)), "no repeated form keys"
        return dict(pairs)


def start(**changes: Any) -> PaymentStart:
    values: dict[str, Any] = {
        "reference": REFERENCE,
        "amount_minor": 2000,
        "currency": "USD",
        "customer_email": "amina@example.com",
        "return_url": "https://shop.example/return",
    }
    values.update(changes)
    return PaymentStart(**values)


def test_it_is_a_payment_provider() -> None:
    assert isinstance(Provider().adapter, PaymentProvider)
    assert Provider().adapter.name == "stripe"


async def test_start_creates_a_payment_intent_with_the_reference_as_idempotency_key() -> None:
    p = Provider(httpx2.Response(200, json=INTENT))
    started = await p.adapter.start(start(description="Order group 12", metadata={"group": "g-1"}))

    request = p.requests[0]
    assert request.method == "POST"
    assert str(request.url) == "https://api.stripe.com/v1/payment_intents"
    assert request.headers["authorization"] == f"Bearer {SECRET_KEY}"
    assert request.headers["idempotency-key"] == REFERENCE
    assert p.form() == {
        "amount": "2000",
        "currency": "usd",
        "automatic_payment_methods[enabled]": "true",
        "metadata[group]": "g-1",
        "metadata[reference]": REFERENCE,
        "description": "Order group 12",
    }
    assert started.provider_payment_id == "pi_3MtwBwLkdIwHu7ix28a3tqPa"
    assert started.next_action is NextActionKind.client_secret
    assert started.client_secret == INTENT["client_secret"]
    assert started.url is None


async def test_caller_metadata_cannot_replace_the_reference() -> None:
    p = Provider(httpx2.Response(200, json=INTENT))
    await p.adapter.start(start(metadata={"reference": "someone-else"}))
    assert p.form()["metadata[reference]"] == REFERENCE


async def test_a_failed_start_is_retried_with_the_same_idempotency_key() -> None:
    p = Provider(
        httpx2.Response(500, json={"error": {"type": "api_error", "message": "oops"}}),
        httpx2.ConnectError("reset"),
        httpx2.Response(200, json=INTENT),
    )
    started = await p.adapter.start(start())
    assert started.provider_payment_id == INTENT["id"]
    assert [r.headers["idempotency-key"] for r in p.requests] == [REFERENCE] * 3
    assert len({r.content for r in p.requests}) == 1


async def test_a_declined_start_is_final() -> None:
    body = {
        "error": {
            "code": "amount_too_small",
            "message": "Amount must be at least 50 cents",
            "type": "invalid_request_error",
        }
    }
    p = Provider(httpx2.Response(400, json=body))
    with pytest.raises(ProviderError, match="Amount must be at least 50 cents") as failed:
        await p.adapter.start(start(amount_minor=10))
    assert failed.value.retryable is False
    assert len(p.requests) == 1


def test_amounts_in_stripes_units() -> None:
    assert to_stripe_amount(150_000, "KES") == 150_000
    assert to_stripe_amount(5_000, "UGX") == 5_000  # zero-decimal in ISO and Stripe
    assert to_stripe_amount(123_400, "MGA") == 1_234  # ISO: 2 decimals; Stripe: none
    with pytest.raises(ProviderError):
        to_stripe_amount(123_456, "MGA")
    assert to_stripe_amount(1_230, "KWD") == 1_230
    with pytest.raises(ProviderError):
        to_stripe_amount(1_235, "KWD")  # Stripe wants the last of three decimals at 0
    with pytest.raises(ProviderError):
        to_stripe_amount(100, "XYZ")


async def test_fetch_reads_a_succeeded_intent() -> None:
    p = Provider(
        httpx2.Response(
            200, json=intent(status="succeeded", amount_received=2000, latest_charge="ch_1")
        )
    )
    state = await p.adapter.fetch("pi_3MtwBwLkdIwHu7ix28a3tqPa", REFERENCE)
    request = p.requests[0]
    assert request.method == "GET"
    assert (
        str(request.url) == "https://api.stripe.com/v1/payment_intents/pi_3MtwBwLkdIwHu7ix28a3tqPa"
    )
    assert request.headers["authorization"] == f"Bearer {SECRET_KEY}"
    assert "idempotency-key" not in request.headers
    assert state.status is ProviderStatus.succeeded
    assert state.amount_minor == 2000
    assert state.currency == "USD"
    assert state.reference == REFERENCE
    assert state.provider_payment_id == INTENT["id"]


async def test_fetch_takes_the_amount_received_for_a_success() -> None:
    # What was captured, not what was asked, is what Soko compares with the payment.
    p = Provider(httpx2.Response(200, json=intent(status="succeeded", amount_received=1500)))
    state = await p.adapter.fetch(INTENT["id"], REFERENCE)
    assert state.amount_minor == 1500


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"status": "processing"}, ProviderStatus.pending),
        ({"status": "requires_payment_method"}, ProviderStatus.pending),
        ({"status": "requires_action"}, ProviderStatus.pending),
        ({"status": "requires_confirmation"}, ProviderStatus.pending),
        ({"status": "canceled", "cancellation_reason": "abandoned"}, ProviderStatus.abandoned),
        (
            {
                "status": "requires_payment_method",
                "last_payment_error": {
                    "code": "card_declined",
                    "decline_code": "insufficient_funds",
                    "message": "Your card has insufficient funds.",
                    "type": "card_error",
                },
            },
            ProviderStatus.failed,
        ),
    ],
)
async def test_fetch_maps_intent_statuses(
    changes: dict[str, Any], expected: ProviderStatus
) -> None:
    p = Provider(httpx2.Response(200, json=intent(**changes)))
    state = await p.adapter.fetch(INTENT["id"], REFERENCE)
    assert state.status is expected
    if expected is ProviderStatus.failed:
        assert state.failure_reason == "Your card has insufficient funds."
    if expected is ProviderStatus.abandoned:
        assert state.failure_reason == "abandoned"


async def test_fetch_refuses_an_unknown_status() -> None:
    p = Provider(httpx2.Response(200, json=intent(status="teleported")))
    with pytest.raises(ProviderError) as failed:
        await p.adapter.fetch(INTENT["id"], REFERENCE)
    assert failed.value.retryable is False


async def test_fetch_escapes_the_id_in_the_path() -> None:
    p = Provider(httpx2.Response(404, json={"error": {"message": "No such payment_intent"}}))
    with pytest.raises(ProviderError):
        await p.adapter.fetch("pi_1/../../v1/refunds", REFERENCE)
    assert p.requests[0].url.raw_path == b"/v1/payment_intents/pi_1%2F..%2F..%2Fv1%2Frefunds"


async def test_fetch_is_retried_on_a_503() -> None:
    p = Provider(httpx2.Response(503), httpx2.Response(200, json=intent(status="processing")))
    state = await p.adapter.fetch(INTENT["id"], REFERENCE)
    assert state.status is ProviderStatus.pending
    assert len(p.requests) == 2


async def test_refund_posts_with_its_own_idempotency_key() -> None:
    # https://docs.stripe.com/api/refunds/object
    answer = {
        "id": "re_1Nispe2eZvKYlo2Cd31jOCgZ",
        "object": "refund",
        "amount": 500,
        "charge": "ch_1NirD82eZvKYlo2CIvbtLWuY",
        "created": 1692942318,
        "currency": "usd",
        "metadata": {},
        "payment_intent": INTENT["id"],
        "reason": None,
        "status": "succeeded",
    }
    p = Provider(httpx2.Response(200, json=answer))
    result = await p.adapter.refund(
        RefundRequest(
            reference="0193a1b2-0000-7000-8000-00000000re01",
            provider_payment_id=INTENT["id"],
            payment_reference=REFERENCE,
            amount_minor=500,
            currency="USD",
            reason="order_cancelled",
        )
    )
    request = p.requests[0]
    assert request.method == "POST"
    assert str(request.url) == "https://api.stripe.com/v1/refunds"
    assert request.headers["authorization"] == f"Bearer {SECRET_KEY}"
    assert request.headers["idempotency-key"] == "0193a1b2-0000-7000-8000-00000000re01"
    assert p.form() == {
        "payment_intent": INTENT["id"],
        "amount": "500",
        "metadata[reference]": "0193a1b2-0000-7000-8000-00000000re01",
        "metadata[payment_reference]": REFERENCE,
        "metadata[reason]": "order_cancelled",
    }
    assert result.provider_refund_id == "re_1Nispe2eZvKYlo2Cd31jOCgZ"
    assert result.status is RefundStatus.succeeded


@pytest.mark.parametrize(
    ("stripe_status", "expected"),
    [("pending", RefundStatus.pending), ("requires_action", RefundStatus.pending),
     ("failed", RefundStatus.failed), ("canceled", RefundStatus.failed)],
)  # fmt: skip
async def test_refund_statuses(stripe_status: str, expected: RefundStatus) -> None:
    p = Provider(
        httpx2.Response(200, json={"id": "re_1", "object": "refund", "status": stripe_status})
    )
    result = await p.adapter.refund(RefundRequest("r-1", INTENT["id"], REFERENCE, 100, "USD"))
    assert result.status is expected


# -- webhooks ----------------------------------------------------------------------------


NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)
T = int(NOW.timestamp())


def sign(body: bytes, *, secret: str = WEBHOOK_SECRET, timestamp: int = T) -> str:
    """A header minted by Stripe's own library, not by the code under test."""
    return stripe_sdk.WebhookSignature.generate_signature_header(
        body.decode("utf-8"), secret, timestamp=timestamp
    )


SUCCEEDED = json.dumps(
    event("payment_intent.succeeded", intent(status="succeeded", amount_received=2000))
).encode()


def verify(body: bytes, header: str | None, now: dt.datetime = NOW) -> Any:
    headers = {} if header is None else {"stripe-signature": header}
    return Provider().adapter.verify_webhook(headers, body, now)


def test_a_signed_event_verifies_and_parses() -> None:
    parsed = verify(SUCCEEDED, sign(SUCCEEDED))
    assert parsed.provider == "stripe"
    assert parsed.event_id == "evt_1NG8Du2eZvKYlo2CUI79vXWy"
    assert parsed.event_type == "payment_intent.succeeded"
    assert parsed.reference == REFERENCE
    assert parsed.provider_payment_id == INTENT["id"]
    assert parsed.status is ProviderStatus.succeeded
    assert parsed.amount_minor == 2000
    assert parsed.currency == "USD"
    assert parsed.occurred_at == dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def test_any_of_several_v1_signatures_may_match() -> None:
    # Stripe sends one v1 per active secret while a secret is rolled.
    valid = sign(SUCCEEDED).split(",v1=")[1]
    other = sign(SUCCEEDED, secret="whsec_the_old_one").split(",v1=")[1]
    v0 = "6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39"
    header = f"t={T},v1={other},v1={valid},v0={v0}"
    assert verify(SUCCEEDED, header).event_id.startswith("evt_")
    header = f"t={T},v1={other},v1={'0' * 64}"
    with pytest.raises(WebhookRejectedError):
        verify(SUCCEEDED, header)


def test_a_wrong_secret_is_rejected() -> None:
    with pytest.raises(WebhookRejectedError):
        verify(SUCCEEDED, sign(SUCCEEDED, secret="whsec_someone_else"))


def test_the_whole_whsec_secret_is_the_key() -> None:
    # Keying with the part after "whsec_" (a classic mistake) must not verify.
    with pytest.raises(WebhookRejectedError):
        verify(SUCCEEDED, sign(SUCCEEDED, secret=WEBHOOK_SECRET.removeprefix("whsec_")))


@pytest.mark.parametrize("offset", [-301, 301, -3600, 86400])
def test_a_timestamp_outside_five_minutes_either_way_is_rejected(offset: int) -> None:
    with pytest.raises(WebhookRejectedError, match="tolerance"):
        verify(SUCCEEDED, sign(SUCCEEDED, timestamp=T + offset))


@pytest.mark.parametrize("offset", [-300, 0, 300])
def test_a_timestamp_within_five_minutes_is_accepted(offset: int) -> None:
    assert (
        verify(SUCCEEDED, sign(SUCCEEDED, timestamp=T + offset)).status is ProviderStatus.succeeded
    )


def test_the_signature_is_checked_on_the_raw_bytes() -> None:
    # What Stripe sent: pretty-printed, keys in its order, a non-ASCII name written as
    # a \u escape and another as raw UTF-8. Re-serialising it changes the bytes.
    raw = (
        '{\n  "id": "evt_3Raw",\n  "object": "event",\n  "type": "payment_intent.succeeded",'
        '\n  "created": 1893456000,\n  "data": {\n    "object": {\n      "id": "pi_raw",'
        '\n      "object": "payment_intent",\n      "amount": 2000,\n      "amount_received": 2000,'
        '\n      "currency": "kes",\n      "status": "succeeded",'
        '\n      "description": "Caf\\u00e9 order for W\u00e4chter",'
        f'\n      "metadata": {{"reference": "{REFERENCE}"}}\n    }}\n  }}\n}}\n'
    ).encode()
    header = sign(raw)
    parsed = verify(raw, header)
    assert parsed.event_id == "evt_3Raw"
    assert parsed.currency == "KES"
    reserialised = json.dumps(json.loads(raw)).encode()
    assert reserialised != raw
    with pytest.raises(WebhookRejectedError):
        verify(reserialised, header)
    compact = json.dumps(json.loads(raw), separators=(",", ":"), ensure_ascii=False).encode()
    with pytest.raises(WebhookRejectedError):
        verify(compact, header)


def test_a_tampered_body_is_rejected() -> None:
    header = sign(SUCCEEDED)
    tampered = SUCCEEDED.replace(b'"amount": 2000', b'"amount": 9000')
    assert tampered != SUCCEEDED
    with pytest.raises(WebhookRejectedError):
        verify(tampered, header)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "v1=abc",
        f"t={T}",
        f"t=abc,v1={'a' * 64}",
        f"t={T},t={T},v1={'a' * 64}",
        f"t={T},v0={'a' * 64}",
        f"t={T}," + ",".join(f"v1={i:064x}" for i in range(20)),
        f"t={T},v1=\u00e9\u00e9",
    ],
)
def test_malformed_signature_headers_are_rejected(header: str | None) -> None:
    with pytest.raises(WebhookRejectedError):
        verify(SUCCEEDED, header)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"id": "evt_1", "type": "x"}',
        b'{"id": "x_1", "type": "x", "data": {"object": {}}}',
        b"\xff\xfe",
        # A time or an amount no event can have: refused, not a 500 downstream.
        json.dumps({**event("payment_intent.succeeded", intent()), "created": 10**20}).encode(),
        json.dumps(
            event("payment_intent.succeeded", intent(amount=10**30, amount_received=10**30))
        ).encode(),
        json.dumps(
            event("payment_intent.succeeded", intent(amount=-5, amount_received=-5))
        ).encode(),
    ],
)
def test_signed_bodies_that_are_not_events_are_rejected(body: bytes) -> None:
    header = (
        f"t={T},v1="
        + __import__("hmac")
        .new(WEBHOOK_SECRET.encode(), f"{T}.".encode() + body, "sha256")
        .hexdigest()
    )
    with pytest.raises(WebhookRejectedError):
        verify(body, header)


@pytest.mark.parametrize(
    ("event_type", "status"),
    [
        ("payment_intent.payment_failed", ProviderStatus.failed),
        ("payment_intent.processing", ProviderStatus.pending),
        ("payment_intent.canceled", ProviderStatus.abandoned),
        ("payment_intent.created", None),
    ],
)
def test_intent_events(event_type: str, status: ProviderStatus | None) -> None:
    body = json.dumps(event(event_type, intent())).encode()
    parsed = verify(body, sign(body))
    assert parsed.status is status
    assert parsed.reference == REFERENCE
    assert parsed.provider_payment_id == INTENT["id"]


def test_a_charge_refunded_event_is_kept_without_a_payment_status() -> None:
    # https://docs.stripe.com/api/charges/object
    charge = {
        "id": "ch_3MmlLrLkdIwHu7ix0snN0B15",
        "object": "charge",
        "amount": 2000,
        "amount_captured": 2000,
        "amount_refunded": 500,
        "currency": "usd",
        "metadata": {"reference": REFERENCE},
        "paid": True,
        "payment_intent": INTENT["id"],
        "refunded": False,
        "status": "succeeded",
    }
    body = json.dumps(event("charge.refunded", charge, "evt_charge_refunded")).encode()
    parsed = verify(body, sign(body))
    assert parsed.event_type == "charge.refunded"
    assert parsed.status is None
    assert parsed.provider_payment_id == INTENT["id"]
    assert parsed.amount_minor == 500
    assert parsed.reference == REFERENCE


def test_readiness_reports_the_circuit() -> None:
    assert Provider().adapter.readiness() == {
        "status": "up",
        "critical": False,
        "circuit": "closed",
        "consecutive_failures": 0,
    }


def test_it_needs_both_secrets() -> None:
    with pytest.raises(ValueError):
        StripeProvider(secret_key="", webhook_secret=WEBHOOK_SECRET, clock=ManualClock())
    with pytest.raises(ValueError):
        StripeProvider(secret_key=SECRET_KEY, webhook_secret="", clock=ManualClock())


async def test_an_idempotency_conflict_is_waited_out() -> None:
    # https://docs.stripe.com/error-low-level#idempotency: a keyed request still being
    # processed answers 409; repeating it gets the first request's answer.
    conflict = {
        "error": {
            "code": "idempotency_key_in_use",
            "message": "There is currently another in-progress request using this "
            "Idempotent Key (that probably means you submitted twice, and the other is "
            "still going through).",
            "type": "invalid_request_error",
        }
    }
    p = Provider(httpx2.Response(409, json=conflict), httpx2.Response(200, json=INTENT))
    started = await p.adapter.start(start())
    assert started.provider_payment_id == INTENT["id"]
    assert len(p.requests) == 2


async def test_stripe_should_retry_false_is_final() -> None:
    p = Provider(
        httpx2.Response(
            500,
            headers={"Stripe-Should-Retry": "false"},
            json={"error": {"type": "api_error", "message": "An unknown error occurred"}},
        )
    )
    with pytest.raises(ProviderError) as failed:
        await p.adapter.start(start())
    assert failed.value.retryable is False
    assert len(p.requests) == 1


async def test_a_pending_refund_is_followed_up_by_reading_it() -> None:
    # https://docs.stripe.com/api/refunds/retrieve
    p = Provider(
        httpx2.Response(503),
        httpx2.Response(200, json={"id": "re_1", "object": "refund", "status": "succeeded"}),
    )
    assert isinstance(p.adapter, RefundStatusReader)
    result = await p.adapter.refund_status(
        "re_1", RefundRequest("r-1", INTENT["id"], REFERENCE, 500, "USD")
    )
    assert [(r.method, str(r.url)) for r in p.requests] == [
        ("GET", "https://api.stripe.com/v1/refunds/re_1"),
        ("GET", "https://api.stripe.com/v1/refunds/re_1"),
    ]
    assert p.requests[0].headers["authorization"] == f"Bearer {SECRET_KEY}"
    assert result.provider_refund_id == "re_1"
    assert result.status is RefundStatus.succeeded


async def test_fetch_refuses_an_intent_of_another_payment_and_an_empty_id() -> None:
    p = Provider(httpx2.Response(200, json=intent(metadata={"reference": "another"})))
    with pytest.raises(ProviderError, match="another payment") as failed:
        await p.adapter.fetch(INTENT["id"], REFERENCE)
    assert failed.value.retryable is False
    with pytest.raises(ProviderError) as failed:
        await p.adapter.fetch("", REFERENCE)
    assert failed.value.retryable is False
    assert len(p.requests) == 1
