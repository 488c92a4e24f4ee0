"""The Flutterwave v3 adapter against spec-derived exchanges
(https://developer.flutterwave.com/v3.0/reference: Standard payments, verify by
reference, refunds) and its ``verif-hash`` webhook check."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from decimal import Decimal
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
from soko.payments.providers.flutterwave import FlutterwaveProvider, to_major, to_minor
from soko.payments.providers.http import HttpPolicy
from soko.platform.clock import ManualClock

SECRET_KEY = "FLWSECK_TEST-6e2b0ad9f5c5e1b0a8c7d6e5f4a3b2c1-X"
SECRET_HASH = "soko-flw-hash-4b1f0c2e9d8a7b6c"
REFERENCE = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def instant_retries() -> Iterator[None]:
    with stamina.set_testing(True, attempts=100, cap=True):
        yield


class Provider:
    def __init__(self, *answers: httpx2.Response | Exception):
        self.answers = list(answers)
        self.requests: list[httpx2.Request] = []
        self.adapter = FlutterwaveProvider(
            secret_key=SECRET_KEY,
            secret_hash=SECRET_HASH,
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
        "amount_minor": 1250,
        "currency": "KES",
        "customer_email": "wanjiru@example.com",
        "return_url": "https://shop.example/return",
    }
    values.update(changes)
    return PaymentStart(**values)


HOSTED_LINK = {
    "status": "success",
    "message": "Hosted Link",
    "data": {"link": "https://checkout.flutterwave.com/v3/hosted/pay/flwlnk-01j8hkejppgm"},
}


def verified(**changes: Any) -> dict[str, Any]:
    # https://developer.flutterwave.com/v3.0/reference/verify-transaction-with-tx_ref
    data: dict[str, Any] = {
        "id": 4975363,
        "tx_ref": REFERENCE,
        "flw_ref": "FLW-MOCK-72d0f3d2ad3f4dbd6ae3f1b7d4a2c1e0",
        "device_fingerprint": "a42937f4a73ce8bb8b8df14e63a2df31",
        "amount": 12.5,
        "currency": "KES",
        "charged_amount": 12.5,
        "app_fee": 0.35,
        "merchant_fee": 0,
        "processor_response": "Approved. Successful",
        "auth_model": "VBVSECURECODE",
        "ip": "54.75.161.64",
        "narration": "CARD Transaction ",
        "status": "successful",
        "payment_type": "card",
        "created_at": "2030-01-01T11:58:18.000Z",
        "account_id": 20937,
        "amount_settled": 12.15,
        "customer": {"id": 2402336, "email": "wanjiru@example.com"},
    }
    data.update(changes)
    return {"status": "success", "message": "Transaction fetched successfully", "data": data}


def raw_json(value: Any) -> httpx2.Response:
    """An answer whose numbers are written exactly as given (12.5, not 12.50)."""
    return httpx2.Response(
        200, content=json.dumps(value).encode(), headers={"content-type": "application/json"}
    )


def test_it_is_a_payment_provider() -> None:
    assert isinstance(Provider().adapter, PaymentProvider)


def test_amounts_convert_exactly_between_minor_and_major_units() -> None:
    assert to_major(1250, "KES") == "12.50"
    assert to_major(5, "NGN") == "0.05"
    assert to_major(5000, "UGX") == "5000"
    assert to_major(1234, "KWD") == "1.234"
    assert to_minor(Decimal("12.5"), "KES") == 1250
    assert to_minor(100, "NGN") == 10000
    assert to_minor("1200.00", "NGN") == 120000
    assert to_minor(Decimal("5000"), "UGX") == 5000
    with pytest.raises(ValueError):
        to_minor(Decimal("12.505"), "KES")
    with pytest.raises(ValueError):
        to_minor(Decimal("5000.5"), "UGX")
    with pytest.raises(ValueError):
        to_minor(True, "KES")
    with pytest.raises(ValueError):
        to_minor(None, "KES")


async def test_start_creates_a_hosted_payment_in_major_units() -> None:
    p = Provider(httpx2.Response(200, json=HOSTED_LINK))
    started = await p.adapter.start(start(description="Order group 12", metadata={"group": "g-1"}))
    request = p.requests[0]
    assert request.method == "POST"
    assert str(request.url) == "https://api.flutterwave.com/v3/payments"
    assert request.headers["authorization"] == f"Bearer {SECRET_KEY}"
    assert p.body() == {
        "tx_ref": REFERENCE,
        "amount": "12.50",
        "currency": "KES",
        "redirect_url": "https://shop.example/return",
        "customer": {"email": "wanjiru@example.com"},
        "meta": {"group": "g-1", "reference": REFERENCE},
        "customizations": {"description": "Order group 12"},
    }
    assert started.provider_payment_id == REFERENCE
    assert started.next_action is NextActionKind.redirect
    assert started.url == HOSTED_LINK["data"]["link"]  # type: ignore[index]


async def test_start_without_an_email_is_refused_before_any_call() -> None:
    p = Provider()
    with pytest.raises(ProviderError, match="email") as refused:
        await p.adapter.start(start(customer_email=None))
    assert refused.value.retryable is False
    assert p.requests == []


async def test_start_is_sent_once() -> None:
    p = Provider(httpx2.Response(503), httpx2.Response(200, json=HOSTED_LINK))
    with pytest.raises(ProviderError) as failed:
        await p.adapter.start(start())
    assert failed.value.retryable is True
    assert len(p.requests) == 1


async def test_an_error_answer_is_final_and_explained() -> None:
    p = Provider(
        httpx2.Response(
            400, json={"status": "error", "message": "Invalid currency provided", "data": None}
        )
    )
    with pytest.raises(ProviderError, match="Invalid currency provided") as failed:
        await p.adapter.start(start())
    assert failed.value.retryable is False


async def test_fetch_verifies_by_tx_ref_and_converts_the_amount_back() -> None:
    p = Provider(raw_json(verified()))
    state = await p.adapter.fetch(REFERENCE, REFERENCE)
    request = p.requests[0]
    assert request.method == "GET"
    assert request.url.path == "/v3/transactions/verify_by_reference"
    assert dict(request.url.params) == {"tx_ref": REFERENCE}
    assert request.headers["authorization"] == f"Bearer {SECRET_KEY}"
    assert state.status is ProviderStatus.succeeded
    assert state.amount_minor == 1250
    assert state.currency == "KES"
    assert state.reference == REFERENCE


@pytest.mark.parametrize(
    ("flutterwave", "expected"),
    [
        ("failed", ProviderStatus.failed),
        ("pending", ProviderStatus.pending),
        ("cancelled", ProviderStatus.abandoned),
        ("SUCCESSFUL", ProviderStatus.succeeded),
        ("brand-new", ProviderStatus.pending),
    ],
)
async def test_fetch_maps_statuses(flutterwave: str, expected: ProviderStatus) -> None:
    p = Provider(raw_json(verified(status=flutterwave, processor_response="Declined")))
    state = await p.adapter.fetch(REFERENCE, REFERENCE)
    assert state.status is expected
    if expected in (ProviderStatus.failed, ProviderStatus.abandoned):
        assert state.failure_reason == "Declined"


async def test_fetch_refuses_an_inexact_amount() -> None:
    p = Provider(httpx2.Response(200, content=json.dumps(verified()).replace("12.5", "12.505")))
    with pytest.raises(ProviderError, match="amount") as failed:
        await p.adapter.fetch(REFERENCE, REFERENCE)
    assert failed.value.retryable is False


async def test_fetch_refuses_another_transaction() -> None:
    p = Provider(raw_json(verified(tx_ref="someone-else")))
    with pytest.raises(ProviderError, match="tx_ref"):
        await p.adapter.fetch(REFERENCE, REFERENCE)


async def test_fetch_is_retried_after_a_connection_error() -> None:
    p = Provider(httpx2.ConnectError("reset"), raw_json(verified()))
    assert (await p.adapter.fetch(REFERENCE, REFERENCE)).status is ProviderStatus.succeeded
    assert len(p.requests) == 2


REFUND_ANSWER = {
    # https://developer.flutterwave.com/v3.0/reference/create-a-refund (response)
    "status": "success",
    "message": "Transaction refund initiated",
    "data": {
        "id": 75923,
        "account_id": 20937,
        "tx_id": 4975363,
        "flw_ref": "URF_1577867664541_3572735",
        "wallet_id": 74882,
        "amount_refunded": 5,
        "status": "completed",
        "destination": "payment_source",
        "meta": {"source": "availablebalance"},
        "created_at": "2030-01-01T12:00:00.000Z",
    },
}


async def test_refund_by_numeric_transaction_id() -> None:
    p = Provider(httpx2.Response(200, json=REFUND_ANSWER))
    result = await p.adapter.refund(
        RefundRequest(
            reference="r-1",
            provider_payment_id="4975363",
            payment_reference=REFERENCE,
            amount_minor=500,
            currency="KES",
            reason="dispute",
        )
    )
    request = p.requests[0]
    assert request.method == "POST"
    assert str(request.url) == "https://api.flutterwave.com/v3/transactions/4975363/refund"
    assert request.headers["authorization"] == f"Bearer {SECRET_KEY}"
    assert p.body() == {"amount": "5.00", "comments": "Soko refund r-1: dispute"}
    assert result.provider_refund_id == "75923"
    assert result.status is RefundStatus.succeeded


async def test_refund_looks_up_the_transaction_id_from_the_tx_ref() -> None:
    pending = json.loads(json.dumps(REFUND_ANSWER))
    pending["data"]["status"] = "pending"
    p = Provider(raw_json(verified()), httpx2.Response(200, json=pending))
    result = await p.adapter.refund(RefundRequest("r-2", REFERENCE, REFERENCE, 1250, "KES"))
    assert [(r.method, r.url.path) for r in p.requests] == [
        ("GET", "/v3/transactions/verify_by_reference"),
        ("POST", "/v3/transactions/4975363/refund"),
    ]
    assert p.body(1) == {"amount": "12.50", "comments": "Soko refund r-2"}
    assert result.status is RefundStatus.pending


async def test_a_refund_that_got_no_answer_is_not_repeated_blindly() -> None:
    p = Provider(httpx2.ReadTimeout("slow"), httpx2.Response(200, json=REFUND_ANSWER))
    with pytest.raises(ProviderError) as failed:
        await p.adapter.refund(RefundRequest("r-1", "4975363", REFERENCE, 500, "KES"))
    assert failed.value.retryable is False
    assert len(p.requests) == 1


# -- webhooks ----------------------------------------------------------------------------


def completed(**data: Any) -> bytes:
    # https://developer.flutterwave.com/v3.0/docs/webhooks (charge.completed example)
    values: dict[str, Any] = {
        "id": 285959875,
        "tx_ref": REFERENCE,
        "flw_ref": "PeterEkene/FLW270177170",
        "device_fingerprint": "a42937f4a73ce8bb8b8df14e63a2df31",
        "amount": 12.5,
        "currency": "KES",
        "charged_amount": 12.5,
        "app_fee": 1.4,
        "merchant_fee": 0,
        "processor_response": "Approved by Financial Institution",
        "auth_model": "PIN",
        "ip": "197.210.64.96",
        "narration": "CARD Transaction ",
        "status": "successful",
        "payment_type": "card",
        "created_at": "2030-01-01T11:59:04.000Z",
        "account_id": 17321,
        "customer": {"id": 215604089, "email": "wanjiru@example.com"},
    }
    values.update(data)
    return json.dumps(
        {"event": "charge.completed", "data": values, "event.type": "CARD_TRANSACTION"}
    ).encode()


def verify(body: bytes, verif_hash: str | None) -> Any:
    headers = {} if verif_hash is None else {"verif-hash": verif_hash}
    return Provider().adapter.verify_webhook(headers, body, NOW)


def test_the_right_verif_hash_is_accepted_and_the_event_parsed() -> None:
    parsed = verify(completed(), SECRET_HASH)
    assert parsed.provider == "flutterwave"
    assert parsed.event_type == "charge.completed"
    assert parsed.reference == REFERENCE
    assert parsed.status is ProviderStatus.succeeded
    assert parsed.amount_minor == 1250
    assert parsed.currency == "KES"
    assert parsed.occurred_at == dt.datetime(2030, 1, 1, 11, 59, 4, tzinfo=dt.UTC)
    assert parsed.event_id.startswith("flw_285959875_")


@pytest.mark.parametrize(
    "verif_hash", [None, "", SECRET_HASH + "x", SECRET_HASH[:-1], SECRET_HASH.upper(), "\u00e9"]
)
def test_a_wrong_or_missing_verif_hash_is_rejected(verif_hash: str | None) -> None:
    with pytest.raises(WebhookRejectedError):
        verify(completed(), verif_hash)


def test_the_hash_does_not_authenticate_the_body() -> None:
    # Anyone holding the secret hash could send any body: this is why Soko confirms
    # every event with fetch() before acting on it.
    forged_amount = verify(completed(amount=1), SECRET_HASH)
    assert forged_amount.amount_minor == 100


def test_a_replay_is_the_same_event_and_a_new_status_another() -> None:
    first = verify(completed(), SECRET_HASH)
    assert verify(completed(), SECRET_HASH).event_id == first.event_id
    failed = verify(completed(status="failed"), SECRET_HASH)
    assert failed.status is ProviderStatus.failed
    assert failed.event_id != first.event_id
    assert verify(completed(id=285959876), SECRET_HASH).event_id != first.event_id


def test_an_odd_amount_is_left_out_not_refused() -> None:
    parsed = verify(completed(amount="lots"), SECRET_HASH)
    assert parsed.amount_minor is None
    assert parsed.status is ProviderStatus.succeeded


@pytest.mark.parametrize(
    "body", [b"nope", b"[]", b'{"event": "charge.completed"}', b'{"event": "x", "data": {}}']
)
def test_bodies_that_are_not_events_are_rejected(body: bytes) -> None:
    with pytest.raises(WebhookRejectedError):
        verify(body, SECRET_HASH)


async def test_a_pending_refund_is_followed_up_by_reading_it() -> None:
    # https://developer.flutterwave.com/v3.0/reference/get-a-refund
    fetched = json.loads(json.dumps(REFUND_ANSWER))
    fetched["message"] = "Refund fetched"
    p = Provider(httpx2.ConnectError("reset"), httpx2.Response(200, json=fetched))
    assert isinstance(p.adapter, RefundStatusReader)
    result = await p.adapter.refund_status(
        "75923", RefundRequest("r-1", "4975363", REFERENCE, 500, "KES")
    )
    assert [(r.method, str(r.url)) for r in p.requests] == [
        ("GET", "https://api.flutterwave.com/v3/refunds/75923"),
        ("GET", "https://api.flutterwave.com/v3/refunds/75923"),
    ]
    assert p.requests[1].headers["authorization"] == f"Bearer {SECRET_KEY}"
    assert result.provider_refund_id == "75923"
    assert result.status is RefundStatus.succeeded
