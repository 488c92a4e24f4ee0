"""Outbound provider HTTP: which failures are retried, how they are classified, the
breaker around every attempt, and the deadline that keeps a hung provider from holding
a call. Everything runs over ``httpx2.MockTransport``; no network."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import pytest
import stamina
from prometheus_client import REGISTRY

from soko.payments.providers.base import ProviderError, ProviderUnavailableError
from soko.payments.providers.http import HttpPolicy, ProviderHttp, ProviderHttpError
from soko.platform.clock import ManualClock

Handler = Callable[[httpx2.Request], Any]


@pytest.fixture(autouse=True)
def instant_retries() -> Iterator[None]:
    # Backoff waits become zero; the number of attempts stays the one the code asks for.
    with stamina.set_testing(True, attempts=100, cap=True):
        yield


class Script:
    """Answers requests from a list of responses (or exceptions to raise), in order,
    and keeps every request it saw."""

    def __init__(self, *answers: httpx2.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        if not self.answers:
            raise AssertionError(f"unexpected request {request.method} {request.url}")
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def ok(body: dict[str, Any] | None = None) -> httpx2.Response:
    return httpx2.Response(200, json=body if body is not None else {"ok": True})


def make_http(
    handler: Handler,
    clock: ManualClock | None = None,
    *,
    name: str = "testpay",
    idempotency_header: str | None = "Idempotency-Key",
    **policy: Any,
) -> ProviderHttp:
    values: dict[str, Any] = {"timeout_seconds": 5.0, "attempts": 3, "breaker_failures": 50}
    values.update(policy)
    return ProviderHttp(
        name,
        base_url="https://api.testpay.example",
        headers={"Authorization": "Bearer sk_test_abc"},
        policy=HttpPolicy(**values),
        clock=clock or ManualClock(),
        transport=httpx2.MockTransport(handler),
        idempotency_header=idempotency_header,
    )


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_get_answered_503_then_200_is_retried() -> None:
    script = Script(httpx2.Response(503, json={"message": "try later"}), ok({"id": 7}))
    http = make_http(script, name="retry-get")
    assert await http.request("verify", "GET", "/things/7") == {"id": 7}
    assert [r.method for r in script.requests] == ["GET", "GET"]
    assert script.requests[0].headers["authorization"] == "Bearer sk_test_abc"
    assert (
        sample(
            "soko_payment_provider_requests_total",
            provider="retry-get",
            operation="verify",
            outcome="server_error",
        )
        == 1
    )
    assert (
        sample(
            "soko_payment_provider_requests_total",
            provider="retry-get",
            operation="verify",
            outcome="ok",
        )
        == 1
    )
    assert (
        sample("soko_payment_provider_retries_total", provider="retry-get", operation="verify") == 1
    )
    await http.aclose()


async def test_a_get_that_keeps_failing_gives_up_after_the_attempts() -> None:
    script = Script(*(httpx2.Response(500) for _ in range(3)))
    http = make_http(script, attempts=3)
    with pytest.raises(ProviderError) as failed:
        await http.request("verify", "GET", "/things/7")
    assert failed.value.retryable is True
    assert "HTTP 500" in str(failed.value)
    assert len(script.requests) == 3


async def test_rate_limited_get_is_retried_and_retryable() -> None:
    script = Script(httpx2.Response(429, headers={"Retry-After": "1"}), ok())
    http = make_http(script)
    assert await http.request("verify", "GET", "/x") == {"ok": True}
    assert len(script.requests) == 2


async def test_a_long_retry_after_is_not_waited_for_inside_the_call() -> None:
    script = Script(httpx2.Response(429, headers={"Retry-After": "120"}))
    http = make_http(script)
    with pytest.raises(ProviderHttpError) as failed:
        await http.request("verify", "GET", "/x")
    assert failed.value.retryable is True
    assert failed.value.retry_after_seconds == 120
    assert len(script.requests) == 1


async def test_a_timeout_is_a_retryable_error() -> None:
    script = Script(*(httpx2.ReadTimeout("slow") for _ in range(3)))
    http = make_http(script, name="timeouts")
    with pytest.raises(ProviderError) as failed:
        await http.request("verify", "GET", "/x")
    assert failed.value.retryable is True
    assert "timed out" in str(failed.value)
    assert len(script.requests) == 3
    assert (
        sample(
            "soko_payment_provider_requests_total",
            provider="timeouts",
            operation="verify",
            outcome="timeout",
        )
        == 3
    )


async def test_a_connection_error_on_get_is_retried() -> None:
    script = Script(httpx2.ConnectError("refused"), ok())
    http = make_http(script)
    assert await http.request("verify", "GET", "/x") == {"ok": True}


async def test_a_client_error_is_final_and_carries_the_providers_message() -> None:
    script = Script(
        httpx2.Response(400, json={"status": False, "message": "Transaction reference not found"})
    )
    http = make_http(script)
    with pytest.raises(ProviderHttpError) as failed:
        await http.request("verify", "GET", "/x")
    assert failed.value.retryable is False
    assert failed.value.status_code == 400
    assert "Transaction reference not found" in str(failed.value)
    assert len(script.requests) == 1
    # An answer from a working provider: the breaker does not count it.
    assert http.breaker.consecutive_failures == 0


async def test_a_stripe_shaped_error_message_is_read() -> None:
    script = Script(
        httpx2.Response(
            402, json={"error": {"type": "card_error", "message": "Your card was declined."}}
        )
    )
    http = make_http(script)
    with pytest.raises(ProviderHttpError, match="Your card was declined"):
        await http.request("create", "POST", "/x", idempotency_key="k1")


async def test_a_post_without_idempotency_key_is_sent_once() -> None:
    script = Script(httpx2.Response(503), ok())
    http = make_http(script)
    with pytest.raises(ProviderError) as failed:
        await http.request("initialize", "POST", "/transaction/initialize", json_body={"a": 1})
    # 503: turned away before anything happened, so a later try is safe...
    assert failed.value.retryable is True
    # ...but this call does not make it.
    assert len(script.requests) == 1


async def test_a_post_that_timed_out_after_sending_is_not_called_retryable() -> None:
    script = Script(httpx2.ReadTimeout("no answer"))
    http = make_http(script)
    with pytest.raises(ProviderError) as failed:
        await http.request("refund", "POST", "/refund", json_body={"amount": 1})
    assert failed.value.retryable is False
    assert "may have acted" in str(failed.value)
    assert len(script.requests) == 1


async def test_a_post_500_may_have_taken_effect() -> None:
    script = Script(httpx2.Response(500))
    http = make_http(script)
    with pytest.raises(ProviderError) as failed:
        await http.request("refund", "POST", "/refund", json_body={"amount": 1})
    assert failed.value.retryable is False


async def test_a_post_that_could_not_connect_is_retryable_but_not_retried() -> None:
    script = Script(httpx2.ConnectError("refused"))
    http = make_http(script)
    with pytest.raises(ProviderError) as failed:
        await http.request("refund", "POST", "/refund", json_body={"amount": 1})
    assert failed.value.retryable is True
    assert len(script.requests) == 1


async def test_a_post_with_an_idempotency_key_is_retried_with_the_same_key() -> None:
    script = Script(httpx2.Response(500), httpx2.ReadTimeout("slow"), ok({"id": "pi_1"}))
    http = make_http(script)
    answer = await http.request(
        "create_intent",
        "POST",
        "/v1/payment_intents",
        form={"amount": "100"},
        idempotency_key="ref-1",
    )
    assert answer == {"id": "pi_1"}
    assert [r.headers["idempotency-key"] for r in script.requests] == ["ref-1"] * 3
    assert all(r.content == b"amount=100" for r in script.requests)


async def test_a_provider_without_idempotency_keys_refuses_one() -> None:
    http = make_http(Script(), idempotency_header=None)
    with pytest.raises(ValueError):
        await http.request("refund", "POST", "/refund", idempotency_key="k")


async def test_an_unreadable_success_is_retried_on_get_and_final_on_post() -> None:
    garbage = httpx2.Response(200, content=b"<html>gateway</html>")
    script = Script(garbage, ok())
    http = make_http(script)
    assert await http.request("verify", "GET", "/x") == {"ok": True}

    script = Script(httpx2.Response(200, content=b"[1, 2]"))
    http = make_http(script)
    with pytest.raises(ProviderError) as failed:
        await http.request("refund", "POST", "/refund")
    assert failed.value.retryable is False


async def test_floats_in_answers_are_decimals() -> None:
    from decimal import Decimal

    http = make_http(Script(httpx2.Response(200, content=b'{"amount": 100.10}')))
    answer = await http.request("verify", "GET", "/x")
    assert answer["amount"] == Decimal("100.10")


async def test_the_breaker_opens_refuses_fast_and_half_opens_after_the_reset() -> None:
    clock = ManualClock()
    script = Script(*(httpx2.Response(503) for _ in range(3)))
    http = make_http(
        script,
        clock,
        name="breaker-http",
        attempts=1,
        breaker_failures=3,
        breaker_reset_seconds=30,
    )
    for _ in range(3):
        with pytest.raises(ProviderError):
            await http.request("verify", "GET", "/x")
    assert http.readiness()["status"] == "down"
    assert http.readiness()["circuit"] == "open"
    assert http.readiness()["critical"] is False

    with pytest.raises(ProviderUnavailableError) as refused:
        await http.request("verify", "GET", "/x")
    assert refused.value.retryable is True
    assert refused.value.retry_after_seconds == pytest.approx(30)
    assert len(script.requests) == 3  # refused without a request
    assert (
        sample(
            "soko_payment_provider_requests_total",
            provider="breaker-http",
            operation="verify",
            outcome="circuit_open",
        )
        == 1
    )

    failed_at = clock.now()
    clock.advance(30)
    assert http.readiness()["circuit"] == "half_open"
    assert http.readiness()["status"] == "up"
    script.answers.append(ok())
    assert await http.request("verify", "GET", "/x") == {"ok": True}
    assert http.readiness() == {
        "status": "up",
        "critical": False,
        "circuit": "closed",
        "consecutive_failures": 0,
        "last_failure_at": failed_at.isoformat(),
    }


async def test_retries_stop_once_the_breaker_opens() -> None:
    script = Script(*(httpx2.Response(503) for _ in range(5)))
    http = make_http(script, attempts=5, breaker_failures=2)
    with pytest.raises(ProviderUnavailableError):
        await http.request("verify", "GET", "/x")
    assert len(script.requests) == 2


async def test_a_hanging_provider_ends_at_the_timeout() -> None:
    seen = 0

    async def hangs(request: httpx2.Request) -> httpx2.Response:
        nonlocal seen
        seen += 1
        await asyncio.Event().wait()  # never answers
        raise AssertionError("unreachable")

    http = make_http(hangs, name="hangs", timeout_seconds=0.05, attempts=2)
    # The outer guard only proves the call ends by itself; the deadline is 0.05 s.
    async with asyncio.timeout(10):
        with pytest.raises(ProviderError) as failed:
            await http.request("verify", "GET", "/x")
    assert failed.value.retryable is True
    assert "timed out" in str(failed.value)
    assert seen == 2
    assert http.breaker.consecutive_failures == 2


async def test_a_hanging_provider_does_not_block_other_work() -> None:
    async def hangs(request: httpx2.Request) -> httpx2.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    http = make_http(hangs, timeout_seconds=5, attempts=1)
    call = asyncio.create_task(http.request("verify", "GET", "/x"))
    # Other work on the loop goes on while the provider hangs.
    other = make_http(Script(ok({"other": True})))
    assert await other.request("verify", "GET", "/y") == {"other": True}
    assert not call.done()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # Cancelled from outside: no verdict against the provider.
    assert http.breaker.consecutive_failures == 0


async def test_a_conflict_on_a_keyed_post_is_retried() -> None:
    # The same key still being processed (an earlier attempt the provider is finishing).
    conflict = httpx2.Response(409, json={"error": {"message": "idempotent request in progress"}})
    script = Script(conflict, ok({"id": "pi_1"}))
    http = make_http(script)
    answer = await http.request("create", "POST", "/x", form={"a": "1"}, idempotency_key="k")
    assert answer == {"id": "pi_1"}
    assert len(script.requests) == 2
    assert http.breaker.consecutive_failures == 0  # the provider works


async def test_a_conflict_on_a_plain_post_is_final() -> None:
    script = Script(httpx2.Response(409, json={"message": "conflict"}))
    http = make_http(script)
    with pytest.raises(ProviderError) as failed:
        await http.request("initialize", "POST", "/x", json_body={})
    assert failed.value.retryable is False
    assert len(script.requests) == 1


async def test_the_providers_retry_hint_is_followed() -> None:
    def make(*answers: httpx2.Response) -> tuple[Script, ProviderHttp]:
        script = Script(*answers)
        http = ProviderHttp(
            "hinted",
            base_url="https://api.testpay.example",
            headers={},
            policy=HttpPolicy(timeout_seconds=5, attempts=3),
            clock=ManualClock(),
            transport=httpx2.MockTransport(script),
            idempotency_header="Idempotency-Key",
            retry_hint_header="Stripe-Should-Retry",
        )
        return script, http

    script, http = make(httpx2.Response(503, headers={"Stripe-Should-Retry": "false"}))
    with pytest.raises(ProviderError) as failed:
        await http.request("fetch", "GET", "/x")
    assert failed.value.retryable is False
    assert len(script.requests) == 1

    script, http = make(httpx2.Response(400, headers={"Stripe-Should-Retry": "true"}), ok())
    assert await http.request("create", "POST", "/x", idempotency_key="k") == {"ok": True}
    assert len(script.requests) == 2


async def test_an_unreadable_answer_is_classified_not_leaked() -> None:
    script = Script(httpx2.DecodingError("bad gzip"), ok())
    http = make_http(script)
    assert await http.request("verify", "GET", "/x") == {"ok": True}
    assert http.breaker.consecutive_failures == 0

    script = Script(httpx2.DecodingError("bad gzip"))
    http = make_http(script)
    with pytest.raises(ProviderHttpError) as failed:
        await http.request("refund", "POST", "/refund")
    assert failed.value.retryable is False
    assert failed.value.outcome == "bad_response"
    assert http.breaker.consecutive_failures == 1


async def test_a_cancelled_attempt_is_counted_as_cancelled() -> None:
    async def hangs(request: httpx2.Request) -> httpx2.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    http = make_http(hangs, name="cancelled-http", attempts=1)
    call = asyncio.create_task(http.request("verify", "GET", "/x"))
    await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert (
        sample(
            "soko_payment_provider_requests_total",
            provider="cancelled-http",
            operation="verify",
            outcome="cancelled",
        )
        == 1
    )


@pytest.mark.parametrize("status", [500, 502, 504])
async def test_a_post_whose_gateway_gave_up_may_have_taken_effect(status: int) -> None:
    script = Script(httpx2.Response(status))
    http = make_http(script)
    with pytest.raises(ProviderError, match="may have acted") as failed:
        await http.request("refund", "POST", "/refund", json_body={"amount": 1})
    assert failed.value.retryable is False
    assert http.breaker.consecutive_failures == 1
