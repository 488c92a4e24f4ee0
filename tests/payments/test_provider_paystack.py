"""The Paystack adapter against spec-derived exchanges
(https://paystack.com/docs/api/transaction/, /refund/) and its webhook signature
(https://paystack.com/docs/payments/webhooks/)."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
import stamina

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
from soko.payments.providers.paystack import PaystackProvider
from soko.platform.clock import ManualClock

SECRET_KEY = "sk_test_5f1e2d3c4b5a69788796a5b4c3d2e1f0a9b8c7d6"
REFERENCE = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def instant_retries() -> Iterator[None]:
    with stamina.set_testing(True, attempts=100, cap=True):
        yield


class Provider:
    def __init__(self, *answers: httpx2.Response | Exception, secret_key: str = SECRET_KEY):
        self.answers = list(answers)
        self.requests: list[httpx2.Request] = []
        self.adapter = PaystackProvider(
            secret_key=secret_key,
            policy=HttpPolicy(timeout_seconds=5, attempts=3, breaker_failures=10),
            clock=ManualClock(),
            transport=httpx2.MockTransport(self.handle),
        )

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def body(self, index: int = 0) -> Any:
        request = self.requests[index]
        assert request.headers["content-type"] == "application/json"
        return json.loads(request.content)


def start(**changes: Any) -> PaymentStart:
    values: dict[str, Any] = {
        "reference": REFERENCE,
        "amount_minor": 500_000,
        "currency": "NGN",
        "customer_email": "chidi@example.com",
        "return_url": "https://shop.example/return",
    }
    values.update(changes)
    return PaymentStart(**values)


# https://paystack.com/docs/api/transaction/#initialize (response), with Soko's reference.
INITIALIZED = {
    "status": True,
    "message": "Authorization URL created",
    "data": {
        "authorization_url": "https://checkout.paystack.com/3ni8kdavz62431k",
        "access_code": "3ni8kdavz62431k",
        "reference": REFERENCE,
    },
}


def verified(**changes: Any) -> dict[str, Any]:
    # https://paystack.com/docs/api/transaction/#verify (response)
    data: dict[str, Any] = {
        "id": 4099260516,
        "domain": "test",
        "status": "success",
        "reference": REFERENCE,
        "receipt_number": None,
        "amount": 500_000,
        "message": None,
        "gateway_response": "Successful",
        "paid_at": "2030-01-01T11:58:02.000Z",
        "created_at": "2030-01-01T11:57:24.000Z",
        "channel": "card",
        "currency": "NGN",
        "ip_address": "197.210.54.33",
        "metadata": {"reference": REFERENCE},
        "fees": 7600,
        "customer": {"id": 181873746, "email": "chidi@example.com"},
        "requested_amount": 500_000,
    }
    data.update(changes)
    return {"status": True, "message": "Verification successful", "data": data}


def test_it_is_a_payment_provider() -> None:
    assert isinstance(Provider().adapter, PaymentProvider)


async def test_start_initializes_a_transaction() -> None:
    p = Provider(httpx2.Response(200, json=INITIALIZED))
    started = await p.adapter.start(start(metadata={"group": "g-1"}))
    request = p.requests[0]
    assert request.method == "POST"
    assert str(request.url) == "https://api.paystack.co/transaction/initialize"
    assert request.headers["authorization"] == f"Bearer {SECRET_KEY}"
    assert "idempotency-key" not in request.headers
    body = p.body()
    assert body == {
        "email": "chidi@example.com",
        "amount": "500000",
        "currency": "NGN",
        "reference": REFERENCE,
        "callback_url": "https://shop.example/return",
        "metadata": body["metadata"],
    }
    assert json.loads(body["metadata"]) == {"group": "g-1", "reference": REFERENCE}
    assert started.provider_payment_id == REFERENCE
    assert started.next_action is NextActionKind.redirect
    assert started.url == "https://checkout.paystack.com/3ni8kdavz62431k"


async def test_start_without_an_email_is_refused_before_any_call() -> None:
    p = Provider()
    with pytest.raises(ProviderError, match="email") as refused:
        await p.adapter.start(start(customer_email=None))
    assert refused.value.retryable is False
    assert p.requests == []


async def test_start_is_not_retried() -> None:
    p = Provider(httpx2.Response(503), httpx2.Response(200, json=INITIALIZED))
    with pytest.raises(ProviderError) as failed:
        await p.adapter.start(start())
    assert failed.value.retryable is True
    assert len(p.requests) == 1


async def test_a_duplicate_reference_is_a_final_error() -> None:
    p = Provider(
        httpx2.Response(400, json={"status": False, "message": "Duplicate Transaction Reference"})
    )
    with pytest.raises(ProviderError, match="Duplicate Transaction Reference") as failed:
        await p.adapter.start(start())
    assert failed.value.retryable is False


async def test_an_answer_for_another_reference_is_refused() -> None:
    other = json.loads(json.dumps(INITIALIZED))
    other["data"]["reference"] = "someone-else"
    p = Provider(httpx2.Response(200, json=other))
    with pytest.raises(ProviderError):
        await p.adapter.start(start())


async def test_fetch_verifies_by_reference() -> None:
    p = Provider(httpx2.Response(200, json=verified()))
    state = await p.adapter.fetch(REFERENCE, REFERENCE)
    request = p.requests[0]
    assert request.method == "GET"
    assert str(request.url) == f"https://api.paystack.co/transaction/verify/{REFERENCE}"
    assert request.headers["authorization"] == f"Bearer {SECRET_KEY}"
    assert state.status is ProviderStatus.succeeded
    assert state.amount_minor == 500_000
    assert state.currency == "NGN"
    assert state.reference == REFERENCE
    assert state.failure_reason is None


@pytest.mark.parametrize(
    ("paystack", "expected"),
    [
        ("failed", ProviderStatus.failed),
        ("reversed", ProviderStatus.failed),
        ("abandoned", ProviderStatus.abandoned),
        ("ongoing", ProviderStatus.pending),
        ("pending", ProviderStatus.pending),
        ("processing", ProviderStatus.pending),
        ("queued", ProviderStatus.pending),
        ("something_new", ProviderStatus.pending),
    ],
)
async def test_fetch_maps_statuses(paystack: str, expected: ProviderStatus) -> None:
    p = Provider(httpx2.Response(200, json=verified(status=paystack, gateway_response="Declined")))
    state = await p.adapter.fetch(REFERENCE, REFERENCE)
    assert state.status is expected
    if expected in (ProviderStatus.failed, ProviderStatus.abandoned):
        assert state.failure_reason == "Declined"


async def test_fetch_is_retried_after_a_timeout() -> None:
    p = Provider(httpx2.ReadTimeout("slow"), httpx2.Response(200, json=verified()))
    state = await p.adapter.fetch(REFERENCE, REFERENCE)
    assert state.status is ProviderStatus.succeeded
    assert len(p.requests) == 2


async def test_fetch_of_an_unknown_reference_is_a_final_error() -> None:
    p = Provider(
        httpx2.Response(400, json={"status": False, "message": "Transaction reference not found"})
    )
    with pytest.raises(ProviderError, match="not found") as failed:
        await p.adapter.fetch("nope", "nope")
    assert failed.value.retryable is False


async def test_fetch_refuses_an_answer_without_amount() -> None:
    body = verified()
    del body["data"]["amount"]
    p = Provider(httpx2.Response(200, json=body))
    with pytest.raises(ProviderError):
        await p.adapter.fetch(REFERENCE, REFERENCE)


REFUNDED = {
    # https://paystack.com/docs/api/refund/#create (response)
    "status": True,
    "message": "Refund has been queued for processing",
    "data": {
        "transaction": {"id": 4099260516, "reference": REFERENCE, "amount": 500_000},
        "integration": 412829,
        "deducted_amount": 0,
        "channel": None,
        "merchant_note": "Soko refund r-1",
        "customer_note": "Refund for transaction " + REFERENCE,
        "status": "pending",
        "refunded_by": "ops@shop.example",
        "expected_at": "2030-01-11T12:00:00.000Z",
        "currency": "NGN",
        "domain": "test",
        "amount": 200_000,
        "fully_deducted": False,
        "id": 3018284,
    },
}


async def test_refund_posts_the_transaction_and_amount_once() -> None:
    p = Provider(httpx2.Response(200, json=REFUNDED))
    result = await p.adapter.refund(
        RefundRequest(
            reference="r-1",
            provider_payment_id=REFERENCE,
            payment_reference=REFERENCE,
            amount_minor=200_000,
            currency="NGN",
            reason="order_cancelled",
        )
    )
    request = p.requests[0]
    assert request.method == "POST"
    assert str(request.url) == "https://api.paystack.co/refund"
    assert request.headers["authorization"] == f"Bearer {SECRET_KEY}"
    assert p.body() == {
        "transaction": REFERENCE,
        "amount": 200_000,
        "currency": "NGN",
        "merchant_note": "Soko refund r-1: order_cancelled",
    }
    assert result.provider_refund_id == "3018284"
    assert result.status is RefundStatus.pending


async def test_a_refund_that_timed_out_is_not_repeated_blindly() -> None:
    p = Provider(httpx2.ReadTimeout("slow"), httpx2.Response(200, json=REFUNDED))
    with pytest.raises(ProviderError) as failed:
        await p.adapter.refund(RefundRequest("r-1", REFERENCE, REFERENCE, 100, "NGN"))
    assert failed.value.retryable is False
    assert len(p.requests) == 1


@pytest.mark.parametrize(
    ("paystack", "expected"),
    [("processed", RefundStatus.succeeded), ("failed", RefundStatus.failed),
     ("needs-attention", RefundStatus.pending)],
)  # fmt: skip
async def test_refund_statuses(paystack: str, expected: RefundStatus) -> None:
    body = json.loads(json.dumps(REFUNDED))
    body["data"]["status"] = paystack
    p = Provider(httpx2.Response(200, json=body))
    result = await p.adapter.refund(RefundRequest("r-1", REFERENCE, REFERENCE, 100, "NGN"))
    assert result.status is expected


# -- webhooks ----------------------------------------------------------------------------

# Derived from Paystack's documented scheme (hex HMAC-SHA512 of the raw body keyed with
# the secret key), not published by Paystack: the "Inbound payment webhooks" vector in
# the project's shared test vectors (vectors/README.md), copied here.
VECTOR_KEY = "sk_test_xxx"
VECTOR_BODY = b'{"event":"charge.success","data":{"reference":"ref_123","amount":50000}}'
VECTOR_SIGNATURE = (
    "dcefbd4ec43483a7b640f988c5dfb15a206fec6b5548548dd24b61bd7223e528"
    "e3d66592adcc84f89c7fbe4ff3330b998dcc8fdd29e8df043a44828596746373"
)


def sign(body: bytes, key: str = SECRET_KEY) -> str:
    return hmac.new(key.encode(), body, hashlib.sha512).hexdigest()


def verify(body: bytes, signature: str | None, key: str = SECRET_KEY) -> Any:
    headers = {} if signature is None else {"x-paystack-signature": signature}
    return Provider(secret_key=key).adapter.verify_webhook(headers, body, NOW)


def test_the_vector_verifies() -> None:
    parsed = verify(VECTOR_BODY, VECTOR_SIGNATURE, key=VECTOR_KEY)
    assert parsed.provider == "paystack"
    assert parsed.event_type == "charge.success"
    assert parsed.reference == "ref_123"
    assert parsed.provider_payment_id == "ref_123"
    assert parsed.status is ProviderStatus.succeeded
    assert parsed.amount_minor == 50000
    assert parsed.currency is None
    assert parsed.event_id.startswith("psk_")


def test_the_vector_with_the_wrong_key_is_rejected() -> None:
    with pytest.raises(WebhookRejectedError):
        verify(VECTOR_BODY, VECTOR_SIGNATURE, key=SECRET_KEY)


def test_a_tampered_body_is_rejected() -> None:
    tampered = VECTOR_BODY.replace(b"50000", b"90000")
    with pytest.raises(WebhookRejectedError):
        verify(tampered, VECTOR_SIGNATURE, key=VECTOR_KEY)


@pytest.mark.parametrize("signature", [None, "", "not-hex", VECTOR_SIGNATURE[:-2], "\u00e9" * 128])
def test_a_missing_or_malformed_signature_is_rejected(signature: str | None) -> None:
    with pytest.raises(WebhookRejectedError):
        verify(VECTOR_BODY, signature, key=VECTOR_KEY)


def test_upper_case_hex_is_the_same_signature() -> None:
    assert verify(VECTOR_BODY, VECTOR_SIGNATURE.upper(), key=VECTOR_KEY).reference == "ref_123"


def test_the_signature_is_checked_on_the_raw_bytes() -> None:
    raw = (
        b'{ "event": "charge.success",\n  "data": { "id": 302961, "status": "success", '
        b'"reference": "ref_\\u00e9", "amount": 10000, "currency": "NGN" } }'
    )
    signature = sign(raw)
    assert verify(raw, signature).reference == "ref_\u00e9"
    reserialised = json.dumps(json.loads(raw), separators=(",", ":")).encode()
    with pytest.raises(WebhookRejectedError):
        verify(reserialised, signature)


def charge(event: str = "charge.success", **data: Any) -> bytes:
    # https://paystack.com/docs/payments/webhooks/#charge-success (trimmed)
    values: dict[str, Any] = {
        "id": 302961,
        "domain": "live",
        "status": "success",
        "reference": REFERENCE,
        "amount": 500_000,
        "gateway_response": "Approved",
        "paid_at": "2030-01-01T11:59:50.000Z",
        "created_at": "2030-01-01T11:59:00.000Z",
        "channel": "card",
        "currency": "NGN",
    }
    values.update(data)
    return json.dumps({"event": event, "data": values}).encode()


def test_a_replay_is_the_same_event_and_a_new_state_is_another() -> None:
    body = charge()
    first = verify(body, sign(body))
    assert first.status is ProviderStatus.succeeded
    assert first.currency == "NGN"
    assert first.occurred_at == dt.datetime(2030, 1, 1, 11, 59, 50, tzinfo=dt.UTC)
    assert verify(body, sign(body)).event_id == first.event_id
    # The same identifying fields in another byte order: still the same delivery.
    reordered = json.dumps(dict(reversed(list(json.loads(body).items())))).encode()
    assert verify(reordered, sign(reordered)).event_id == first.event_id
    failed = charge("charge.failed", status="failed")
    assert verify(failed, sign(failed)).event_id != first.event_id
    assert verify(failed, sign(failed)).status is ProviderStatus.failed
    other = charge(id=302962, reference="another")
    assert verify(other, sign(other)).event_id != first.event_id


def test_refund_events_name_the_refunded_transaction() -> None:
    body = json.dumps(
        {
            "event": "refund.processed",
            "data": {
                "status": "processed",
                "transaction_reference": REFERENCE,
                "refund_reference": "1234567",
                "amount": 200_000,
                "currency": "NGN",
                "id": 3018284,
            },
        }
    ).encode()
    parsed = verify(body, sign(body))
    assert parsed.event_type == "refund.processed"
    assert parsed.status is None
    assert parsed.reference == REFERENCE
    assert parsed.amount_minor == 200_000


@pytest.mark.parametrize("body", [b"nope", b"[]", b'{"event": "charge.success"}', b'{"data": {}}'])
def test_signed_bodies_that_are_not_events_are_rejected(body: bytes) -> None:
    with pytest.raises(WebhookRejectedError):
        verify(body, sign(body))


async def test_a_pending_refund_is_followed_up_by_reading_it() -> None:
    # https://paystack.com/docs/api/refund/#fetch
    processed = json.loads(json.dumps(REFUNDED))
    processed["message"] = "Refund retrieved"
    processed["data"]["status"] = "processed"
    p = Provider(httpx2.Response(502), httpx2.Response(200, json=processed))
    assert isinstance(p.adapter, RefundStatusReader)
    result = await p.adapter.refund_status(
        "3018284", RefundRequest("r-1", REFERENCE, REFERENCE, 200_000, "NGN")
    )
    assert [(r.method, str(r.url)) for r in p.requests] == [
        ("GET", "https://api.paystack.co/refund/3018284"),
        ("GET", "https://api.paystack.co/refund/3018284"),
    ]
    assert p.requests[1].headers["authorization"] == f"Bearer {SECRET_KEY}"
    assert result.provider_refund_id == "3018284"
    assert result.status is RefundStatus.succeeded


async def test_fetch_refuses_another_transaction_and_an_empty_reference() -> None:
    p = Provider(httpx2.Response(200, json=verified(reference="someone-else")))
    with pytest.raises(ProviderError, match="another reference"):
        await p.adapter.fetch(REFERENCE, REFERENCE)
    with pytest.raises(ProviderError):
        await p.adapter.fetch("", "")
    assert len(p.requests) == 1
